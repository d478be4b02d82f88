"""N:M rows expanded to dense rows on the GPU, one launch per tile (many-token inference: prefill).

An N:M product at many tokens is a GEMM on a dense weight tile that is rebuilt from the stored values and packed
in-group positions a block of rows at a time (``structures.sparse.nm_multiply``; never the whole weight). In PyTorch
that rebuild is ~10 kernels per tile (unpack the 2-bit codes through int32 and int64 index tensors, a zero fill, a
scatter): on the H200 the 2:4 model's prefill ran at 0.35x dense (session 20). Here one kernel reads each row's
values and packed codes once and writes the dense tile: output column c of row r is the value of group c // m whose
position is c % m, or zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..structures.sparse import position_bits
from ._launch import LaunchCache

#: Rows x columns of dense tile per program (a 2:4 bf16 tile of 32 x 128: 8 KB written, 2.3 KB read)
BLOCK_R, BLOCK_C = 32, 128


@triton.jit
def _nm_expand(V, P, OUT, ROWS, GROUPS, s_v, s_p, s_o, N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    PER: tl.constexpr = 8 // BITS  # positions per byte
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    g = c // M
    ok = (r < ROWS)[:, None] & (g < GROUPS)[None, :]
    row = r.to(tl.int64)[:, None]
    out = tl.zeros((BLOCK_R, BLOCK_C), dtype=V.dtype.element_ty)
    for i in tl.static_range(N):  # the group's i-th kept value lands where its position says
        k = g * N + i
        v = tl.load(V + row * s_v + k[None, :], mask=ok, other=0.0)
        code = tl.load(P + row * s_p + (k // PER)[None, :], mask=ok, other=0).to(tl.int32)
        pos = (code >> ((k % PER) * BITS)[None, :]) & ((1 << BITS) - 1)
        out = tl.where(pos == (c % M)[None, :], v, out)
    tl.store(OUT + row * s_o + c[None, :], out.to(OUT.dtype.element_ty), mask=ok)


_LAUNCHES = LaunchCache(_nm_expand)  # (a prefill's tiles repeat per layer shape: past Triton's binding after two)


def nm_expand(values: Tensor, positions: Tensor, n: int, m: int, dtype: torch.dtype | None = None) -> Tensor:
    """Dense (rows, kept // n * m) rows of an N:M weight from its values (rows, kept) and packed positions (rows,
    packed width; ``structures.sparse.pack_positions``), in ``dtype`` (default the values')."""
    rows, kept = values.shape
    if kept % n or values.stride(1) != 1 or positions.stride(1) != 1 or positions.dtype != torch.uint8:
        raise ValueError(f"nm_expand: values {tuple(values.shape)} (stride {values.stride()}) and positions "
                         f"{positions.dtype} {tuple(positions.shape)} are not an N:M layer's rows with n={n}; pass "
                         "row slices of NMSparse.values and NMSparse.index")
    groups = kept // n
    out = torch.empty(rows, groups * m, dtype=dtype or values.dtype, device=values.device)
    if out.numel():
        grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv(groups * m, BLOCK_C))
        _LAUNCHES(grid, values, positions, out, rows, groups, values.stride(0), positions.stride(0), out.stride(0),
                  N=n, M=m, BITS=position_bits(m), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=4)
    return out
