"""Few-token (decode) products as ``torch.library`` custom ops, with fake kernels so that ``torch.compile`` and CUDA
graphs capture them; inference only (no autograd: dispatch sends a call here only when nothing needs a gradient).

  ``structmat::decode_lowrank(x, U, V)``      y = (x V^T) U^T: stage 1 split over the input dim (fp32 partials of
                                              the rank vector, a few KB that stay in L2), stage 2 sums them on load
  ``structmat::decode_blockdiag(x, W)``       one launch over (block, row block)
  ``structmat::decode_monarch(x, R, L)``      stage 1 writes the permuted intermediate (fp32 split-K partials, in
                                              the order stage 2 reads), stage 2 sums them on load
  ``structmat::decode_nm(x, values, positions, n, m)``  N:M from compressed values + uint8 in-group positions

Each weight byte is read from HBM once; the intermediates (tokens x rank or tokens x in) are tiny. Eager calls run
the same code without the custom op's dispatch (host time is what few-token calls pay).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops as _ops
from ._triton_decode import MAX_TOKENS, decode_gemv, decode_nm, plan_gemv

__all__ = ["MAX_TOKENS", "blockdiag", "lowrank", "monarch", "nm"]


def _empty(shape: tuple, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    dtype = like.dtype if dtype is None else dtype
    if _ops.POISON:  # tests: an element a kernel does not write shows as NaN
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _lowrank(x: Tensor, U: Tensor, V: Tensor) -> Tensor:
    n, k = x.shape
    r, out = V.shape[0], U.shape[0]
    p1 = plan_gemv(n, 1, r, k, x.device, split_ok=True)
    t = _empty((p1["splits"], n, r), x, torch.float32)
    decode_gemv(x, (0, x.stride(0), x.stride(1)), V, (0, V.stride(0), V.stride(1)), t, (0, r, 1), 1, n, r, k, p1,
                c_split_stride=n * r)
    y = _empty((n, out), x)
    p2 = plan_gemv(n, 1, out, r, x.device, split_ok=False)
    decode_gemv(t, (0, r, 1), U, (0, U.stride(0), U.stride(1)), y, (0, y.stride(0), 1), 1, n, out, r, p2,
                a_partials=p1["splits"], a_partial_stride=n * r)
    return y


def _blockdiag(x: Tensor, W: Tensor) -> Tensor:
    b, u, p = W.shape
    n = x.shape[0]
    y = _empty((n, b * u), x)
    plan = plan_gemv(n, b, u, p, x.device, split_ok=False)
    decode_gemv(x, (p * x.stride(1), x.stride(0), x.stride(1)), W, (W.stride(0), W.stride(1), W.stride(2)),
                y, (u, y.stride(0), 1), b, n, u, p, plan)
    return y


def _monarch(x: Tensor, R: Tensor, L: Tensor) -> Tensor:
    b, bc, p = R.shape
    u, c, n = L.shape[1], bc // b, x.shape[0]
    p1 = plan_gemv(n, b, bc, p, x.device, split_ok=True)
    # stage 1, group k: row (s, q) of R_k -> h[:, s*b*c + k*c + q] (the order stage 2 reads), one partial per split
    h = _empty((p1["splits"], n, b * bc), x, torch.float32)
    decode_gemv(x, (p * x.stride(1), x.stride(0), x.stride(1)), R, (R.stride(0), R.stride(1), R.stride(2)),
                h, (c, b * bc, 1), b, n, bc, p, p1, chunk=c, chunk_stride=bc, c_split_stride=n * b * bc)
    # stage 2, group s: h[:, s*b*c:(s+1)*b*c] (summed over the partials) @ L_s^T
    y = _empty((n, b * u), x)
    p2 = plan_gemv(n, b, u, bc, x.device, split_ok=False)
    decode_gemv(h, (bc, b * bc, 1), L, (L.stride(0), L.stride(1), L.stride(2)), y, (u, y.stride(0), 1), b, n, u,
                bc, p2, a_partials=p1["splits"], a_partial_stride=n * b * bc)
    return y


def _nm(x: Tensor, values: Tensor, positions: Tensor, n: int, m: int) -> Tensor:
    y = _empty((x.shape[0], values.shape[0]), x)
    return decode_nm(x, values, positions, y, n, m)


@torch.library.custom_op("structmat::decode_lowrank", mutates_args=())
def decode_lowrank_op(x: Tensor, U: Tensor, V: Tensor) -> Tensor:
    return _lowrank(x, U, V)


@decode_lowrank_op.register_fake
def _(x, U, V):
    return x.new_empty((x.shape[0], U.shape[0]))


@torch.library.custom_op("structmat::decode_blockdiag", mutates_args=())
def decode_blockdiag_op(x: Tensor, W: Tensor) -> Tensor:
    return _blockdiag(x, W)


@decode_blockdiag_op.register_fake
def _(x, W):
    return x.new_empty((x.shape[0], W.shape[0] * W.shape[1]))


@torch.library.custom_op("structmat::decode_monarch", mutates_args=())
def decode_monarch_op(x: Tensor, R: Tensor, L: Tensor) -> Tensor:
    return _monarch(x, R, L)


@decode_monarch_op.register_fake
def _(x, R, L):
    return x.new_empty((x.shape[0], L.shape[0] * L.shape[1]))


@torch.library.custom_op("structmat::decode_nm", mutates_args=())
def decode_nm_op(x: Tensor, values: Tensor, positions: Tensor, n: int, m: int) -> Tensor:
    return _nm(x, values, positions, n, m)


@decode_nm_op.register_fake
def _(x, values, positions, n, m):
    return x.new_empty((x.shape[0], values.shape[0]))


def lowrank(x: Tensor, U: Tensor, V: Tensor) -> Tensor:
    return decode_lowrank_op(x, U, V) if torch.compiler.is_compiling() else _lowrank(x, U, V)


def blockdiag(x: Tensor, W: Tensor) -> Tensor:
    return decode_blockdiag_op(x, W) if torch.compiler.is_compiling() else _blockdiag(x, W)


def monarch(x: Tensor, R: Tensor, L: Tensor) -> Tensor:
    return decode_monarch_op(x, R, L) if torch.compiler.is_compiling() else _monarch(x, R, L)


def nm(x: Tensor, values: Tensor, positions: Tensor, n: int, m: int) -> Tensor:
    return decode_nm_op(x, values, positions, n, m) if torch.compiler.is_compiling() else _nm(x, values, positions, n, m)
