"""One Triton kernel for every structured product: a grouped GEMM over arbitrary strides.

``C[g] = A[g] @ B[g]`` for g in the launch grid's second axis, with A[g] (M, K), B[g] (K, N), C[g] (M, N) all given
by (group, row, column) strides, so transposed operands and block-diagonal slices of one big matrix are views, never
copies. The output column index may be *chunked*: column ``j`` is stored at ``(j // CHUNK) * s_cchunk +
(j % CHUNK) * s_cn``. That is how the Monarch permutation is folded into the indexing: stage 1 writes its
intermediate directly in the order stage 2 reads contiguously (no transposed copy is ever materialised), and the
backward pass writes the gradient of the intermediate back in stage 1's order the same way.

Accumulation is always fp32 (``tl.dot`` into an fp32 accumulator); the result is cast to C's dtype on store.
This module imports triton at the top; ``structmat.kernels`` imports it only inside a guard.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import LaunchCache

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
#: The kernels here and in _triton_monarch index rows and columns in 32-bit arithmetic: an operand must reach fewer
#: elements than this from its start (callers check; ops sends larger ones to cuBLAS)
INT32_EXTENT = 2**31
#: Autotune per shape (default). With STRUCTMAT_AUTOTUNE=0 (or AUTOTUNE = False) a fixed heuristic config runs:
#: one compile per dtype, for quick tests.
AUTOTUNE = os.environ.get("STRUCTMAT_AUTOTUNE", "1") != "0"


def _bench(kernel_call, quantiles):
    # Short autotuning runs: the grid has many shapes and device time is precious. Medians are stable at this length.
    return triton.testing.do_bench(kernel_call, warmup=3, rep=15, quantiles=quantiles)


def _configs():
    out = []
    for bm, bn, bk, w, s in [
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
        (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
        # small token counts (decode / few rows): thin M tiles, deep K
        (16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (16, 128, 128, 4, 3),
    ]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w,
                                 num_stages=s))
    return out


def _prune(configs, named_args, **kwargs):
    m, n, k = named_args["M"], named_args["N"], named_args["K"]
    keep = []
    for cfg in configs:
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        if m <= 64 and bm > max(16, triton.next_power_of_2(m)):
            continue  # thin problems: don't waste the tile on padding rows
        if m > 64 and bm < 64:
            continue
        if bn > 2 * max(64, triton.next_power_of_2(n)) or bk > 2 * max(32, triton.next_power_of_2(k)):
            continue
        keep.append(cfg)
    return keep or configs[:1]


@triton.jit
def _grouped_gemm(A, B, C, M, N, K, M_BUCKET,
                  s_ag, s_am, s_ak, s_bg, s_bk, s_bn, s_cg, s_cm, s_cn, s_cchunk, CHUNK,
                  PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Swizzle the tile order so that consecutive programs share A row-panels in L2.
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/cols past the end wrap around (valid addresses, discarded at the store): no M/N masks in the loop.
    rm = offs_m % M
    rn = offs_n % N
    a_ptrs = A + g * s_ag + rm[:, None] * s_am + offs_k[None, :] * s_ak
    b_ptrs = B + g * s_bg + offs_k[:, None] * s_bk + rn[None, :] * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kk * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk

    # CHUNK is a runtime int (0 = no chunking) so that every Monarch block rank shares one compiled kernel.
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_rows = C + g * s_cg + offs_m[:, None] * s_cm
    if CHUNK == 0:
        tl.store(c_rows + (offs_n * s_cn)[None, :], acc.to(C.dtype.element_ty), mask=mask)
    elif CHUNK % BLOCK_N == 0:
        n0 = pid_n * BLOCK_N  # the whole tile lies in one chunk: one contiguous run per row
        base = (n0 // CHUNK) * s_cchunk + (n0 % CHUNK) * s_cn
        tl.store(c_rows + (base + tl.arange(0, BLOCK_N) * s_cn)[None, :], acc.to(C.dtype.element_ty), mask=mask)
    else:
        col = (offs_n // CHUNK) * s_cchunk + (offs_n % CHUNK) * s_cn
        tl.store(c_rows + col[None, :], acc.to(C.dtype.element_ty), mask=mask)


_grouped_gemm_tuned = triton.autotune(_configs(), key=["M_BUCKET", "N", "K", "s_am", "s_bk", "s_cn"],
                                      prune_configs_by={"early_config_prune": _prune}, do_bench=_bench)(_grouped_gemm)

# The interpreter (CPU CI) gets one fixed small config; it cannot time anything.
_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}


def _bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 16384)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"  # only where torch's own fp32 matmul would use TF32 too: the math never changes with backend
    return "ieee" if dtype == torch.float32 else "tf32"  # (tf32 is ignored for 16-bit inputs)


def grouped_gemm(a: Tensor, a_strides, b: Tensor, b_strides, c: Tensor, c_strides, groups: int, M: int, N: int,
                 K: int, chunk: int = 0, chunk_stride: int = 0) -> Tensor:
    """Launch C[g] = A[g] @ B[g]. ``*_strides`` are (group, row, col) element strides; returns ``c``."""
    if M == 0 or N == 0 or groups == 0:
        return c
    if K == 0:
        # Nothing to accumulate: write the zeros explicitly (the kernel would too, but keep it obvious).
        raise ValueError("grouped_gemm: K == 0 is not supported")
    args = (a, b, c, M, N, K, _bucket(M), *a_strides, *b_strides, *c_strides, chunk_stride, chunk)
    prec = _precision(a.dtype)
    if INTERPRET or not a.is_cuda:
        cfg = _INTERPRET_CONFIG
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), groups)
        _grouped_gemm[grid](*args, PRECISION=prec, **cfg)
    elif not AUTOTUNE:
        cfg = ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8} if M > 64
               else {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8})
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), groups)
        _LAUNCHES(grid, *args, PRECISION=prec, num_warps=8 if M > 64 else 4, num_stages=3, **cfg)
    else:
        key = (_bucket(M), N, K, a_strides[1], b_strides[1], c_strides[2], a.dtype, b.dtype, c.dtype, prec,
               a.device.index)
        cfg = _BEST.get(key)
        if cfg is None:  # first call for this key: autotune, then remember the winner
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), groups)  # noqa
            _grouped_gemm_tuned[grid](*args, PRECISION=prec)
            _BEST[key] = _grouped_gemm_tuned.best_config.all_kwargs()
        else:  # later calls skip the autotuner's and Triton's per-call Python (eager prefill is near host-bound)
            grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), groups)
            _LAUNCHES(grid, *args, PRECISION=prec, **cfg)
    return c


_BEST: dict[tuple, dict] = {}
#: The GPU's launches of the tuned or fixed config, each past its first calls straight to Triton's compiled launcher
_LAUNCHES = LaunchCache(_grouped_gemm)

