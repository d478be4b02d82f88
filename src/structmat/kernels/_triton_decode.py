"""Triton kernels for few-token products (decode, 1-64 tokens): every weight byte is read once, from HBM.

At a few tokens a linear layer is memory-bound: its time is the bytes of its weight. These kernels therefore keep the
tokens in one tile (``BLOCK_N`` >= tokens) and spread the *weight* over many programs (output-row blocks x groups x
splits of the reduction), so that every SM streams weight at once; a dense GEMM library's few-token path cannot do
that for block-structured weights.

``decode_gemv``: ``C[g][:, m] = sum_k A[g][:, k] * W[g][m, k]`` for every group g, with all operands given by
element strides (so block-diagonal, Monarch and low-rank are views of one description, as in ``_triton_gemm``):
  * A may be a stack of ``S_A`` fp32 partial sums (split-K output of a previous stage), summed on load and rounded
    once to the weight's dtype, as the reference rounds its intermediate;
  * the reduction may be split into ``grid[1]`` ranges, each writing its own fp32 partial copy of C (summed by the
    next stage: no atomics, no memset, no extra launch);
  * the output column may be chunked (Monarch's permutation folded into the store, as in ``_triton_gemm``).
``decode_nm``: N:M sparse from compressed values and uint8 in-group positions, each read once; the dense weight is
never formed (at few tokens each value meets the input its position selects; with more tokens the dense slice of
each in-group position is selected on chip and fed to ``tl.dot``).
Accumulation is fp32 everywhere.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
MAX_TOKENS = 64  # the kernels keep all tokens in one tile
TARGET_PROGRAMS = 4  # programs per SM to aim for: enough bytes in flight to stream HBM
#: The gemv kernel's launch options and its reduction tile at K >= 2048 (module-level so a benchmark can sweep them;
#: a layer's plan reads them when it is made)
GEMV_META = {"num_warps": 4, "num_stages": 4}
BLOCK_K_LARGE = [256]
#: Up to this many tokens the N:M kernel gathers, per value, the one input its position selects (one multiply-add per
#: value and token, values read as contiguous row tiles); above, tensor-core tiles (a one-element list so a benchmark
#: can compare both). The gather replaced a multiply-reduce over every in-group position (4 selects per value), which
#: ran at 0.26-0.45x dense at one token on the H200 (benchmarks/results/decode-probe-20261203T120056Z.json).
SMALL_TOKENS = [4]


@triton.jit
def _decode_gemv(A, W, C, N, M, K, S_A, SPLIT_LEN, M_BLOCKS,
                 s_as, s_ag, s_an, s_ak, s_wg, s_wm, s_wk, s_cs, s_cg, s_cn, s_cm, s_cchunk, CHUNK,
                 PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    g = (pid // M_BLOCKS).to(tl.int64)
    pid_m = pid % M_BLOCKS
    split = tl.program_id(1)
    k_start = split * SPLIT_LEN
    k_end = tl.minimum(K, k_start + SPLIT_LEN)
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    rm = offs_m % M  # rows past the end wrap (valid addresses, dropped at the store): no row mask in the loop
    w_ptrs = W + g * s_wg + rm[:, None] * s_wm + (k_start + offs_k)[None, :] * s_wk
    a_ptrs = A + g * s_ag + offs_n[:, None] * s_an + (k_start + offs_k)[None, :] * s_ak
    n_ok = offs_n[:, None] < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_ok = (k0 + offs_k) < k_end
        w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=n_ok & k_ok[None, :], other=0.0).to(tl.float32)
        for t in range(1, S_A):  # the previous stage's split-K partials
            a += tl.load(a_ptrs + t * s_as, mask=n_ok & k_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(a.to(w.dtype), tl.trans(w), acc, input_precision=PRECISION)
        w_ptrs += BLOCK_K * s_wk
        a_ptrs += BLOCK_K * s_ak
    if CHUNK == 0:
        col = offs_m * s_cm
    else:
        col = (offs_m // CHUNK) * s_cchunk + (offs_m % CHUNK) * s_cm
    c_ptrs = C + split * s_cs + g * s_cg + offs_n[:, None] * s_cn + col[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=n_ok & (offs_m[None, :] < M))


@triton.jit
def _nm_slot(acc, v, p, X, offs_n, n_ok, grp, g_ok, K, s_xn, s_xk, GROUP: tl.constexpr, PRECISION: tl.constexpr):
    """acc += the products of one value slot: v, p (BLOCK_M, BLOCK_G) hold, per row and group, a value and its
    in-group position; the dense slice of the weight at in-group position q is selected on chip and fed to tl.dot."""
    for q in tl.static_range(GROUP):
        cols = grp * GROUP + q
        x = tl.load(X + offs_n[:, None] * s_xn + cols[None, :] * s_xk, mask=n_ok & (g_ok & (cols < K))[None, :],
                    other=0.0)
        w = tl.where(p == q, v, tl.zeros_like(v))
        acc = tl.dot(x.to(v.dtype), tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _decode_nm_gather(X, V, P, Y, N, M, K, KEPT, s_xn, s_xk, s_vm, s_pm, s_yn,
                      NNZ: tl.constexpr, GROUP: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr):
    """Y (N, M) = X (N, K) @ W^T at a few tokens, N:M from compressed values: each value V[r, j] (a contiguous,
    coalesced tile of a row's kept values) meets the one input its position selects, column
    (j // NNZ) * GROUP + P[r, j], gathered from X (a few KB, served by L1/L2); one multiply-add per value and token.
    Grid: (row blocks, token blocks)."""
    pid_m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_J)
    rm = (offs_m % M).to(tl.int64)  # rows past the end wrap (valid addresses, dropped at the store)
    n_ok = (offs_n < N)[:, None, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for j0 in range(0, KEPT, BLOCK_J):
        j = j0 + offs_j
        j_ok = (j < KEPT)[None, :]
        v = tl.load(V + rm[:, None] * s_vm + j[None, :], mask=j_ok, other=0.0)
        p = tl.load(P + rm[:, None] * s_pm + j[None, :], mask=j_ok, other=0).to(tl.int32)
        col = (j // NNZ)[None, :] * GROUP + p
        ok = n_ok & (j_ok & (col < K))[None, :, :]  # (columns past K: the zero padding of the last group)
        x = tl.load(X + offs_n[:, None, None] * s_xn + col[None, :, :] * s_xk, mask=ok, other=0.0)
        x = x.to(v.dtype).to(tl.float32)  # (as the reference: the input rounded to the weight's dtype)
        acc += tl.sum(x * v.to(tl.float32)[None, :, :], axis=2)
    tl.store(Y + offs_n[:, None] * s_yn + offs_m[None, :], acc.to(Y.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (offs_m[None, :] < M))


@triton.jit
def _decode_nm(X, V, P, Y, N, M, K, G, s_xn, s_xk, s_vm, s_pm, s_yn,
               NNZ: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """Y (N, M) = X (N, K) @ W^T with W (M, G*GROUP) N:M sparse: row r keeps, in each group g of GROUP inputs, NNZ
    values V[r, g*NNZ + i] at in-group positions P[r, g*NNZ + i] (inputs past K are zero padding). Grid: (row
    blocks, token blocks). Each value and position is loaded once per token block."""
    pid_m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_g = tl.arange(0, BLOCK_G)
    rm = (offs_m % M).to(tl.int64)
    n_ok = offs_n[:, None] < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        grp = g0 + offs_g
        g_ok = grp < G
        for i in tl.static_range(NNZ):  # slot by slot (value i of every group: a strided tile, L1 serves the rest)
            v = tl.load(V + rm[:, None] * s_vm + (grp * NNZ + i)[None, :], mask=g_ok[None, :], other=0.0)
            p = tl.load(P + rm[:, None] * s_pm + (grp * NNZ + i)[None, :], mask=g_ok[None, :], other=255)
            acc = _nm_slot(acc, v, p.to(tl.int32), X, offs_n, n_ok, grp, g_ok, K, s_xn, s_xk, GROUP, PRECISION)
    tl.store(Y + offs_n[:, None] * s_yn + offs_m[None, :], acc.to(Y.dtype.element_ty),
             mask=n_ok & (offs_m[None, :] < M))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # (triton.cdiv is a jit function: ~10 us per host call, paid on every decode call)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=16)
def _sms(device_type: str, index: int | None) -> int:
    if device_type != "cuda":
        return 4  # the interpreter: a few programs, as on a small GPU
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    return _sms(device.type, device.index)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"  # only where torch's own fp32 matmul would use TF32 too
    return "ieee" if dtype == torch.float32 else "tf32"  # (ignored for 16-bit inputs)


def _block_n(n: int) -> int:
    return max(16, _pow2(max(n, 1)))


def use_dot(n: int) -> bool:
    """N:M: tensor-core tiles above SMALL_TOKENS tokens, the gather kernel at or below."""
    return n > SMALL_TOKENS[0]


def plan_gemv(n: int, groups: int, M: int, K: int, device: torch.device, split_ok: bool) -> dict:
    """Tile sizes and the number of K splits: enough programs to keep every SM streaming weight (cached per shape:
    few-token calls are host-bound)."""
    return _plan(n, groups, M, K, device.type, device.index, split_ok)


@functools.lru_cache(maxsize=4096)
def _plan(n: int, groups: int, M: int, K: int, device_type: str, index: int | None, split_ok: bool) -> dict:
    target = TARGET_PROGRAMS * _sms(device_type, index)
    block_k = 16 if INTERPRET else (BLOCK_K_LARGE[0] if K >= 2048 else 128)
    block_m = 16
    for bm in (64, 32):  # the largest row block that still leaves enough programs
        if not INTERPRET and groups * _cdiv(M, bm) >= target:
            block_m = bm
            break
    programs = groups * _cdiv(M, block_m)
    splits = 1
    if split_ok:
        while programs * splits * 2 <= target and K // (splits * 2) >= max(block_k, 512 if not INTERPRET else 16):
            splits *= 2
    split_len = _cdiv(_cdiv(K, splits), block_k) * block_k
    splits = _cdiv(K, split_len)
    return dict(BLOCK_N=_block_n(n), BLOCK_M=block_m, BLOCK_K=block_k, splits=splits, split_len=split_len)


def gemv_launcher(groups: int, n: int, M: int, K: int, plan: dict, dtype: torch.dtype, a_partials: int = 1,
                  a_partial_stride: int = 0, chunk: int = 0, chunk_stride: int = 0, c_split_stride: int = 0):
    """The launch of ``C[g] = A[g] @ W[g]^T`` for one shape, worked out once: ``launch(a, a_strides, w, w_strides, c,
    c_strides)`` (strides: A (group, token, k), W (group, row, k), C (group, token, column)); ``plan`` from
    :func:`plan_gemv` (with splits > 1, C is the fp32 partial stack). A layer's cached inference plan keeps it."""
    m_blocks = _cdiv(M, plan["BLOCK_M"])
    kernel = _decode_gemv[(groups * m_blocks, plan["splits"])]
    meta = dict(BLOCK_N=plan["BLOCK_N"], BLOCK_M=plan["BLOCK_M"], BLOCK_K=plan["BLOCK_K"], **GEMV_META)
    fixed = None if dtype == torch.float32 else _precision(dtype)  # (fp32 follows allow_tf32 at call time)
    if n == 0 or M == 0 or groups == 0:
        return lambda a, a_strides, w, w_strides, c, c_strides: None

    def launch(a: Tensor, a_strides: tuple, w: Tensor, w_strides: tuple, c: Tensor, c_strides: tuple) -> None:
        kernel(a, w, c, n, M, K, a_partials, plan["split_len"], m_blocks, a_partial_stride, *a_strides, *w_strides,
               c_split_stride, *c_strides, chunk_stride, chunk, PRECISION=fixed or _precision(w.dtype), **meta)

    return launch


def decode_gemv(a: Tensor, a_strides: tuple, w: Tensor, w_strides: tuple, c: Tensor, c_strides: tuple, groups: int,
                n: int, M: int, K: int, plan: dict, a_partials: int = 1, a_partial_stride: int = 0,
                chunk: int = 0, chunk_stride: int = 0, c_split_stride: int = 0) -> Tensor:
    """Launch ``C[g] = A[g] @ W[g]^T`` over ``groups`` (see :func:`gemv_launcher`)."""
    gemv_launcher(groups, n, M, K, plan, w.dtype, a_partials, a_partial_stride, chunk, chunk_stride,
                  c_split_stride)(a, a_strides, w, w_strides, c, c_strides)
    return c


@functools.lru_cache(maxsize=1024)
def _plan_nm(n: int, M: int, G: int, device_type: str, index: int | None, dot: bool) -> dict:
    target = TARGET_PROGRAMS * _sms(device_type, index)
    if not dot:  # the gather kernel: all tokens in one block, rows spread over as many programs as it takes
        block_n = _pow2(max(n, 1))
        if INTERPRET:
            return dict(BLOCK_N=block_n, BLOCK_M=8, BLOCK_J=16)
        block_m = 4
        for bm in (32, 16, 8):
            if _cdiv(M, bm) >= target:
                block_m = bm
                break
        return dict(BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_J=max(64, 256 // block_n))
    # tensor-core tiles of 16 tokens (larger token tiles gave wrong sums and an illegal address on the H200 with
    # Triton 3.6 at 33-64 tokens; more tokens are more token blocks, whose weight re-reads come mostly from L2)
    if INTERPRET:
        return dict(BLOCK_N=16, BLOCK_M=16, BLOCK_G=16)
    block_m = 16
    for bm in (64, 32):
        if _cdiv(M, bm) >= target:
            block_m = bm
            break
    return dict(BLOCK_N=16, BLOCK_M=block_m, BLOCK_G=64)


def nm_launcher(N: int, M: int, K: int, kept: int, n_keep: int, group: int, device: torch.device,
                dtype: torch.dtype):
    """The N:M launch for one shape, worked out once: ``launch(x, values, positions, y)``."""
    dot = use_dot(N)
    plan = _plan_nm(N, M, kept // n_keep, device.type, device.index, dot)
    grid = (_cdiv(M, plan["BLOCK_M"]), _cdiv(N, plan["BLOCK_N"]))
    if N == 0 or M == 0:
        return lambda x, values, positions, y: None
    if not dot:
        kernel = _decode_nm_gather[grid]

        def launch(x: Tensor, values: Tensor, positions: Tensor, y: Tensor) -> None:
            kernel(x, values, positions, y, N, M, K, kept, x.stride(0), x.stride(1), values.stride(0),
                   positions.stride(0), y.stride(0), NNZ=n_keep, GROUP=group, num_warps=4, num_stages=3, **plan)

        return launch
    kernel = _decode_nm[grid]
    fixed = None if dtype == torch.float32 else _precision(dtype)

    def launch(x: Tensor, values: Tensor, positions: Tensor, y: Tensor) -> None:  # noqa: F811
        kernel(x, values, positions, y, N, M, K, kept // n_keep, x.stride(0), x.stride(1), values.stride(0),
               positions.stride(0), y.stride(0), NNZ=n_keep, GROUP=group, PRECISION=fixed or _precision(x.dtype),
               num_warps=4, num_stages=3, **plan)

    return launch


def decode_nm(x: Tensor, values: Tensor, positions: Tensor, y: Tensor, n_keep: int, group: int) -> Tensor:
    """``y = x @ W^T`` for the N:M weight stored as ``values`` / ``positions`` (out, groups*n_keep); x (N, K)."""
    N, K = x.shape
    nm_launcher(N, values.shape[0], K, values.shape[1], n_keep, group, x.device, x.dtype)(x, values, positions, y)
    return y
