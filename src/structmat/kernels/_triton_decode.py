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
    next stage: no atomics, no memset, no extra launch), or (``REDUCE``) summed by the last split of each tile to
    arrive (``_finish``), which stores C itself: above one token the next stage then reads one intermediate, not
    splits x tokens partials;
  * the output column may be chunked (Monarch's permutation folded into the store, as in ``_triton_gemm``).
``_pdl_stage2_dot``: above one token (up to 16), low-rank's second stage launched early by programmatic dependent
launch after the gemv first stage (``REDUCE``): its weight tile loaded, then it waits for the first stage's grid.
``decode_nm``: N:M sparse from compressed values and packed in-group positions, each read once; the dense weight is
never formed in memory (at one token each value meets the input its position selects, ``_decode_nm_row``, a gated
MLP's input formed first by ``_gate_rows``; 2:4 of 16-bit values at 1-2 tokens picks its inputs by byte permutes,
``_decode_nm24_row``, and at 3-32 tokens runs on the sparse tensor cores, ``_gluon_nm24``; with more tokens each
program expands its tile of values into the dense tile on chip and feeds it to ``tl.dot``, ``_decode_nm``).
Accumulation is fp32 everywhere.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..structures.sparse import position_bits
from ._launch import Launch, LaunchCache

try:  # (Gluon, Triton's language with explicit layouts: Triton >= 3.4)
    from . import _gluon_nm24
except ImportError:  # pragma: no cover - depends on the installed Triton
    _gluon_nm24 = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # (small tile plans; tests may switch it)
RUNS_IN_INTERPRETER = INTERPRET  # (no PTX: inline assembly takes its portable form)
MAX_TOKENS = 64  # the kernels keep all tokens in one tile
TARGET_PROGRAMS = 4  # programs per SM to aim for: enough bytes in flight to stream HBM
#: The gemv kernel's launch options and its reduction tile at K >= 2048 and below (module-level so a benchmark can sweep
#: them; a layer's plan reads them when it is made)
GEMV_META = {"num_warps": 4, "num_stages": 4}
SMEM_BUDGET = 160 * 1024  # bytes of pipelined operand tiles per program (the H100/H200 allow 227 KB in all)
BLOCK_K_LARGE = [256]
BLOCK_K_SMALL = [128]  # (and always with ``act``: the gated input's second tile in registers)
#: Up to this many tokens the N:M kernel gathers, per value, the one input its position selects (``_decode_nm_row``: one
#: multiply-add per value and token, values read as contiguous row tiles); above, the expanded-tile kernel
#: (``_decode_nm``; a one-element list so a benchmark can compare both). Measured on the H200 (cold, bench shapes
#: 2048x2048 / 2048->8192 / 8192->2048): at one token the row kernel 4.7 / 10.8 / 10.6 us against the tile's 7.8 /
#: 17.4 / 19.6 (decode-layers-20261204T123941Z.json); at two tokens session 10's gather kernel, which the row kernel
#: replaced, took 9.4 / 17.4 / 32.6 against 7.8 / 17.8 / 19.7 (decode-layers-20261204T092922Z.json).
SMALL_TOKENS = [1]
#: The expanded-tile N:M kernel's (``_decode_nm``) largest token tile, dense tile width and launch options (lists and a
#: dict so a benchmark can sweep them)
NM_BLOCK_N = [64]  # (up to 64 tokens in one tile: 16-token tiles expanded the same values once per 16 tokens, 1.6-2.6x
#                     slower at 32-64 tokens, decode-layers-20261204T100319Z.json)
NM_TILE_K = [128]  # (256 and 512 measured 10-40% slower at 1-64 tokens: the expansion is register-bound)
NM_META = {"num_warps": 4, "num_stages": 3}
NM_PAIR = [True]  # 2:4 takes the kernel's pair form (``_decode_nm``)
NM_MAX_SPLITS = [16]  # K splits of one tile (1: none)
NM_BLOCK_M = [0]  # row block (0: chosen by the plan)
NM_MIN_SPLIT_TILES = [2]  # dense tiles per split, at least
#: Programs per SM the expanded-tile kernel aims at (row blocks x token blocks x splits; TARGET_PROGRAMS for it until
#: session 12), and the warps of a program whose token tile is 16 rows (up to 16 tokens; NM_META's for wider tiles).
#: The kernel's time is neither its bytes nor its instructions: the three bench shapes (8M kept values each) took
#: 15.5-17.4 us at 2-16 tokens whatever their tiles, the weight in L2 or not, at ~1.2 instructions a cycle per SM
#: (the loop: 156 SASS instructions for 8 values a thread, two barriers). Session 12 round 3 (H200, cold, bench
#: shapes, 16 tokens, decode-layers-20261204T141053Z.json): 4 warps with 4 programs per SM 8.0 / 17.4 / 19.8 us, with
#: 8 / 16: 9.7 / 21.1 / 21.2 and 9.8 / 20.7 / 20.7; 2 warps with 8: 7.2 / 15.5 / 15.5, with 16: 7.2 / 16.9 / 17.1
#: (A gated down product, ``act``, keeps 4 warps: its 32-row blocks spilled with 2.)
NM_TARGET_PROGRAMS = [8]  # (with NM_SMALL_WARPS; wider token tiles and ``act``: TARGET_PROGRAMS, with NM_META)
NM_SMALL_WARPS = [2]
#: The one-token N:M kernel's (``_decode_nm_row``) row block, values per row and iteration (0: 512 where a row keeps
#: at least 4096 values, else 256), warps, most splits of the values, tiles per split, and whether the next tile's
#: loads are issued before this tile's gathers. Session 11 round 3 (H200, cold, bench shapes, us; dense 6.0 / 10.7 /
#: 13.7): rows 16 at a time 8.2 / 13.4 / 15.5, 8: 6.1 / 11.5 / 12.5, 4: 4.8 / 10.8 / 12.1, 4 with 512 values 4.7 /
#: 12.6 / 10.6 (decode-layers-20261204T123411Z.json): short row blocks keep more programs' gathers in flight
NM_ROW_BLOCK_M = [4]
NM_ROW_BLOCK_J = [0]
NM_ROW_WARPS = [4]
NM_ROW_MAX_SPLITS = [8]
NM_ROW_MIN_SPLIT_TILES = [1]
NM_ROW_PREFETCH = [True]
#: 2:4 of 16-bit values at one token takes ``_decode_nm24_row`` (inputs picked by byte permutes, no gathers) instead
#: of the row kernel
NM24_ROW = [os.environ.get("STRUCTMAT_NM24_ROW", "1") not in ("", "0")]
#: and above one token expands its tiles by byte permutes (``_expand_pair``) instead of compares and selects
NM24_PERMUTE = [os.environ.get("STRUCTMAT_NM24_PERMUTE", "1") not in ("", "0")]
#: Up to this many tokens the byte-permute kernel takes them all in one program (each group's selector formed once,
#: its inputs picked for every token), above them the expanded-tile kernel. Session 15 round 4 (H200, cold, us at
#: 2048^2 / 2048->8192 / 8192->2048; dense 6.1 / 10.5 / 13.5; decode-layers-20261204T191509Z.json): 2 tokens 5.0 /
#: 12.7 / 12.2 against the expanded tile's 7.2 / 16.7 / 17.2; 4 tokens (one program of 4) 6.5 / 18.8 / 16.3
#: against 7.3 / 17.1 / 17.2: faster at two shapes, slower at the third, so 3-4 tokens keep the expanded tile
NM24_ROW_TOKENS = [2]
#: 2:4 of 16-bit values at a few tokens (NM24_SP_TOKENS), where the GPU has sparse tensor cores (sm_80+): the
#: stored values and codes are ``mma.sp``'s operands as they are (``_gluon_nm24``), nothing expanded; NM24_SP_WARPS
#: warps a program, each a share of the reduction (0: 4 where the row tiles alone fill the GPU twice, else 8, as
#: measured: 9.7 vs 12.2 us at 2048->8192, 11.8 vs 16.2 at 8192->2048, 4 tokens; a gated input, ``act``, is formed
#: first by ``_gate_rows``)
NM24_SP = [os.environ.get("STRUCTMAT_NM24_SP", "1") not in ("", "0") and _gluon_nm24 is not None]
NM24_SP_WARPS = [0]
#: Tokens it takes: 3-32 (H200, bf16, cold, us at 2048^2 / 2048->8192 / 8192->2048; dense 6.1 / 10.6 / 13.7):
#: 4 tokens 5.3 / 8.9 / 11.7 against the expanded tile's 7.4 / 16.9 / 17.0; 8 tokens 5.7 / 10.7 / 12.4 against 7.6 /
#: 17.0 / 17.1; 16 tokens 7.4 / 11.0 / 14.2 against 7.8 / 17.0 / 17.1; 32 tokens 8.4 / 17.7 / 16.3 against 8.1 /
#: 18.0 / 19.9 (session 16 round 4, decode-layers-20261204T203010Z.json). Two tokens where the weight holds at
#: least NM24_SP_PAIR_ELEMENTS weights: 8.8 / 11.6 us against the byte-permute kernel's 12.6 / 12.1 (at 2048^2 5.4
#: vs 5.0; round 2, decode-layers-20261204T201318Z.json)
NM24_SP_TOKENS = [(3, 32)]
NM24_SP_PAIR_ELEMENTS = [1 << 24]
#: 64-wide blocks a warp keeps in flight (2; 4 measured slower, 12.8 vs 9.8 us at 2048->8192 and 4 tokens), and
#: tokens a program takes (16: two n8 tiles sharing the values and codes; 8: one, measured slower at 16-32 tokens)
NM24_SP_DEPTH = [2]
NM24_SP_TOKEN_BLOCK = [16]
#: From NM24_SP_PREP_TOKENS tokens on the inputs are put in fragment order first (``_gluon_nm24._input_fragments``,
#: one small launch), so that each lane loads an mma's inputs as one 16-byte run instead of four 4-byte loads from
#: eight token rows: at 16 tokens 7.4 / 11.0 / 14.2 us against 7.8 / 17.0 / 17.1 without; at 4 tokens the launch
#: costs more than it saves (6.3 / 9.5 / 12.8 against 5.3 / 8.9 / 11.7)
NM24_SP_PREP = [True]
NM24_SP_PREP_TOKENS = [9]
#: The error, where the sparse-tensor-core kernel failed to build with this machine's Triton (Gluon is young; it
#: builds with Triton 3.6 and 3.9): NM24_SP is then switched off, with a warning, and 2:4 takes the kernels above
SPARSE_MMA_ERROR: list = [None]
#: A gated MLP's down product at one token (``act``): form SiLU(gate) * up once, in a small kernel of its own
#: (``_gate_rows``, into the plan's scratch), and run the row kernel on it, instead of forming it inside the row
#: kernel for every value it gathers (once per kept value, SiLU's exp and division each time)
NM_ROW_GATE_FIRST = [os.environ.get("STRUCTMAT_NM_GATE_FIRST", "1") not in ("", "0")]
#: ... except in eager calls (not captured, not traced), which form it inside the row kernel: one launch where the
#: gate-first form takes two. Eager decode is host-bound (the GPU idles between launches, so the slower kernel is
#: hidden, while a launch costs the host ~10 us on the lent machines), as EAGER_ONE_GRID for the two-stage products
EAGER_GATE_IN_ROW = [True]


@triton.jit
def _gated(g, u):
    """SiLU(g) * u in fp32, rounded once to the input's dtype: a gated MLP's hidden vector (``ACT``: the down
    product reads the gate/up product's output, gate and up side by side, and forms its input on load)."""
    gf = g.to(tl.float32)
    return (gf / (1.0 + tl.exp(-gf)) * u.to(tl.float32)).to(g.dtype)


@triton.jit
def _decode_gemv(A, W, C, T, CNT, N, M, K, S_A, SPLIT_LEN, M_BLOCKS,
                 s_as, s_ag, s_an, s_ak, s_wg, s_wm, s_wk, s_cs, s_cg, s_cn, s_cm, s_cchunk, CHUNK, ACT_OFF,
                 PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 ACT: tl.constexpr, REDUCE: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # the first stage of a PDL-joined pair (``pdl_dot_launcher``): let the second stage's grid start now
        gdc_launch_dependents()
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
        a = tl.load(a_ptrs, mask=n_ok & k_ok[None, :], other=0.0)
        if ACT:  # (S_A is 1: the input is a gate/up output, not partials)
            a = _gated(a, tl.load(a_ptrs + ACT_OFF, mask=n_ok & k_ok[None, :], other=0.0))
        a = a.to(tl.float32)
        for t in range(1, S_A):  # the previous stage's split-K partials
            a += tl.load(a_ptrs + t * s_as, mask=n_ok & k_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(a.to(w.dtype), tl.trans(w), acc, input_precision=PRECISION)
        w_ptrs += BLOCK_K * s_wk
        a_ptrs += BLOCK_K * s_ak
    if CHUNK == 0:
        col = offs_m * s_cm
    else:
        col = (offs_m // CHUNK) * s_cchunk + (offs_m % CHUNK) * s_cm
    c_off = g * s_cg + offs_n[:, None] * s_cn + col[None, :]
    if REDUCE == 1:
        tl.store(C + split * s_cs + c_off, acc.to(C.dtype.element_ty), mask=n_ok & (offs_m[None, :] < M))
    else:  # the splits summed here (the last to arrive): C is the product itself, in its dtype
        gm = (tl.num_programs(0) // M_BLOCKS) * M
        _finish(acc, C, T, CNT, pid, split, c_off, offs_n[:, None] * gm + g * M + offs_m[None, :],
                n_ok & (offs_m[None, :] < M), N * gm, REDUCE)


@triton.jit
def _fused_stage1(X, W1, T, M1, K1, M1_BLOCKS, tile, s_xg, s_xk, s_w1g, s_w1m, s_w1k, s_ts, s_tg, s_tm, s_tchunk,
                  CHUNK1, ACT_OFF, S1: tl.constexpr, K1_ITERS: tl.constexpr, BM1: tl.constexpr, BK1: tl.constexpr,
                  ACT: tl.constexpr):
    """Stage-1 tile ``tile``: T[split][g][m] = X[g][split's K range] . W1[g][m, same], an fp32 partial; a
    multiply-reduce on the CUDA cores (one token: nothing to pad to tl.dot's 16 rows)."""
    split = tile % S1
    rest = tile // S1
    g = (rest // M1_BLOCKS).to(tl.int64)
    offs_m = (rest % M1_BLOCKS) * BM1 + tl.arange(0, BM1)
    rm = offs_m % M1  # rows past the end wrap (valid addresses, dropped at the store)
    acc = tl.zeros((BM1,), dtype=tl.float32)
    for i in tl.static_range(K1_ITERS):  # unrolled: every load of the tile is issued before the first product
        offs_k = split * (K1_ITERS * BK1) + i * BK1 + tl.arange(0, BK1)
        k_ok = offs_k < K1
        w = tl.load(W1 + g * s_w1g + rm[:, None] * s_w1m + offs_k[None, :] * s_w1k, mask=k_ok[None, :], other=0.0)
        a = tl.load(X + g * s_xg + offs_k * s_xk, mask=k_ok, other=0.0)
        if ACT:
            a = _gated(a, tl.load(X + g * s_xg + offs_k * s_xk + ACT_OFF, mask=k_ok, other=0.0))
        a = a.to(w.dtype)  # (as the reference rounds it)
        acc += tl.sum(w.to(tl.float32) * a.to(tl.float32)[None, :], axis=1)
    if CHUNK1 == 0:
        col = offs_m * s_tm
    else:
        col = (offs_m // CHUNK1) * s_tchunk + (offs_m % CHUNK1) * s_tm
    tl.store(T + split * s_ts + g * s_tg + col, acc, mask=offs_m < M1)


@triton.jit
def _fused_stage2(T, W2, Y, SYNC, M2, K2, M2_BLOCKS, P1, tile, s_ts, s_ag, s_ak, s_w2g, s_w2m, s_w2k, s_yg, s_ym,
                  S1: tl.constexpr, K2_ITERS: tl.constexpr, BM2: tl.constexpr, BK2: tl.constexpr,
                  SPIN_LOAD: tl.constexpr, WAIT: tl.constexpr):
    """Stage-2 tile ``tile``: load the first weight tile, wait for stage 1, then Y[g][m] =
    round(sum_split T[split][g]) . W2[g][m, :] (the partials rounded once to the weight's dtype, as the reference
    rounds its intermediate; read with .cg, straight from L2 where stage 1 stored them). WAIT: 0 the P1 arrivals on
    SYNC (one grid), 1 the stage-1 grid's completion (programmatic dependent launch: ``gdc_wait``), 2 nothing (a
    plain second launch, the interpreter's form of 1)."""
    g = (tile // M2_BLOCKS).to(tl.int64)
    offs_m = (tile % M2_BLOCKS) * BM2 + tl.arange(0, BM2)
    rows = W2 + g * s_w2g + (offs_m % M2)[:, None] * s_w2m
    offs_k = tl.arange(0, BK2)
    w_first = tl.load(rows + offs_k[None, :] * s_w2k, mask=(offs_k < K2)[None, :], other=0.0)
    if WAIT == 1:
        gdc_wait()
    elif WAIT == 0:
        if SPIN_LOAD:  # poll with plain volatile loads (no atomic traffic on the counter), then one acquire
            while tl.load(SYNC + 1, volatile=True) < P1:
                pass
            tl.atomic_add(SYNC + 1, 0, sem="acquire")
        else:
            while tl.atomic_add(SYNC + 1, 0, sem="acquire") < P1:
                pass
    acc = tl.zeros((BM2,), dtype=tl.float32)
    for i in tl.static_range(K2_ITERS):
        offs_k = i * BK2 + tl.arange(0, BK2)
        k_ok = offs_k < K2
        if i == 0:
            w = w_first
        else:
            w = tl.load(rows + offs_k[None, :] * s_w2k, mask=k_ok[None, :], other=0.0)
        h = tl.zeros((BK2,), dtype=tl.float32)
        for sp in tl.static_range(S1):
            h += tl.load(T + sp * s_ts + g * s_ag + offs_k * s_ak, mask=k_ok, other=0.0, cache_modifier=".cg")
        acc += tl.sum(w.to(tl.float32) * h.to(w.dtype).to(tl.float32)[None, :], axis=1)
    tl.store(Y + g * s_yg + offs_m * s_ym, acc.to(Y.dtype.element_ty), mask=offs_m < M2)


@triton.jit
def _decode_fused(X, W1, T, W2, Y, SYNC, M1, K1, M1_BLOCKS, P1, M2, K2, M2_BLOCKS, P2,
                  s_xg, s_xk, s_w1g, s_w1m, s_w1k, s_ts, s_tg, s_tm, s_tchunk, CHUNK1,
                  s_ag, s_ak, s_w2g, s_w2m, s_w2k, s_yg, s_ym, ACT_OFF,
                  S1: tl.constexpr, K1_ITERS: tl.constexpr, K2_ITERS: tl.constexpr,
                  BM1: tl.constexpr, BK1: tl.constexpr, BM2: tl.constexpr, BK2: tl.constexpr,
                  SPIN_LOAD: tl.constexpr, ACT: tl.constexpr):
    """One launch for a whole two-stage product of ONE token (low-rank, Monarch), each tile loaded in one go.

    Stage 1 (``_fused_stage1``, P1 tiles): fp32 partials of ``x . W1`` over K splits (the column may be chunked:
    Monarch's permutation). Stage 2 (``_fused_stage2``, P2 tiles): the summed partials . ``W2``.
    The two stages run in ONE grid: a program takes a ticket in the order programs start (every lower ticket is
    already running or done, so waiting on lower tickets cannot deadlock, however many programs fit on the GPU);
    tickets below P1 are stage-1 tiles, the rest stage-2 tiles, which load their weight tile first (the bytes that
    matter stream while stage 1 runs) and then wait for the P1 arrivals. The last stage-2 program resets SYNC
    (ticket, arrivals, departures) to zero for the next call on the stream."""
    ticket = tl.atomic_add(SYNC, 1)
    if ticket < P1:
        _fused_stage1(X, W1, T, M1, K1, M1_BLOCKS, ticket, s_xg, s_xk, s_w1g, s_w1m, s_w1k, s_ts, s_tg, s_tm,
                      s_tchunk, CHUNK1, ACT_OFF, S1, K1_ITERS, BM1, BK1, ACT)
        tl.debug_barrier()  # every thread's stores of the tile, then one release of the arrival
        tl.atomic_add(SYNC + 1, 1, sem="release")
    else:
        _fused_stage2(T, W2, Y, SYNC, M2, K2, M2_BLOCKS, P1, ticket - P1, s_ts, s_ag, s_ak, s_w2g, s_w2m, s_w2k,
                      s_yg, s_ym, S1, K2_ITERS, BM2, BK2, SPIN_LOAD, 0)
        if tl.atomic_add(SYNC + 2, 1) == P2 - 1:  # the last program: every ticket was taken, every arrival seen
            tl.atomic_xchg(SYNC, 0)
            tl.atomic_xchg(SYNC + 1, 0)
            tl.atomic_xchg(SYNC + 2, 0)


@triton.jit
def _pdl_stage1(X, W1, T, M1, K1, M1_BLOCKS, s_xg, s_xk, s_w1g, s_w1m, s_w1k, s_ts, s_tg, s_tm, s_tchunk, CHUNK1,
                ACT_OFF, S1: tl.constexpr, K1_ITERS: tl.constexpr, BM1: tl.constexpr, BK1: tl.constexpr,
                PDL: tl.constexpr, ACT: tl.constexpr):
    """Stage 1 of the two-launch form with programmatic dependent launch: each program lets the stage-2 grid start
    (its programs load their weight tiles while this grid runs), then computes its tile as ``_fused_stage1``."""
    if PDL:
        gdc_launch_dependents()
    _fused_stage1(X, W1, T, M1, K1, M1_BLOCKS, tl.program_id(0), s_xg, s_xk, s_w1g, s_w1m, s_w1k, s_ts, s_tg, s_tm,
                  s_tchunk, CHUNK1, ACT_OFF, S1, K1_ITERS, BM1, BK1, ACT)


@triton.jit
def _pdl_stage2(T, W2, Y, M2, K2, M2_BLOCKS, s_ts, s_ag, s_ak, s_w2g, s_w2m, s_w2k, s_yg, s_ym,
                S1: tl.constexpr, K2_ITERS: tl.constexpr, BM2: tl.constexpr, BK2: tl.constexpr, WAIT: tl.constexpr):
    """Stage 2 of that form: ``_fused_stage2`` waiting on the stage-1 grid's completion (WAIT 1; 2 in the
    interpreter, whose launches run one after the other) instead of counters."""
    _fused_stage2(T, W2, Y, T, M2, K2, M2_BLOCKS, 0, tl.program_id(0), s_ts, s_ag, s_ak, s_w2g, s_w2m, s_w2k, s_yg,
                  s_ym, S1, K2_ITERS, BM2, BK2, False, WAIT)


@triton.jit
def _pdl_stage2_dot(H, W2, Y, N, M2, K2, M2_BLOCKS, s_hg, s_hn, s_hk, s_w2g, s_w2m, s_w2k, s_yg, s_yn, s_ym,
                    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, K2_ITERS: tl.constexpr, BM2: tl.constexpr,
                    BK2: tl.constexpr, WAIT: tl.constexpr):
    """Above one token, the second stage of a PDL-joined pair: Y[g] (N, M2) = H[g] (N, K2) @ W2[g]^T, H the first
    stage's intermediate (the gemv kernel's ``REDUCE`` output, in the weight's dtype). The first weight tile is loaded
    before waiting for the first stage's grid (WAIT 1; 2 in the interpreter, whose launches run one after the
    other), so the bytes that matter stream while the first stage runs."""
    tile = tl.program_id(0)
    g = (tile // M2_BLOCKS).to(tl.int64)
    offs_m = (tile % M2_BLOCKS) * BM2 + tl.arange(0, BM2)
    rows = W2 + g * s_w2g + (offs_m % M2)[:, None] * s_w2m  # (rows past the end wrap: dropped at the store)
    offs_k = tl.arange(0, BK2)
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = (offs_n < N)[:, None]
    w_first = tl.load(rows + offs_k[None, :] * s_w2k, mask=(offs_k < K2)[None, :], other=0.0)
    if WAIT == 1:
        gdc_wait()
    acc = tl.zeros((BLOCK_N, BM2), dtype=tl.float32)
    for i in tl.static_range(K2_ITERS):
        k = i * BK2 + offs_k
        k_ok = (k < K2)[None, :]
        if i == 0:
            w = w_first
        else:
            w = tl.load(rows + k[None, :] * s_w2k, mask=k_ok, other=0.0)
        a = tl.load(H + g * s_hg + offs_n[:, None] * s_hn + k[None, :] * s_hk, mask=n_ok & k_ok, other=0.0)
        acc = tl.dot(a.to(w.dtype), tl.trans(w), acc, input_precision=PRECISION)
    tl.store(Y + g * s_yg + offs_n[:, None] * s_yn + offs_m[None, :] * s_ym, acc.to(Y.dtype.element_ty),
             mask=n_ok & (offs_m < M2)[None, :])


@triton.jit
def _finish(acc, Y, T, CNT, tile, split, y_off, t_off, out_ok, SPLIT_STRIDE, SPLITS: tl.constexpr):
    """Store a program's fp32 result ``acc`` at ``Y + y_off``; with SPLITS > 1 it is the partial of reduction split
    ``split``: stored at ``T + split * SPLIT_STRIDE + t_off``, and the last of the tile's splits to arrive (counter
    CNT[tile], reset by it) sums the partials in split order and stores Y (one launch, deterministic)."""
    if SPLITS == 1:
        tl.store(Y + y_off, acc.to(Y.dtype.element_ty), mask=out_ok)
    else:
        tl.store(T + split * SPLIT_STRIDE + t_off, acc, mask=out_ok)
        tl.debug_barrier()  # every thread's partial stored, then one release of the arrival
        if tl.atomic_add(CNT + tile, 1, sem="acq_rel") == SPLITS - 1:  # the last split: every partial is visible
            total = tl.zeros_like(acc)
            for sp in tl.static_range(SPLITS):
                total += tl.load(T + sp * SPLIT_STRIDE + t_off, mask=out_ok, other=0.0, cache_modifier=".cg")
            tl.store(Y + y_off, total.to(Y.dtype.element_ty), mask=out_ok)
            tl.atomic_xchg(CNT + tile, 0)


@triton.jit
def _unpack(packed, j, PBITS: tl.constexpr):
    """Position j from its byte ``packed`` (``structures.sparse.pack_positions``: PBITS bits each, low bits first)."""
    if PBITS == 8:
        return packed
    else:
        return ((packed >> ((j % (8 // PBITS)) * PBITS).to(tl.uint8)) & ((1 << PBITS) - 1)).to(tl.uint8)


@triton.jit
def _unpack_tile(b, PBITS: tl.constexpr):
    """A (rows, w) tile of packed bytes -> the (rows, w * 8 // PBITS) positions they hold, in order: the bytes are
    loaded as contiguous vectors and split in registers (a load per position cost 1.7x the SASS)."""
    if PBITS == 8:
        return b
    elif PBITS == 4:
        return tl.reshape(tl.join(b & 15, b >> 4), (b.shape[0], b.shape[1] * 2))
    else:  # positions 4i + 2c + d: join over c, then d (join appends the innermost dimension)
        return tl.reshape(tl.join(tl.join(b & 3, (b >> 4) & 3), tl.join((b >> 2) & 3, b >> 6)),
                          (b.shape[0], b.shape[1] * 4))


@triton.jit
def _nm_row_tile(V, P, rm, s_vm, s_pm, j0, j_end, EXACT: tl.constexpr, PBITS: tl.constexpr,
                 BLOCK_J: tl.constexpr):
    """Values j0 .. j0 + BLOCK_J - 1 (j0 at a whole byte of positions) of rows rm and their positions, as two tiles of
    one shape (so that positions, values and the gathered inputs share one register layout)."""
    j = j0 + tl.arange(0, BLOCK_J)
    v_ptrs = V + rm[:, None] * s_vm + j[None, :]
    jb = j0 // (8 // PBITS) + tl.arange(0, BLOCK_J * PBITS // 8)
    p_ptrs = P + rm[:, None] * s_pm + jb[None, :]
    if EXACT:
        return tl.load(v_ptrs), _unpack_tile(tl.load(p_ptrs), PBITS)
    ok = (j < j_end)[None, :]
    b = tl.load(p_ptrs, mask=(jb * (8 // PBITS) < j_end)[None, :], other=0)
    return tl.load(v_ptrs, mask=ok, other=0.0), _unpack_tile(b, PBITS)


@triton.jit
def _decode_nm_row(X, V, P, Y, T, CNT, N, M, K, KEPT, J_SPLIT, s_xn, s_xk, s_vm, s_pm, s_yn, ACT_OFF,
                   NNZ: tl.constexpr, GROUP: tl.constexpr, PBITS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_J: tl.constexpr,
                   PREFETCH: tl.constexpr, EXACT: tl.constexpr, ACT: tl.constexpr,
                   SPLITS: tl.constexpr):
    """Y (N, M) = X (N, K) @ W^T, one token per program, N:M from compressed values: each value V[r, j] (tiles of
    BLOCK_M rows x BLOCK_J contiguous values; PREFETCH: the next tile's values and positions in flight while this
    one is used) meets the one input its position selects, column (j // NNZ) * GROUP + position, gathered from the
    token's row of X (a few KB, served by L1); one multiply-add per value into a per-lane sum, reduced once at the
    end. SPLITS > 1: program (row block, token, split) reduces values [split*J_SPLIT, +J_SPLIT) (``_finish``).
    EXACT: every split a whole number of tiles and no padded group (K = groups * GROUP): no masks on the tiles'
    inputs (the prefetch stays masked: past a split's last tile it would read past the last row).
    Grid: (row blocks, tokens, splits)."""
    pid_m = tl.program_id(0)
    tok = tl.program_id(1)
    split = tl.program_id(2)
    j_start = split * J_SPLIT
    j_end = tl.minimum(KEPT, j_start + J_SPLIT)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = (offs_m % M).to(tl.int64)  # rows past the end wrap (valid addresses, dropped at the store)
    offs_j = tl.arange(0, BLOCK_J)
    x_row = X + tok.to(tl.int64) * s_xn
    acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    if PREFETCH:
        v, pk = _nm_row_tile(V, P, rm, s_vm, s_pm, j_start, j_end, EXACT, PBITS, BLOCK_J)
    for j0 in range(j_start, j_end, BLOCK_J):
        j = j0 + offs_j
        if PREFETCH:
            v_next, pk_next = _nm_row_tile(V, P, rm, s_vm, s_pm, j0 + BLOCK_J, j_end, False, PBITS, BLOCK_J)
        else:
            v, pk = _nm_row_tile(V, P, rm, s_vm, s_pm, j0, j_end, EXACT, PBITS, BLOCK_J)
        col = (j // NNZ * GROUP)[None, :] + pk.to(tl.int32)
        x_ptrs = x_row + col * s_xk
        if EXACT:
            x = tl.load(x_ptrs)
            if ACT:
                x = _gated(x, tl.load(x_ptrs + ACT_OFF))
        else:
            ok = (j < j_end)[None, :] & (col < K)  # (columns past K: the zero padding of the last group)
            x = tl.load(x_ptrs, mask=ok, other=0.0)
            if ACT:
                x = _gated(x, tl.load(x_ptrs + ACT_OFF, mask=ok, other=0.0))
        acc += x.to(v.dtype).to(tl.float32) * v.to(tl.float32)  # (as the reference: input rounded to the weight's)
        if PREFETCH:
            v, pk = v_next, pk_next
    _finish(tl.sum(acc, axis=1), Y, T, CNT, tok * tl.num_programs(0) + pid_m, split, tok * s_yn + offs_m,
            tok * M + offs_m, offs_m < M, N * M, SPLITS)


@triton.jit
def _halves(w, DT: tl.constexpr):
    """Two 16-bit floats of type DT packed in an int32 (low, high), as float32."""
    if DT == tl.bfloat16:  # (a bfloat16 is the top half of the float32 it rounds)
        return (w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True)
    else:
        return ((w & 65535).to(tl.int16).to(DT, bitcast=True).to(tl.float32),
                (w >> 16).to(tl.int16).to(DT, bitcast=True).to(tl.float32))


@triton.jit
def _pick_pair(x01, x23, code, PRMT: tl.constexpr):
    """(x[p0], x[p1]) packed in an int32, from a group's four 16-bit inputs (x0 | x1 << 16, x2 | x3 << 16) and its
    2:4 code p0 | p1 << 2: one byte permute (PTX prmt: bytes 2p0, 2p0 + 1, 2p1, 2p1 + 1 of the eight, selector
    nibbles 34 p0 + 8704 p1 + 0x1010), no gather. PRMT=False (Triton's interpreter, which runs no PTX): the same
    selection by shifts and compares."""
    if PRMT:
        sel = (code & 3) * 34 + (code >> 2) * 8704 + 0x1010
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [x01, x23, sel],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        p0 = code & 3
        p1 = code >> 2
        h0 = (tl.where(p0 < 2, x01, x23) >> ((p0 & 1) * 16)) & 65535
        h1 = (tl.where(p1 < 2, x01, x23) >> ((p1 & 1) * 16)) & 65535
        return h0 | (h1 << 16)


@triton.jit
def _nm24_tile(V32, P_rows, X32, t_ok, g0, g_end, BLOCK_G: tl.constexpr, TOKENS: tl.constexpr):
    """Groups g0 .. g0 + BLOCK_G - 1 (g0 even) of a 2:4 row block: the value pairs (rows, groups) as int32, the
    packed codes (rows, groups / 2) bytes, and the tokens' inputs as int32 pairs, (groups, 2) for one token (X32 its
    row), else (tokens, groups, 2) (X32 the tokens' rows, (tokens, 1, 1); t_ok: which are tokens); masked past
    g_end."""
    offs_g = g0 + tl.arange(0, BLOCK_G)
    offs_b = g0 // 2 + tl.arange(0, BLOCK_G // 2)
    ok = offs_g < g_end
    v = tl.load(V32 + offs_g[None, :], mask=ok[None, :], other=0)
    b = tl.load(P_rows + offs_b[None, :], mask=(offs_b * 2 < g_end)[None, :], other=0)
    if TOKENS == 1:
        xx = tl.load(X32 + (offs_g * 2)[:, None] + tl.arange(0, 2)[None, :], mask=ok[:, None], other=0)
    else:
        xx = tl.load(X32 + (offs_g * 2)[None, :, None] + tl.arange(0, 2)[None, None, :],
                     mask=t_ok[:, None, None] & ok[None, :, None], other=0)
    return v, b, xx


@triton.jit
def _decode_nm24_row(X, V, P, Y, T, CNT, N, M, G, G_SPLIT, s_xn, s_vm, s_pm, s_yn,
                     BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, TOKENS: tl.constexpr, PRMT: tl.constexpr,
                     SPLITS: tl.constexpr):
    """Y (N, M) = X (N, 4G) @ W^T for a 2:4 weight of 16-bit values (V: row r's pair for group g at V[r, 2g:2g+2],
    read as one int32; P: 2-bit positions, a code p0 | p1 << 2 per group, two groups a byte), TOKENS tokens per
    program. Each group's pair of inputs is picked from a token's four inputs of the group (loaded as two int32,
    contiguous, shared by the row block) by one byte permute (``_pick_pair``; its selector formed once per group for
    all the tokens), then both multiply-add in float32: no gathered loads (the gather kernel's per-value loads from L1
    bound it at ~1.7 TB/s at 2048->8192), each value read once for the program's tokens. The next tile's loads are
    issued before this one is used. X rows contiguous with an even row stride, V an even row stride, both 4-byte
    aligned (the launcher checks). SPLITS > 1: program (row block, token block, split) reduces groups
    [split*G_SPLIT, +G_SPLIT) (``_finish``). Grid: (row blocks, token blocks, splits)."""
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1)
    split = tl.program_id(2)
    g_start = split * G_SPLIT
    g_end = tl.minimum(G, g_start + G_SPLIT)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = (offs_m % M).to(tl.int64)  # rows past the end wrap (valid addresses, dropped at the store)
    offs_t = pid_t * TOKENS + tl.arange(0, TOKENS)
    t_ok = offs_t < N
    V32 = V.to(tl.pointer_type(tl.int32)) + rm[:, None] * (s_vm // 2)
    P_rows = P + rm[:, None] * s_pm
    if TOKENS == 1:  # (2-D tiles: a leading token dimension of 1 cost a third more instructions, through shared memory)
        X32 = X.to(tl.pointer_type(tl.int32)) + pid_t.to(tl.int64) * (s_xn // 2)
        acc = tl.zeros((BLOCK_M, BLOCK_G), dtype=tl.float32)
    else:
        X32 = X.to(tl.pointer_type(tl.int32)) + (offs_t.to(tl.int64) * (s_xn // 2))[:, None, None]
        acc = tl.zeros((TOKENS, BLOCK_M, BLOCK_G), dtype=tl.float32)
    v, b, xx = _nm24_tile(V32, P_rows, X32, t_ok, g_start, g_end, BLOCK_G, TOKENS)
    for g0 in range(g_start, g_end, BLOCK_G):
        v_next, b_next, xx_next = _nm24_tile(V32, P_rows, X32, t_ok, g0 + BLOCK_G, g_end, BLOCK_G, TOKENS)
        x01, x23 = tl.split(xx)
        code = _unpack_tile(b, 4).to(tl.int32)  # (a 4-bit code per group)
        vlo, vhi = _halves(v, V.dtype.element_ty)
        if TOKENS == 1:
            xlo, xhi = _halves(_pick_pair(x01[None, :], x23[None, :], code, PRMT), V.dtype.element_ty)
            acc += xlo * vlo + xhi * vhi
        else:
            xlo, xhi = _halves(_pick_pair(x01[:, None, :], x23[:, None, :], code[None, :, :], PRMT),
                               V.dtype.element_ty)
            acc += xlo * vlo[None, :, :] + xhi * vhi[None, :, :]
        v, b, xx = v_next, b_next, xx_next
    if TOKENS == 1:
        _finish(tl.sum(acc, axis=1), Y, T, CNT, pid_t * tl.num_programs(0) + pid_m, split, pid_t * s_yn + offs_m,
                pid_t * M + offs_m, offs_m < M, N * M, SPLITS)
    else:
        _finish(tl.sum(acc, axis=2), Y, T, CNT, pid_t * tl.num_programs(0) + pid_m, split,
                offs_t[:, None] * s_yn + offs_m[None, :], offs_t[:, None] * M + offs_m[None, :],
                t_ok[:, None] & (offs_m < M)[None, :], N * M, SPLITS)


@triton.jit
def _gate_rows(X, H, K, s_xn, s_xk, ACT_OFF, BLOCK: tl.constexpr):
    """H (N, K) = SiLU(X[:, :K]) * X[:, K:] (``_gated``; gate at column k, up at k + ACT_OFF // s_xk), H contiguous.
    Grid: (column blocks, tokens)."""
    tok = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < K
    ptrs = X + tok.to(tl.int64) * s_xn + offs * s_xk
    h = _gated(tl.load(ptrs, mask=ok, other=0.0), tl.load(ptrs + ACT_OFF, mask=ok, other=0.0))
    tl.store(H + tok.to(tl.int64) * K + offs, h, mask=ok)


#: The many-token form's launches (a prefill's gated MLP; ``gated_rows``)
_GATE_ROWS = LaunchCache(_gate_rows)
#: ... up to this many rows (the grid's second dimension)
GATE_ROWS_MAX = 65535


def gated_rows(y: Tensor, k: int) -> Tensor:
    """SiLU(y[:, :k]) * y[:, k:2k] of a 2-D gate|up product (rows of at least 2k, last dim contiguous): (N, k),
    contiguous, in one kernel (``_gated``: fp32, rounded once), where a gated MLP's own forward runs two (the
    activation, then the product, each writing an (N, k) tensor). N at most GATE_ROWS_MAX."""
    n = y.shape[0]
    if y.dim() != 2 or y.shape[1] < 2 * k or y.stride(1) != 1 or n > GATE_ROWS_MAX:
        raise ValueError(f"gated_rows: y {tuple(y.shape)} (strides {y.stride()}) is not a gate|up product of "
                         f"{2 * k} columns with at most {GATE_ROWS_MAX} rows")
    h = torch.empty(n, k, dtype=y.dtype, device=y.device)
    if h.numel():
        _GATE_ROWS((_cdiv(k, 1024), n), y, h, k, y.stride(0), 1, k, BLOCK=1024, num_warps=4)
    return h


@triton.jit
def _place_pair(v0, v1, p0, p1):
    """A 2:4 group's dense four weights (d0, d1, d2, d3): v0 where p0 = q, v1 where p1 = q, else zero."""
    zero = tl.zeros_like(v0)
    return (tl.where(p0 == 0, v0, tl.where(p1 == 0, v1, zero)), tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, zero)),
            tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, zero)), tl.where(p0 == 3, v0, tl.where(p1 == 3, v1, zero)))


@triton.jit
def _expand_pair(v32, code, DT: tl.constexpr, PRMT: tl.constexpr):
    """A 2:4 group's dense four weights (d0, d1, d2, d3, of type DT) from its value pair (v0 | v1 << 16, int32) and
    code p0 | p1 << 2: dense weight q is v0 where p0 = q, v1 where p1 = q, else zero. PRMT: two byte permutes of the
    pair and a zero word, their selector bytes (0x10: v0, 0x32: v1, 0x54: zero, weight q in byte q) formed as
    0x54545454 - 0x44 << 8 p0 - 0x22 << 8 p1 (a compare and two selects per weight, in SASS ~15 instructions per
    dense weight, did the same). Otherwise (the interpreter) by compares."""
    p0 = code & 3
    p1 = code >> 2
    if PRMT:
        one = tl.full(code.shape, 1, tl.int32)
        sel = 0x54545454 - ((one * 0x44) << (p0 * 8)) - ((one * 0x22) << (p1 * 8))
        return tl.inline_asm_elementwise(
            "{ .reg .b32 z, t0, t1, hi; mov.b32 z, 0; shr.b32 hi, $5, 16; prmt.b32 t0, $4, z, $5; "
            "prmt.b32 t1, $4, z, hi; mov.b32 {$0, $1}, t0; mov.b32 {$2, $3}, t1; }",
            "=h,=h,=h,=h,r,r", [v32, sel], dtype=(DT.value, DT.value, DT.value, DT.value), is_pure=True, pack=1)
    else:
        return _place_pair((v32 & 65535).to(tl.int16).to(DT, bitcast=True),
                           (v32 >> 16).to(tl.int16).to(DT, bitcast=True), p0, p1)


@triton.jit
def _decode_nm(X, V, P, Y, T, CNT, N, M, K, G, G_SPLIT, s_xn, s_xk, s_vm, s_pm, s_yn, ACT_OFF,
               NNZ: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr, PBITS: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
               ACT: tl.constexpr, PAIR: tl.constexpr, SPLITS: tl.constexpr, PERMUTE: tl.constexpr = False,
               PRMT: tl.constexpr = False):
    """Y (N, M) = X (N, K) @ W^T with W (M, G*GROUP) N:M sparse: row r keeps, in each group g of GROUP inputs, NNZ
    values V[r, g*NNZ + i] at in-group positions p[r, g*NNZ + i] (packed in P, PBITS each: ``_unpack``; inputs past
    K are zero padding). Each program
    expands a (BLOCK_M rows, BLOCK_G groups) tile of values into the dense tile on chip (column q of a group holds
    the value whose position is q, else zero) and feeds it to one tensor-core product with the matching input
    columns: every value and position is read from HBM once per token block, the inputs as contiguous rows.

    PAIR (2:4): the value and position tiles are loaded as contiguous rows, split into the two slots and the four
    columns joined; the next tile's values and positions are in flight while this one is expanded and multiplied
    (Triton pipelines only loads that feed tl.dot). Otherwise (any N:M) the tile is built as (rows, groups,
    GROUP_P2) slot by slot and reshaped; GROUP_P2 is GROUP rounded up to a power of two, the columns past GROUP
    masked. SPLITS > 1: program (row block, token block, split) reduces groups [split*G_SPLIT, +G_SPLIT)
    (``_finish``). Grid: (row blocks, token blocks, splits)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    g_start = split * G_SPLIT
    g_end = tl.minimum(G, g_start + G_SPLIT)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = (offs_m % M).to(tl.int64)  # rows past the end wrap (valid addresses, dropped at the store)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if PAIR:  # (2:4: 2-bit positions, a byte holding groups 2i and 2i + 1 as p0 | p1 << 2 | p0' << 4 | p1' << 6)
        offs_j = tl.arange(0, BLOCK_G * 2)
        offs_g = tl.arange(0, BLOCK_G)
        offs_b = tl.arange(0, BLOCK_G // 2)
        offs_c = tl.arange(0, BLOCK_G * 4)
        n_ok = (offs_n < N)[:, None]
        if PERMUTE:  # (16-bit values read as int32 pairs, one per group: ``_expand_pair``)
            v_ptrs = V.to(tl.pointer_type(tl.int32)) + rm[:, None] * (s_vm // 2) + (g_start + offs_g)[None, :]
            v = tl.load(v_ptrs, mask=(g_start + offs_g < g_end)[None, :], other=0)
        else:
            v_ptrs = V + rm[:, None] * s_vm + (g_start * 2 + offs_j)[None, :]
            v = tl.load(v_ptrs, mask=(g_start * 2 + offs_j < g_end * 2)[None, :], other=0.0)
        p_ptrs = P + rm[:, None] * s_pm + (g_start // 2 + offs_b)[None, :]
        b = tl.load(p_ptrs, mask=(g_start + offs_b * 2 < g_end)[None, :], other=0)
        for g0 in range(g_start, g_end, BLOCK_G):
            cols = g0 * 4 + offs_c
            ok = n_ok & ((cols < K) & (cols < g_end * 4))[None, :]
            x_ptrs = X + offs_n[:, None] * s_xn + cols[None, :] * s_xk
            x = tl.load(x_ptrs, mask=ok, other=0.0)
            if ACT:
                x = _gated(x, tl.load(x_ptrs + ACT_OFF, mask=ok, other=0.0))
            if PERMUTE:
                v_ptrs += BLOCK_G
                v_next = tl.load(v_ptrs, mask=(g0 + BLOCK_G + offs_g < g_end)[None, :], other=0)
            else:
                v_ptrs += BLOCK_G * 2
                v_next = tl.load(v_ptrs, mask=((g0 + BLOCK_G) * 2 + offs_j < g_end * 2)[None, :], other=0.0)
            p_ptrs += BLOCK_G // 2
            b_next = tl.load(p_ptrs, mask=(g0 + BLOCK_G + offs_b * 2 < g_end)[None, :], other=0)
            if PERMUTE:
                code = _unpack_tile(b, 4).to(tl.int32)  # (a 4-bit code per group)
                d0, d1, d2, d3 = _expand_pair(v, code, V.dtype.element_ty, PRMT)
            else:
                v0, v1 = tl.split(tl.reshape(v, (BLOCK_M, BLOCK_G, 2)))
                p0 = tl.reshape(tl.join(b & 3, (b >> 4) & 3), (BLOCK_M, BLOCK_G))
                p1 = tl.reshape(tl.join((b >> 2) & 3, b >> 6), (BLOCK_M, BLOCK_G))
                d0, d1, d2, d3 = _place_pair(v0, v1, p0, p1)
            # join(join(d0, d2), join(d1, d3)) is (rows, groups, 2, 2) with [.., k, a] = d[2k + a]: row-major, q order
            w = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_M, BLOCK_G * 4))
            acc = tl.dot(x.to(w.dtype), tl.trans(w), acc, input_precision=PRECISION)
            v, b = v_next, b_next
    else:
        offs_g = tl.arange(0, BLOCK_G)
        offs_q = tl.arange(0, GROUP_P2)
        n_ok3 = (offs_n < N)[:, None, None]
        for g0 in range(g_start, g_end, BLOCK_G):
            grp = g0 + offs_g
            g_ok = (grp < g_end)[None, :]
            w3 = tl.zeros((BLOCK_M, BLOCK_G, GROUP_P2), dtype=V.dtype.element_ty)
            for i in tl.static_range(NNZ):  # slot i of every group (a strided tile: L1 serves the other slots)
                j = (grp * NNZ + i)[None, :]
                v = tl.load(V + rm[:, None] * s_vm + j, mask=g_ok, other=0.0)
                p = _unpack(tl.load(P + rm[:, None] * s_pm + j // (8 // PBITS), mask=g_ok, other=0), j, PBITS)
                p = p.to(tl.int32)
                w3 = tl.where(p[:, :, None] == offs_q[None, None, :], v[:, :, None], w3)
            cols = grp[:, None] * GROUP + offs_q[None, :]  # (BLOCK_G, GROUP_P2) input columns of the tile
            ok = n_ok3 & ((grp[:, None] < g_end) & (offs_q[None, :] < GROUP) & (cols < K))[None, :, :]
            x_ptrs = X + offs_n[:, None, None] * s_xn + cols[None, :, :] * s_xk
            x = tl.load(x_ptrs, mask=ok, other=0.0)
            if ACT:
                x = _gated(x, tl.load(x_ptrs + ACT_OFF, mask=ok, other=0.0))
            x = tl.reshape(x.to(w3.dtype), (BLOCK_N, BLOCK_G * GROUP_P2))
            acc = tl.dot(x, tl.trans(tl.reshape(w3, (BLOCK_M, BLOCK_G * GROUP_P2))), acc, input_precision=PRECISION)
    _finish(acc, Y, T, CNT, pid_n * tl.num_programs(0) + pid_m, split, offs_n[:, None] * s_yn + offs_m[None, :],
            offs_n[:, None] * M + offs_m[None, :], (offs_n[:, None] < N) & (offs_m[None, :] < M), N * M, SPLITS)


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
    """N:M: tensor-core tiles above SMALL_TOKENS tokens, the row kernel (``_decode_nm_row``) at or below."""
    return n > SMALL_TOKENS[0]


def small_warps(block_n: int, act: bool) -> bool:
    """The expanded-tile kernel takes NM_SMALL_WARPS warps (else NM_META's)."""
    return block_n <= 16 and not act


def plan_gemv(n: int, groups: int, M: int, K: int, device: torch.device, split_ok: bool, act: bool = False,
              reduce: bool = False) -> dict:
    """Tile sizes and the number of K splits: enough programs to keep every SM streaming weight (cached per shape:
    few-token calls are host-bound). ``act`` (the gated input formed on load): reduction tiles of 128, whose second
    input tile fits in registers (256 spilled 16-40 bytes on sm_90). ``reduce``: the splits are summed in the kernel
    (``gemv_launcher``'s ``reduce``), so above one token they are not capped by MULTI_TOKEN_SPLITS."""
    return _plan(n, groups, M, K, device.type, device.index, split_ok, act, reduce)


#: The most K splits of a first stage above one token. There a second stage's every row block reads the first stage's
#: partials for all its tokens (splits x tokens x K fp32, from L2): at 16 tokens that re-read outweighed the weight
#: (low-rank 2048->8192 at 16 tokens took 29 us against dense's 10.6, decode-layers-20261203T150038Z.json). Measured on
#: the H200 at 2 and 8 tokens, cold (decode-layers-20261204T095228Z.json, session 10 round 4): no split is as fast or
#: faster everywhere (Monarch 8192->2048: 13.0 us against 20.1 with splits; low-rank 2048x2048 / 2048->8192 /
#: 8192->2048: 9.7 / 16.1 / 22.0 against 12.6 / 22.8 / 29.2; taller second-stage row blocks, also tried, helped only
#: with 2 splits), and in the Monarch models' captured steps (step-knobs-20261204T101430Z.json) all but one case.
MULTI_TOKEN_SPLITS = [1]
#: Above one token, a first stage's splits summed in its own kernel (the last split of a tile to arrive stores the
#: intermediate, ``_finish``) and then not capped: the second stage reads one intermediate (tokens x K, the weight's
#: dtype) instead of every split's partials. Low-rank above one token ran its first stage on 32 programs at rank 512
#: (16 rows each, unsplit): 2 MB at 2048 inputs, 8 MB at 8192, streamed by a quarter of the SMs
MULTI_TOKEN_REDUCE = [os.environ.get("STRUCTMAT_MULTI_TOKEN_REDUCE", "1") not in ("", "0")]


@functools.lru_cache(maxsize=4096)
def _plan(n: int, groups: int, M: int, K: int, device_type: str, index: int | None, split_ok: bool,
          act: bool = False, reduce: bool = False) -> dict:
    target = TARGET_PROGRAMS * _sms(device_type, index)
    block_k = 16 if INTERPRET else 128 if act else BLOCK_K_LARGE[0] if K >= 2048 else BLOCK_K_SMALL[0]
    block_m = 16
    for bm in (64, 32):  # the largest row block that still leaves enough programs
        if not INTERPRET and groups * _cdiv(M, bm) >= target:
            block_m = bm
            break
    programs = groups * _cdiv(M, block_m)
    splits = 1
    cap = MULTI_TOKEN_SPLITS[0] if n > 1 and not INTERPRET and not reduce else K
    if split_ok:
        while (programs * splits * 2 <= target and K // (splits * 2) >= max(block_k, 512 if not INTERPRET else 16)
               and splits * 2 <= cap):
            splits *= 2
    split_len = _cdiv(_cdiv(K, splits), block_k) * block_k
    splits = _cdiv(K, split_len)
    return dict(BLOCK_N=_block_n(n), BLOCK_M=block_m, BLOCK_K=block_k, splits=splits, split_len=split_len)


def _by_precision(kernel, grid: tuple, **constexprs):
    """precision -> the kernel's Launch with that PRECISION, each made when first asked (fp32's precision follows
    allow_tf32 at call time, so a launcher may meet two)."""
    launches: dict = {}

    def get(precision: str) -> Launch:
        run = launches.get(precision)
        if run is None:
            run = launches[precision] = Launch(kernel, grid, PRECISION=precision, **constexprs)
        return run

    return get


def gemv_launcher(groups: int, n: int, M: int, K: int, plan: dict, dtype: torch.dtype, a_partials: int = 1,
                  a_partial_stride: int = 0, chunk: int = 0, chunk_stride: int = 0, c_split_stride: int = 0,
                  act: bool = False, reduce: bool = False, pdl: bool = False):
    """The launch of ``C[g] = A[g] @ W[g]^T`` for one shape, worked out once: ``launch(a, a_strides, w, w_strides, c,
    c_strides, act_off=0, t=None, cnt=None)`` (strides: A (group, token, k), W (group, row, k), C (group, token,
    column)); ``plan`` from :func:`plan_gemv` (with splits > 1, C is the fp32 partial stack, unless ``reduce``: then
    C is the product and ``t`` the fp32 partials, (splits, n, groups * M), ``cnt`` the counters of
    :func:`split_counters`, one per program of a split). ``act``: A is a gated MLP's gate/up output, its up half
    ``act_off`` elements after the gate half, and the product's input is SiLU(gate) * up (``_gated``). A layer's
    cached inference plan keeps it. ``pdl``: the first stage of a PDL-joined pair (:func:`pdl_dot_launcher`)."""
    m_blocks = _cdiv(M, plan["BLOCK_M"])
    grid = (groups * m_blocks, plan["splits"])
    reduce_splits = plan["splits"] if reduce and plan["splits"] > 1 else 1
    meta = dict(BLOCK_N=plan["BLOCK_N"], BLOCK_M=plan["BLOCK_M"], BLOCK_K=plan["BLOCK_K"], **GEMV_META)
    # pipeline stages that fit in shared memory: wide token tiles of fp32 (64 tokens x 256 x 4 bytes per operand and
    # stage) asked the H200 for 240 KB at 4 stages and failed to launch
    per_stage = (plan["BLOCK_N"] + plan["BLOCK_M"]) * plan["BLOCK_K"] * dtype.itemsize
    meta["num_stages"] = max(1, min(meta["num_stages"], SMEM_BUDGET // per_stage))
    fixed = None if dtype == torch.float32 else _precision(dtype)  # (fp32 follows allow_tf32 at call time)
    if n == 0 or M == 0 or groups == 0:
        return lambda a, a_strides, w, w_strides, c, c_strides, act_off=0, t=None, cnt=None: None
    launches = _by_precision(_decode_gemv, grid, ACT=act, REDUCE=reduce_splits, PDL=pdl and not INTERPRET, **meta)

    sizes = (n, M, K, a_partials, plan["split_len"], m_blocks, a_partial_stride)

    def launch(a: Tensor, a_strides: tuple, w: Tensor, w_strides: tuple, c: Tensor, c_strides: tuple,
               act_off: int = 0, t: Tensor | None = None, cnt: Tensor | None = None) -> None:
        launches(fixed or _precision(w.dtype))(a, w, c, c if t is None else t, c if cnt is None else cnt, *sizes,
                                               *a_strides, *w_strides, c_split_stride, *c_strides, chunk_stride,
                                               chunk, act_off)

    return launch


def decode_gemv(a: Tensor, a_strides: tuple, w: Tensor, w_strides: tuple, c: Tensor, c_strides: tuple, groups: int,
                n: int, M: int, K: int, plan: dict, a_partials: int = 1, a_partial_stride: int = 0,
                chunk: int = 0, chunk_stride: int = 0, c_split_stride: int = 0) -> Tensor:
    """Launch ``C[g] = A[g] @ W[g]^T`` over ``groups`` (see :func:`gemv_launcher`)."""
    gemv_launcher(groups, n, M, K, plan, w.dtype, a_partials, a_partial_stride, chunk, chunk_stride,
                  c_split_stride)(a, a_strides, w, w_strides, c, c_strides)
    return c


# ---------------------------------------------------------------------------------------------------------------
# The fused (one-launch) two-stage product of one token: low-rank and Monarch as two stages in one grid
# (``_decode_fused``). Inside a CUDA graph a launch has a fixed cost of a few microseconds and a dependent second
# launch waits for the first to drain; at these sizes (4-17 MB per layer) that outweighs the bytes, so the product is
# one launch whose second-stage tiles stream their weight while the first stage runs. Measured on the H200
# (decode-layers-20261203T174120Z.json, cold): low-rank at one token 8.1 / 11.9 / 12.8 us against the two-launch
# form's 12.1 / 21.9 / 27.4 us (2048x2048, 2048->8192, 8192->2048); Monarch 8.0 / 12.4 / 12.5 against 7.0 / 14.0 /
# 19.9 us. Above one token (a tl.dot tile of 16+ token rows per stage) it measured slower than the two launches, and
# block-diagonal (one stage) no faster than the gemv kernel: those keep the gemv form.
# ---------------------------------------------------------------------------------------------------------------

#: The fused kernel's tile budget (weight elements per program), warps, pipeline stages and how stage 2 polls the
#: arrivals (SPIN_LOAD: volatile loads, else acquire atomics), the cap on stage-1 partials, and whether it is used
#: at all (module-level so a benchmark can sweep them).
FUSED_META = {"num_stages": 1, "SPIN_LOAD": False}
FUSED_WARPS = [4]
FUSED_TILE = [8192]
FUSED_MAX_SPLITS = [8]
FUSED_MAX_K2 = 4096  # a stage-2 reduction this long takes K2_ITERS > 1 (the first tile prefetched, the rest after)
FUSED = [os.environ.get("STRUCTMAT_FUSED_DECODE", "1") not in ("", "0")]
#: Monarch: below this many weight bytes the two launches measured faster (7.0 vs 8.0 us at 4 MB): the crossover of
#: the two forms' fits in dispatch.FEW_TOKEN_COST (3.6 us + 1230 GB/s against 6.5 us + 2780 GB/s)
MONARCH_FUSED_MIN_BYTES = 6.5e6


@functools.lru_cache(maxsize=4096)
def plan_fused(g1: int, m1: int, k1: int, g2: int, m2: int, k2: int, interpret: bool) -> dict:
    """Tiles of the fused kernel for stage 1 (g1 groups of m1 x k1) and stage 2 (g2 groups of m2 x k2). Interpreter
    plans use small tiles (the tests' awkward sizes get several tiles, splits and iterations)."""
    tile = 256 if interpret else FUSED_TILE[0]
    bm_min = 16
    bk1 = max(16, min(_pow2(k1), tile // bm_min))
    bm1 = max(bm_min, min(64, _pow2(m1), tile // bk1))
    iters1 = _cdiv(k1, bk1)
    splits = min(iters1, FUSED_MAX_SPLITS[0])
    k1_iters = _cdiv(iters1, splits)
    splits = _cdiv(iters1, k1_iters)
    # stage 2 prefetches its first tile before waiting: up to twice the tile budget (on twice the warps), so that a
    # rank up to 1024 is loaded whole while stage 1 runs
    bk2 = max(16, min(_pow2(k2), 2 * tile // bm_min))
    bm2 = max(bm_min, min(64, _pow2(m2), tile // bk2))
    m1_blocks, m2_blocks = _cdiv(m1, bm1), _cdiv(m2, bm2)
    return dict(BM1=bm1, BK1=bk1, K1_ITERS=k1_iters, S1=splits, M1_BLOCKS=m1_blocks, P1=g1 * m1_blocks * splits,
                BM2=bm2, BK2=bk2, K2_ITERS=_cdiv(k2, bk2), M2_BLOCKS=m2_blocks, P2=g2 * m2_blocks,
                num_warps=FUSED_WARPS[0] * (2 if bm2 * bk2 > tile else 1))


def fused_ok(n: int, k2: int) -> bool:
    return FUSED[0] and n == 1 and k2 <= FUSED_MAX_K2


_SYNC: dict[tuple, Tensor] = {}
_COUNTERS: dict[tuple, Tensor] = {}


def _zeros_outside_capture(store: dict, device: torch.device, size: int, least: int,
                           stream: int | None = None) -> Tensor | None:
    """``store``'s int32 zeros on ``device``, at least ``size`` of them (made with ``max(size, least)``), made
    outside any CUDA graph capture (memory allocated inside a capture belongs to the graph's pool); None while
    capturing if there are too few. The kernels reset what they count, so one buffer serves every call of a stream.
    ``stream``: an eager plan's stream (its raw handle): eager calls count in buffers of their own stream, so decodes
    on two streams of a device (two models served side by side) never share counters; None: the device's buffers,
    which CUDA-graph captures take (made by any earlier call of the size outside a capture: an eager call makes both),
    so graphs replayed on two streams at once must not share a device."""
    shared = (device.type, device.index)
    for key in ((shared, stream), shared) if stream is not None else (shared,):
        buf = store.get(key)
        if buf is None or buf.numel() < size:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None
            store[key] = _kept_zeros(max(size, least), device)
    return store[(shared, stream) if stream is not None else shared]


def _kept_zeros(size: int, device: torch.device) -> Tensor:
    """int32 zeros kept past this call, on CUDA made by a helper thread: inductor's CUDA-graph trees
    (``mode="reduce-overhead"``) route every allocation of the thread that warms up or records a graph to that
    graph's private pool (``_cuda_beginAllocateCurrentThreadToPool``, no capture under way while warming up), and a
    kept tensor from that pool is one the pool does not track: the recording fails ("tensor(s) in the cudagraph pool
    not tracked as outputs"). Made once per buffer; the helper waits for its fill before it returns."""
    if device.type != "cuda":
        return torch.zeros(size, dtype=torch.int32, device=device)
    made: list = []

    def make() -> None:
        try:
            with torch.cuda.device(device):
                buf = torch.zeros(size, dtype=torch.int32, device=device)
                torch.cuda.current_stream(device).synchronize()  # (filled before any stream of the caller reads it)
            made.append(buf)
        except BaseException as err:  # (re-raised in the caller's thread)
            made.append(err)

    helper = threading.Thread(target=make, name="structmat-kept-zeros")
    helper.start()
    helper.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def sync_buffer(device: torch.device, stream: int | None = None) -> Tensor | None:
    """The fused kernel's counters on ``device`` (ticket, arrivals, departures; reset by each call's last program);
    None while capturing before they exist (the caller takes the two-launch path). ``stream``: as
    :func:`_zeros_outside_capture`'s."""
    return _zeros_outside_capture(_SYNC, device, 4, 4, stream)


def split_counters(device: torch.device, size: int, stream: int | None = None) -> Tensor | None:
    """The N:M split kernel's arrival counters on ``device``, one per tile (each reset by the last split of its
    tile); None while capturing if there are too few (the caller does not split). ``stream``: as
    :func:`_zeros_outside_capture`'s."""
    return _zeros_outside_capture(_COUNTERS, device, size, 4096, stream)


#: The one-token two-stage product as two launches joined by programmatic dependent launch (Hopper and later:
#: the stage-2 grid starts while stage 1 runs and waits for its completion with ``griddepcontrol.wait``; no counters,
#: so it is also taken inside a CUDA-graph capture) instead of the one-grid ticket form, where the GPU has it
#: (``STRUCTMAT_PDL_DECODE=0`` turns it off). Measured on the H200 at one token, cold (decode-groups-20261203T232911Z
#: / -232921Z.json): low-rank 5.9 / 14.0 / 4.5 / 8.6 us against the one grid's 11.2 / 19.8 / 8.0 / 13.0 us (fused
#: q/k/v, fused gate/up, o, down of the bench shape), Monarch 6.5 / 13.2 / - / 8.3 against 11.0 / 17.7 / - / 12.8.
PDL = [os.environ.get("STRUCTMAT_PDL_DECODE", "1") not in ("", "0")]
#: Eager calls (not captured, not traced) take the one grid even where the PDL pair runs: eager decode is host-bound,
#: and one launch costs the host less than two (benchmarks/experiments/host_costs.py)
EAGER_ONE_GRID = [True]
#: Monarch takes the PDL pair from this many weight bytes (the one grid only from MONARCH_FUSED_MIN_BYTES)
MONARCH_PDL_MIN_BYTES = 0


def pdl_ok(device: torch.device) -> bool:
    return PDL[0] and (INTERPRET or _capability(device.type, device.index) >= (9, 0))


def pdl_launcher(plan: dict, m1: int, k1: int, m2: int, k2: int, chunk1: int = 0, act: bool = False):
    """The same product and arguments as :func:`fused_launcher` (less the counters), as two PDL-joined launches."""
    pdl = not INTERPRET
    warps = plan["num_warps"]
    extra = {"launch_pdl": True} if pdl else {}
    stage1 = Launch(_pdl_stage1, (plan["P1"],), **{k: plan[k] for k in ("S1", "K1_ITERS", "BM1", "BK1")}, PDL=pdl,
                    ACT=act, num_warps=warps, num_stages=1)
    stage2 = Launch(_pdl_stage2, (plan["P2"],), **{k: plan[k] for k in ("S1", "K2_ITERS", "BM2", "BK2")},
                    WAIT=1 if pdl else 2, num_warps=warps, num_stages=1, **extra)

    m1_blocks, m2_blocks = plan["M1_BLOCKS"], plan["M2_BLOCKS"]

    def launch(x: Tensor, xs: tuple, w1: Tensor, w1s: tuple, t: Tensor, ts: tuple, w2: Tensor, w2s: tuple, as_: tuple,
               y: Tensor, ys: tuple, sync: Tensor | None = None, act_off: int = 0) -> None:
        stage1(x, w1, t, m1, k1, m1_blocks, *xs, *w1s, *ts, chunk1, act_off)
        stage2(t, w2, y, m2, k2, m2_blocks, ts[0], *as_, *w2s, *ys)

    return launch


#: Above one token (up to 16), low-rank's second stage as the second launch of a PDL-joined pair
#: (``_pdl_stage2_dot``, its first weight tile loaded while the first stage runs) after the first stage's gemv
#: launch (which sums its splits: ``MULTI_TOKEN_REDUCE``), where ``pdl_ok``
MULTI_TOKEN_PDL = [os.environ.get("STRUCTMAT_MULTI_TOKEN_PDL", "1") not in ("", "0")]


#: ... only where the second stage's weight is at most this many bytes: every second-stage program holds its first
#: tile while it waits, and more than about a wave of them starves the first stage (round 8,
#: decode-layers-20261204T144046Z.json, 16 tokens cold: 2048x2048 and 8192->2048 at 50% (2.1 / 3.3 MB) 8.5 -> 6.8
#: and 14.3 -> 12.9 us; 2048->8192 (13.4 MB) 14.3 -> 20.9 us; kernels-20261204T144115Z.json: 4096^2 rank 1024
#: (8.4 MB) 0.70x dense)
PDL_DOT_MAX_BYTES = 4e6
#: ... or, where the second stage's reduction (the rank) is at most PDL_DOT_NARROW_K, up to this many bytes: its
#: programs each hold a tile of 16 rows x at most 512 on 4 warps (a rank of 513-1024 takes 1024-wide tiles on 8 warps,
#: the case that starved the first stage). Session 20 round 3 (decode-layers-20261205T044218Z.json, cold): low-rank
#: rank 512 of 2048->8192 (an 8.4 MB second stage) at 4 / 16 tokens 9.0 / 9.3 us paired against 10.7 / 10.9 (dense
#: 10.5 / 10.5); rank 1024 of 4096^2 (8.4 MB, 1024 wide) 14.4 / 15.2 against 12.8 / 13.1
#: (decode-layers-20261205T044200Z.json)
PDL_DOT_NARROW_K = 512
PDL_DOT_NARROW_MAX_BYTES = 8.4e6


def pdl_dot_ok(n: int, k2: int, w2_bytes: int, device: torch.device) -> bool:
    most = PDL_DOT_NARROW_MAX_BYTES if k2 <= PDL_DOT_NARROW_K else PDL_DOT_MAX_BYTES
    return MULTI_TOKEN_PDL[0] and 1 < n <= 16 and k2 <= FUSED_MAX_K2 and w2_bytes <= most and pdl_ok(device)


def pdl_dot_launcher(groups: int, n: int, M: int, K: int, dtype: torch.dtype):
    """The second stage above one token as a PDL-joined launch (``_pdl_stage2_dot``), with the arguments of
    :func:`gemv_launcher`'s launch: ``launch(a, a_strides, w, w_strides, c, c_strides)``, A the first stage's
    intermediate in the weight's dtype. Tiles as the one-token pair's second stage (:func:`plan_fused`)."""
    plan = plan_fused(1, 16, 16, groups, M, K, INTERPRET)
    pdl = not INTERPRET
    extra = {"launch_pdl": True} if pdl else {}
    fixed = None if dtype == torch.float32 else _precision(dtype)
    launches = _by_precision(_pdl_stage2_dot, (plan["P2"],), BLOCK_N=_block_n(n), K2_ITERS=plan["K2_ITERS"],
                             BM2=plan["BM2"], BK2=plan["BK2"], WAIT=1 if pdl else 2, num_warps=plan["num_warps"],
                             num_stages=1, **extra)

    def launch(a: Tensor, a_strides: tuple, w: Tensor, w_strides: tuple, c: Tensor, c_strides: tuple) -> None:
        launches(fixed or _precision(w.dtype))(a, w, c, n, M, K, plan["M2_BLOCKS"], *a_strides, *w_strides,
                                               *c_strides)

    return launch


def fused_launcher(plan: dict, m1: int, k1: int, m2: int, k2: int, chunk1: int = 0, act: bool = False):
    """The fused launch for one shape: ``launch(x, x_strides, w1, w1_strides, t, t_strides, w2, w2_strides,
    a_strides, y, y_strides, sync, act_off=0)`` with strides x/a (group, k), w (group, row, k), t (split, group,
    column, chunk) and y (group, column), one token; ``act`` as :func:`gemv_launcher`'s."""
    kernel = Launch(_decode_fused, (plan["P1"] + plan["P2"],),
                    **{k: plan[k] for k in ("S1", "K1_ITERS", "K2_ITERS", "BM1", "BK1", "BM2", "BK2", "num_warps")},
                    **FUSED_META, ACT=act)

    sizes = (m1, k1, plan["M1_BLOCKS"], plan["P1"], m2, k2, plan["M2_BLOCKS"], plan["P2"])

    def launch(x: Tensor, xs: tuple, w1: Tensor, w1s: tuple, t: Tensor, ts: tuple, w2: Tensor, w2s: tuple, as_: tuple,
               y: Tensor, ys: tuple, sync: Tensor, act_off: int = 0) -> None:
        kernel(x, w1, t, w2, y, sync, *sizes, *xs, *w1s, *ts, chunk1, *as_, *w2s, *ys, act_off)

    return launch


@functools.lru_cache(maxsize=1024)
def _plan_nm(n: int, M: int, G: int, device_type: str, index: int | None, dot: bool, act: bool = False,
             group: int = 4, nnz: int = 2) -> dict:
    target = TARGET_PROGRAMS * _sms(device_type, index)
    if not dot:  # the row kernel: one token per program, row blocks x splits of the values up to the target
        kept = G * nnz
        if INTERPRET:
            block_m, block_j = 8, 16
        else:
            block_m, block_j = NM_ROW_BLOCK_M[0], NM_ROW_BLOCK_J[0] or (512 if kept >= 4096 else 256)
        programs = _cdiv(M, block_m) * n
        splits = 1
        while (programs * splits * 2 <= target and kept // (splits * 2) >= block_j * NM_ROW_MIN_SPLIT_TILES[0]
               and splits * 2 <= NM_ROW_MAX_SPLITS[0]):
            splits *= 2
        j_split = _cdiv(_cdiv(kept, splits), block_j) * block_j
        return dict(BLOCK_M=block_m, BLOCK_J=block_j, PREFETCH=NM_ROW_PREFETCH[0],
                    SPLITS=_cdiv(kept, j_split), SPLIT_LEN=j_split)
    # the expanded-tile kernel: all tokens in one tile up to NM_BLOCK_N (more tokens are more token blocks, whose
    # weight re-reads come mostly from L2), a dense tile NM_TILE_K inputs wide, row blocks as large as still leave
    # enough programs, then the groups split until there are (each split at least NM_MIN_SPLIT_TILES tiles long)
    gp2 = _pow2(group)
    pair = NM_PAIR[0] and (nnz, group) == (2, 4)
    block_n = 16 if INTERPRET else min(NM_BLOCK_N[0], max(16, _pow2(n)))
    target = (NM_TARGET_PROGRAMS[0] if small_warps(block_n, act) else TARGET_PROGRAMS) * _sms(device_type, index)
    if INTERPRET:
        block_m, block_g = 16, max(2, 32 // gp2)
    else:
        block_m = 16
        for bm in (64, 32):
            if _cdiv(M, bm) >= target:
                block_m = bm
                break
        if act or NM_BLOCK_M[0]:  # (act: each row block forms the gated input of its token tile again; fewer, taller
            block_m = NM_BLOCK_M[0] or 32  # row blocks do that less often, the splits keep the programs)
        block_g = max(2, NM_TILE_K[0] // gp2)
    programs = _cdiv(M, block_m) * _cdiv(n, block_n)
    splits = 1
    while (programs * splits * 2 <= target and G // (splits * 2) >= block_g * NM_MIN_SPLIT_TILES[0]
           and splits * 2 <= NM_MAX_SPLITS[0]):
        splits *= 2
    g_split = _cdiv(_cdiv(G, splits), block_g) * block_g
    return dict(BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_G=block_g, GROUP_P2=gp2, PAIR=pair,
                SPLITS=_cdiv(G, g_split), SPLIT_LEN=g_split)


def clear_plans() -> None:
    """Drop the cached tile plans (they read the module's knobs when made: after changing one, call this and
    ``structures.base.invalidate_plans`` for the layers' own plans)."""
    for cached in (_plan, _plan_nm, plan_fused):
        cached.cache_clear()


def scratch_after_partials(partials: int, elements: int, dtype: torch.dtype):
    """A flat fp32 scratch of ``partials`` split partials followed by an ``elements``-long intermediate of ``dtype``:
    ``(fp32 words in all, views)``, ``views(buf)`` giving the two parts."""
    words = _cdiv(elements * dtype.itemsize, 4)

    def views(buf: Tensor) -> tuple[Tensor, Tensor]:
        return buf[:partials], buf[partials:partials + words].view(dtype)[:elements]

    return partials + words, views


def rows(t: Tensor) -> tuple[int, int]:
    """(row stride, column stride) of ``t`` read as a (rows, last dim) matrix: its strides when 2-D; an N-D input
    must be contiguous (``structures.base``'s eager path checks it), so (last dim, 1) whatever strides its size-1
    dimensions report. Outputs are allocated contiguous: their row stride is their last dim."""
    return (t.stride(0), t.stride(1)) if t.dim() == 2 else (t.shape[-1], 1)


@functools.lru_cache(maxsize=16)
def _capability(device_type: str, index: int | None) -> tuple:
    return torch.cuda.get_device_capability(index) if device_type == "cuda" else (0, 0)


def _sparse_mma_ok(N: int, M: int, K: int, kept: int, n_keep: int, group: int, device: torch.device,
                   dtype: torch.dtype, act: bool) -> bool:
    """Whether the product takes the sparse tensor cores (NM24_SP): 2:4 of 16-bit values, whole 64-wide blocks,
    tokens within NM24_SP_TOKENS (or two, for a weight of NM24_SP_PAIR_ELEMENTS or more), an sm_80+ GPU (not the
    interpreter: inline PTX). ``act`` (a gated input) is formed first."""
    low, high = NM24_SP_TOKENS[0]
    return (NM24_SP[0] and (n_keep, group) == (2, 4) and K == kept * 2 and K % 64 == 0
            and dtype in (torch.bfloat16, torch.float16) and not INTERPRET
            and (low <= N <= high or N == 2 and M * K >= NM24_SP_PAIR_ELEMENTS[0])
            and _capability(device.type, device.index) >= (8, 0))


def _sparse_mma_launcher(N: int, M: int, K: int, device: torch.device, dtype: torch.dtype, act: bool = False,
                         stream: int | None = None):
    """The ``mma.sp`` launch (``_gluon_nm24``) with ``nm_launcher``'s calling convention (``act``: SiLU(gate) * up
    formed first by ``_gate_rows``, into the scratch); a call whose operands are not aligned for its loads (values and
    codes 8 bytes a lane, inputs 4) takes the launch ``nm_launcher`` makes without it. The scratch: the inputs in
    fragment order, then the gated input; the other launch's scratch a prefix of the same buffer."""
    tiles = _cdiv(M, 16)  # (row tiles of 16: a program each, its warps splitting the reduction)
    warps = NM24_SP_WARPS[0] or (4 if tiles >= 2 * _sms(device.type, device.index) else 8)
    sb = K // 64
    two = N > 8 and NM24_SP_TOKEN_BLOCK[0] == 16
    prep = NM24_SP_PREP[0] and N >= NM24_SP_PREP_TOKENS[0]
    blocks = _cdiv(N, 16) * 2 if two else _cdiv(N, 8)  # (token blocks of 8 the fragment-order inputs hold)
    kernel = Launch(_gluon_nm24._nm24_mma_sp, (tiles, _cdiv(N, 16 if two else 8)), WARPS=warps, TWO=two,
                    DEPTH=NM24_SP_DEPTH[0], PREP=prep, FP16=dtype == torch.float16, num_warps=warps)
    fragments = Launch(_gluon_nm24._input_fragments, (sb, blocks), num_warps=4) if prep else None
    gate = Launch(_gate_rows, (_cdiv(K, 1024), N), BLOCK=1024, num_warps=4) if act else None
    other, other_scratch = nm_launcher(N, M, K, K // 2, 2, 4, device, dtype, act=act, sparse_mma=False,
                                       stream=stream)
    xf_words = blocks * sb * 256 if prep else 0
    h_words = _cdiv(N * K * dtype.itemsize, 4) if act else 0
    other_words = math.prod(other_scratch) if other_scratch is not None else 0
    words = max(xf_words + h_words, other_words)

    def sparse(x: Tensor, values: Tensor, positions: Tensor, y: Tensor, t, act_off: int, rs: int, cs: int) -> None:
        if act:
            h = t[xf_words:xf_words + h_words].view(x.dtype)[:N * K]
            gate(x, h, K, rs, cs, act_off)
            x, rs = h, K
        xf = x
        if prep:
            xf = t[:xf_words]
            fragments(x, xf, N, sb, rs)
        kernel(x, values, positions, y, xf, N, M, sb, _cdiv(sb, warps), rs, values.stride(0),
               positions.stride(0), y.shape[-1])

    built = []

    def launch(x: Tensor, values: Tensor, positions: Tensor, y: Tensor, t=None, act_off: int = 0) -> None:
        rs, cs = rows(x)
        if (SPARSE_MMA_ERROR[0] is None and (act or cs == 1 and rs % 2 == 0 and x.data_ptr() % 4 == 0)
                and values.stride(0) % 4 == 0 and positions.stride(0) % 8 == 0 and values.dtype == x.dtype
                and values.data_ptr() % 8 == 0 and positions.data_ptr() % 8 == 0):
            if built:
                return sparse(x, values, positions, y, t, act_off, rs, cs)
            try:  # (the first call builds the kernels)
                sparse(x, values, positions, y, t, act_off, rs, cs)
                built.append(True)
                return
            except Exception as err:  # (any build failure: the other kernels from now on, said once)
                SPARSE_MMA_ERROR[0] = err
                NM24_SP[0] = False
                warnings.warn(f"structmat: the 2:4 sparse-tensor-core kernel did not build with Triton "
                              f"{triton.__version__} ({err!r:.300}); 2:4 products take the other decode kernels",
                              RuntimeWarning, stacklevel=2)
        other(x, values, positions, y, t[:other_words].view(other_scratch) if other_words else None, act_off)

    return launch, ((words,) if words else None)


def nm_launcher(N: int, M: int, K: int, kept: int, n_keep: int, group: int, device: torch.device,
                dtype: torch.dtype, act: bool = False, sparse_mma: bool = True, stream: int | None = None):
    """The N:M launch for one shape, worked out once: ``(launch, scratch)``, ``launch(x, values, positions, y, t,
    act_off=0)`` (``act`` as :func:`gemv_launcher`'s; K is the product's input width); ``scratch`` the shape of the
    fp32 scratch ``t`` it needs (None: none, ``t`` ignored): the split partials, and at one token with ``act`` and
    NM_ROW_GATE_FIRST, flat, the gated input after them. ``stream``: an eager plan's (:func:`split_counters`), None
    for any other plan (so it also tells an eager plan: EAGER_GATE_IN_ROW)."""
    if sparse_mma and _sparse_mma_ok(N, M, K, kept, n_keep, group, device, dtype, act):
        return _sparse_mma_launcher(N, M, K, device, dtype, act, stream)
    gate_first = act and NM_ROW_GATE_FIRST[0] and not (stream is not None and EAGER_GATE_IN_ROW[0])
    # 2:4 of 16-bit values at up to NM24_ROW_TOKENS tokens: the byte-permute kernel, ``tokens24`` tokens a program
    pair_ok = (NM24_ROW[0] and (n_keep, group) == (2, 4) and K == kept * 2 and dtype in (torch.bfloat16, torch.float16)
               and not (act and not gate_first))
    tokens24 = _pow2(N) if pair_ok and N <= NM24_ROW_TOKENS[0] else 0
    dot = use_dot(N) and not tokens24
    plan = dict(_plan_nm(_cdiv(N, tokens24) if tokens24 else N, M, kept // n_keep, device.type, device.index, dot,
                         act, group, n_keep))
    if N == 0 or M == 0:
        return (lambda x, values, positions, y, t=None, act_off=0: None), None
    grid = (_cdiv(M, plan["BLOCK_M"]), _cdiv(N, plan.get("BLOCK_N", 1)))
    splits = plan["SPLITS"]
    cnt = split_counters(device, grid[0] * grid[1], stream) if splits > 1 else None
    if splits > 1 and cnt is None:  # (first met inside a capture: no counters yet, so no split)
        plan = dict(plan, SPLITS=1, SPLIT_LEN=kept if not dot else kept // n_keep)
        splits = 1
    split_len = plan.pop("SPLIT_LEN")
    scratch = (splits, N, M) if splits > 1 else None
    if dot:
        fixed = None if dtype == torch.float32 else _precision(dtype)
        meta = dict(NM_META, **({"num_warps": NM_SMALL_WARPS[0]} if small_warps(plan["BLOCK_N"], act) else {}))
        launches = _by_precision(_decode_nm, grid + (splits,), NNZ=n_keep, GROUP=group, PBITS=position_bits(group),
                                 ACT=act, **meta, **plan)
        # 2:4 of 16-bit values aligned for int32 pairs: the tile expanded by byte permutes (``_expand_pair``)
        permute = (_by_precision(_decode_nm, grid + (splits,), NNZ=n_keep, GROUP=group, PBITS=2, ACT=act,
                                 PERMUTE=True, PRMT=not RUNS_IN_INTERPRETER, **meta, **plan)
                   if NM24_PERMUTE[0] and plan["PAIR"] and dtype in (torch.bfloat16, torch.float16) else None)

        def launch(x: Tensor, values: Tensor, positions: Tensor, y: Tensor, t=None, act_off: int = 0) -> None:
            t = y if t is None else t  # (no split: the kernel never touches t or the counters)
            chosen = launches
            if (permute is not None and values.dtype == x.dtype and values.stride(0) % 2 == 0
                    and values.data_ptr() % 4 == 0):
                chosen = permute
            chosen(fixed or _precision(x.dtype))(x, values, positions, y, t, y if cnt is None else cnt, N, M, K,
                                                 kept // n_keep, split_len, *rows(x), values.stride(0),
                                                 positions.stride(0), y.shape[-1], act_off)

        return launch, scratch
    exact = kept % plan["BLOCK_J"] == 0 and split_len % plan["BLOCK_J"] == 0 and K == kept // n_keep * group
    kernel = Launch(_decode_nm_row, grid + (splits,), NNZ=n_keep, GROUP=group, PBITS=position_bits(group),
                    ACT=act and not gate_first,
                    EXACT=exact, num_warps=NM_ROW_WARPS[0], num_stages=1, **plan)

    if not tokens24:
        def row(x: Tensor, x_rows: tuple, values: Tensor, positions: Tensor, y: Tensor, t, act_off: int) -> None:
            kernel(x, values, positions, y, y if t is None else t, y if cnt is None else cnt, N, M, K, kept,
                   split_len, *x_rows, values.stride(0), positions.stride(0), y.shape[-1], act_off)
    else:  # 2:4 of 16-bit values: inputs picked by byte permutes (``_decode_nm24_row``) where the layout allows
        pair = Launch(_decode_nm24_row, (grid[0], _cdiv(N, tokens24), splits), BLOCK_M=plan["BLOCK_M"],
                      BLOCK_G=plan["BLOCK_J"] // 2 if tokens24 == 1 else min(plan["BLOCK_J"] // 2, 128),
                      TOKENS=tokens24, PRMT=not RUNS_IN_INTERPRETER, SPLITS=splits,
                      num_warps=NM_ROW_WARPS[0], num_stages=1)

        def row(x: Tensor, x_rows: tuple, values: Tensor, positions: Tensor, y: Tensor, t, act_off: int) -> None:
            if (x_rows[1] == 1 and x_rows[0] % 2 == 0 and values.stride(0) % 2 == 0 and values.dtype == x.dtype
                    and x.data_ptr() % 4 == 0 and values.data_ptr() % 4 == 0):
                pair(x, values, positions, y, y if t is None else t, y if cnt is None else cnt, N, M, kept // 2,
                     split_len // 2, x_rows[0], values.stride(0), positions.stride(0), y.shape[-1])
            else:
                kernel(x, values, positions, y, y if t is None else t, y if cnt is None else cnt, N, M, K, kept,
                       split_len, *x_rows, values.stride(0), positions.stride(0), y.shape[-1], act_off)

    if not gate_first:
        return (lambda x, values, positions, y, t=None, act_off=0:
                row(x, rows(x), values, positions, y, t, act_off)), scratch
    # the gated input in the scratch, after the split partials: N*K elements of x's dtype
    words, views = scratch_after_partials(splits * N * M if splits > 1 else 0, N * K, dtype)
    gate = Launch(_gate_rows, (_cdiv(K, 1024), N), BLOCK=1024, num_warps=4)

    def launch_gated(x: Tensor, values: Tensor, positions: Tensor, y: Tensor, t=None, act_off: int = 0) -> None:
        h = views(t)[1]
        gate(x, h, K, *rows(x), act_off)
        row(h, (K, 1), values, positions, y, t, 0)

    return launch_gated, (words,)


def decode_nm(x: Tensor, values: Tensor, positions: Tensor, y: Tensor, n_keep: int, group: int) -> Tensor:
    """``y = x @ W^T`` for the N:M weight stored as ``values`` (out, groups*n_keep) and ``positions`` (packed,
    ``structures.sparse.pack_positions``); x (N, K)."""
    N, K = x.shape
    launch, scratch = nm_launcher(N, values.shape[0], K, values.shape[1], n_keep, group, x.device, x.dtype)
    launch(x, values, positions, y, None if scratch is None else x.new_empty(scratch, dtype=torch.float32))
    return y
