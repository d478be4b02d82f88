"""Hopper fast path: a persistent, TMA-fed grouped GEMM for short-K products (nn.Linear weight layout).

For group g in 0..G-1 and output column n in 0..N-1::

    C[:, out_col(g, n)] = A[:, a_col(g, 0..K-1)] @ B[g*N:(g+1)*N, :]^T    (fp32 accumulation, cast to C's dtype)

with A (M, >=G*K), B (>=G*N, K) and C (M, cols) row-major 2-D tensors (unit column stride). The output column of the
first column ``n0`` of an output tile (a tile never straddles a chunk) is::

    out_col0 = g*GROUP_STRIDE + (n0 // CHUNK)*CHUNK_STRIDE + (n0 % CHUNK)

  * plain block-diagonal: GROUP_STRIDE = N, CHUNK = N (the chunk term vanishes);
  * Monarch stage 1 (b blocks, chunk c, N = b*c): GROUP_STRIDE = c, CHUNK = c, CHUNK_STRIDE = b*c;
  * plain GEMM: G = 1.

Symmetrically, the A operand's K index kk of group g reads A column (chunked K; off by default)::

    a_col(g, kk) = g*A_GROUP_STRIDE + (kk // A_CHUNK)*A_CHUNK_STRIDE + (kk % A_CHUNK)

  * default: A_GROUP_STRIDE = K, no chunking (a_col = g*K + kk: A's groups are consecutive column panels);
  * Monarch stage 2 reading stage 1's natural (k, s, q)-ordered output h1 (b blocks, chunk c, K = b*c):
    A_GROUP_STRIDE = c, A_CHUNK = c, A_CHUNK_STRIDE = b*c (group s, kk = k*c + q -> h1[:, k*b*c + s*c + q]).
BLOCK_K must divide A_CHUNK, so every K-tile is one contiguous TMA box (the wrapper returns False otherwise).

Why a second kernel. With K ~ 1024 a non-persistent GEMM runs only K/64 = 16 main-loop steps per tile, so the tile
prologue (pipeline fill) and epilogue (accumulator -> global) are a large fraction of each CTA's life. This kernel
is persistent (one CTA per SM looping over output tiles) and written as a two-level loop that Triton flattens
(``tl.range(..., flatten=True)``) into one software-pipelined loop: the TMA loads of the next tile's first K-steps
are issued while the current tile's epilogue runs. Loads and stores are TMA (tensor descriptors); the ragged last M
tile is handled by the descriptors' bounds (zero-filled loads, clipped stores), so M is arbitrary.

Descriptors. By default they are host-side ``triton.tools.tensor_descriptor.TensorDescriptor`` objects (the
cuTensorMap is encoded by the launcher: no device allocation, no in-kernel descriptor creation). ``desc="device"``
builds them in the kernel with ``tl.make_tensor_descriptor`` instead (needs ``triton.set_allocator`` scratch, set here
lazily on every call because Triton keeps the allocator in a ContextVar, which autograd's worker threads do not
inherit).

Warp specialization (``warp_specialize=True``) is exposed for experiments only and is off by default: on sm_90
Triton <= 3.6 routes it to the experimental Hopper auto-WS pass, which is known to fail to compile or to produce the
same code as the plain software pipeline on many loops. Compile failures raise; callers should probe it in a
separate process.

Requires Triton >= 3.4 (host ``TensorDescriptor``, ``tl.make_tensor_descriptor``, ``tl.range(flatten=...,
warp_specialize=...)``); written against 3.6 and checked under the 3.9 interpreter. Importing this module never
touches a GPU.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover - triton too old
    TensorDescriptor = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAVE_TMA = TensorDescriptor is not None and hasattr(tl, "make_tensor_descriptor")
#: Autotune per shape (default). With STRUCTMAT_AUTOTUNE=0 a fixed heuristic config runs (one compile per dtype).
AUTOTUNE = os.environ.get("STRUCTMAT_AUTOTUNE", "1") != "0"
#: Default descriptor mode: "host" (TensorDescriptor, encoded at launch) or "device" (tl.make_tensor_descriptor).
DESC_MODE = os.environ.get("STRUCTMAT_TMA_DESC", "host")

_IN_DTYPES = (torch.bfloat16, torch.float16)
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# ----------------------------------------------------------------------------------------------------------------
# Configs: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SUBTILE). SUBTILE splits the epilogue into that many
# column slabs (smaller TMA-store staging buffer in shared memory, so more room for pipeline stages).
# ----------------------------------------------------------------------------------------------------------------
_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3, SUBTILE=2),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4, SUBTILE=2),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, SUBTILE=2),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4, SUBTILE=1),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4, SUBTILE=1),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3, SUBTILE=2),
    # few rows (decode): thin M tiles, more tiles in N to spread over SMs
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4, SUBTILE=1),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4, SUBTILE=1),
]
GROUP_M = 8
#: Fixed config used when AUTOTUNE is off (M > 64 / M <= 64).
_DEFAULT_BIG = _CONFIGS[0]
_DEFAULT_SMALL = _CONFIGS[6]
#: The interpreter (CPU tests) runs one small config; it cannot time anything.
_INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, SUBTILE=2)


@triton.jit
def _tile_coords(tile, tiles_per_g, num_m, num_n, GROUP_M: tl.constexpr):
    # tile -> (group, m-tile, n-tile); within a group, GROUP_M-swizzled so neighbouring tiles share A row-panels.
    g = tile // tiles_per_g
    t = tile - g * tiles_per_g
    width = GROUP_M * num_n
    first_m = (t // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (t % width) % size_m
    pid_n = (t % width) // size_m
    return g, pid_m, pid_n


@triton.jit(do_not_specialize=["M", "N", "K", "G", "lda", "ldb", "ldc", "KA", "NB", "NC", "GROUP_STRIDE", "CHUNK",
                               "CHUNK_STRIDE", "A_GROUP_STRIDE", "A_CHUNK", "A_CHUNK_STRIDE"])
def _persistent_tma_gemm(a, b, c, M, N, K, G, lda, ldb, ldc, KA, NB, NC, GROUP_STRIDE, CHUNK, CHUNK_STRIDE,
                         A_GROUP_STRIDE, A_CHUNK, A_CHUNK_STRIDE,
                         NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SUBTILE: tl.constexpr,
                         HOST_DESC: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                         A_CHUNKED: tl.constexpr):
    # a, b, c: host TensorDescriptors (HOST_DESC) with block shapes [BM, BK], [BN, BK], [BM, BN // SUBTILE];
    # otherwise raw pointers (lda/ldb/ldc row strides; KA = columns of A, NB = rows of B, NC = columns of C).
    # A_CHUNKED (constexpr) switches on the chunked-K A index; when False the A_* chunk arguments are unused and
    # the main loop is the plain one (A column g*A_GROUP_STRIDE + kk*BLOCK_K).
    a_desc = a
    b_desc = b
    c_desc = c
    if not HOST_DESC:
        a_desc = tl.make_tensor_descriptor(a, shape=[M, KA], strides=[lda, 1], block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b, shape=[NB, K], strides=[ldb, 1], block_shape=[BLOCK_N, BLOCK_K])
        c_desc = tl.make_tensor_descriptor(c, shape=[M, NC], strides=[ldc, 1],
                                           block_shape=[BLOCK_M, BLOCK_N // SUBTILE])
    out_ty = c_desc.dtype

    start = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = N // BLOCK_N
    tiles_per_g = num_m * num_n
    num_tiles = G * tiles_per_g
    k_tiles = K // BLOCK_K
    a_steps = A_CHUNK // BLOCK_K  # K-tiles per A chunk (BLOCK_K divides A_CHUNK: checked by the wrapper)
    # The epilogue recomputes its tile's coordinates from its own counter: no value is shared between the
    # loads (prologue of the next tile, after flattening) and the stores of the current one.
    tile_c = start - NUM_SMS

    for tile in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        g, pid_m, pid_n = _tile_coords(tile, tiles_per_g, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_bn = g * N + pid_n * BLOCK_N
        off_ak = g * A_GROUP_STRIDE
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(k_tiles):
            if A_CHUNKED:  # K-tile kk lies in chunk kk // a_steps, at tile kk % a_steps inside it
                a_col = off_ak + (kk // a_steps) * A_CHUNK_STRIDE + (kk % a_steps) * BLOCK_K
            else:
                a_col = off_ak + kk * BLOCK_K
            a_t = a_desc.load([off_m, a_col])
            b_t = b_desc.load([off_bn, kk * BLOCK_K])
            acc = tl.dot(a_t, b_t.T, acc)

        tile_c += NUM_SMS
        gc, pid_mc, pid_nc = _tile_coords(tile_c, tiles_per_g, num_m, num_n, GROUP_M)
        n0 = pid_nc * BLOCK_N
        col = gc * GROUP_STRIDE + (n0 // CHUNK) * CHUNK_STRIDE + (n0 % CHUNK)
        row = pid_mc * BLOCK_M
        if SUBTILE == 1:
            c_desc.store([row, col], acc.to(out_ty))
        elif SUBTILE == 2:
            acc3 = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            acc0, acc1 = tl.split(acc3)
            c_desc.store([row, col], acc0.to(out_ty))
            c_desc.store([row, col + BLOCK_N // 2], acc1.to(out_ty))
        else:  # SUBTILE == 4
            acc3 = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            h0, h1 = tl.split(acc3)
            q3 = tl.permute(tl.reshape(h0, (BLOCK_M, 2, BLOCK_N // 4)), (0, 2, 1))
            q0, q1 = tl.split(q3)
            c_desc.store([row, col], q0.to(out_ty))
            c_desc.store([row, col + BLOCK_N // 4], q1.to(out_ty))
            q3 = tl.permute(tl.reshape(h1, (BLOCK_M, 2, BLOCK_N // 4)), (0, 2, 1))
            q2, q3b = tl.split(q3)
            c_desc.store([row, col + BLOCK_N // 2], q2.to(out_ty))
            c_desc.store([row, col + 3 * (BLOCK_N // 4)], q3b.to(out_ty))


# ----------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------

_NUM_SMS: dict[int, int] = {}
_BEST: dict[tuple, dict | None] = {}
_DESC_DEFAULTS: dict | None = None


def _num_sms(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _NUM_SMS.get(idx)
    if n is None:
        n = _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def _desc(t: Tensor, rows: int, cols: int, block: list) -> "TensorDescriptor":
    """A host TensorDescriptor over t[:rows, :cols] (unit column stride), skipping the dataclass validation.

    The wrapper has already checked what ``__post_init__`` would (16-byte base, 16-byte row stride, unit column
    stride, positive dims), and on a slow host the validation is a measurable part of the launch.
    """
    global _DESC_DEFAULTS
    if _DESC_DEFAULTS is None:
        try:
            _DESC_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TensorDescriptor)
                              if f.default is not dataclasses.MISSING}
        except TypeError:  # not a dataclass in this triton: always take the validating constructor
            _DESC_DEFAULTS = False
    if _DESC_DEFAULTS is False:
        return TensorDescriptor(t, [rows, cols], [t.stride(0), 1], block)
    d = object.__new__(TensorDescriptor)
    d.__dict__.update(_DESC_DEFAULTS)
    d.base = t
    d.shape = [rows, cols]
    d.strides = [t.stride(0), 1]
    d.block_shape = block
    return d


def _alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 16384)


def _divides(cfg: dict, N: int, K: int, chunk: int, a_chunk: int) -> bool:
    """The tile shape is legal for this problem: BLOCK_N divides N and the output chunk, BLOCK_K divides K and
    the A chunk (so no tile straddles a chunk on either side)."""
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    return not (K % bk or N % bn or chunk % bn or a_chunk % bk)


def _fits(cfg: dict, M: int, N: int, K: int, chunk: int, a_chunk: int = 0) -> bool:
    bm = cfg["BLOCK_M"]
    if not _divides(cfg, N, K, chunk, a_chunk or K):
        return False
    if M <= 64:
        return bm == 64
    return bm >= 128


def _launch(a, b, c, M, N, K, G, group_stride, chunk, chunk_stride, cfg, desc, warp_specialize, flatten,
            a_group_stride=None, a_chunk=0, a_chunk_stride=0):
    bm, bn, bk, sub = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SUBTILE"]
    KA, NB, NC = a.shape[1], b.shape[0], c.shape[1]
    host = desc == "host"
    if host:
        ad = _desc(a, M, KA, [bm, bk])
        bd = _desc(b, NB, K, [bn, bk])
        cd = _desc(c, M, NC, [bm, bn // sub])
    else:
        ad, bd, cd = a, b, c
        triton.set_allocator(_alloc)
    if INTERPRET or not a.is_cuda:
        num_sms = 4
    else:
        num_sms = _num_sms(a.device)
    tiles = G * triton.cdiv(M, bm) * (N // bn)
    grid = (min(num_sms, tiles),)
    a_chunked = bool(a_chunk) and a_chunk != K
    _persistent_tma_gemm[grid](
        ad, bd, cd, M, N, K, G, a.stride(0), b.stride(0), c.stride(0), KA, NB, NC, group_stride, chunk, chunk_stride,
        K if a_group_stride is None else a_group_stride, a_chunk if a_chunked else K, a_chunk_stride,
        NUM_SMS=num_sms, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, SUBTILE=sub, HOST_DESC=host,
        FLATTEN=flatten, WARP_SPECIALIZE=warp_specialize, A_CHUNKED=a_chunked, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])


def _key(a, c, M, N, K, groups, chunk, desc, warp_specialize, flatten, a_chunk=0) -> tuple:
    # The winner depends on the shape, not on the remap: key on what changes tile counts and pipelining (and on
    # the largest power of two dividing the chunk, which decides which BLOCK_N are legal). A chunked-K A operand
    # is keyed apart (other code, other read pattern) with its chunk's power of two (which BLOCK_K are legal).
    base = (_bucket(M), N, K, groups, min(chunk & -chunk, 256), a.dtype, c.dtype, desc, warp_specialize, flatten,
            a.device.index)
    if not a_chunk or a_chunk == K:
        return base  # (unchanged key for the plain A operand)
    return base + (("a_chunk", min(a_chunk & -a_chunk, 256)),)


def best_config(a: Tensor, c: Tensor, groups: int, N: int, K: int, chunk: int | None = None, *,
                desc: str | None = None, warp_specialize: bool = False, flatten: bool = True,
                a_chunk: int = 0) -> dict | None:
    """The config the autotuner picked for this problem (None if not tuned yet or nothing compiled)."""
    ch = N if chunk is None else chunk
    return _BEST.get(_key(a, c, a.shape[0], N, K, groups, ch, desc or DESC_MODE, warp_specialize, flatten,
                          a_chunk))


def _tune(key, cands, launch):
    best, best_ms = None, float("inf")
    for cfg in cands:
        try:
            ms = triton.testing.do_bench(lambda: launch(cfg), warmup=3, rep=15, return_mode="median")
        except Exception:  # out of shared memory, compile failure: skip the config
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _BEST[key] = best
    return best


def check(a: Tensor, b: Tensor, c: Tensor, groups: int, N: int, K: int, group_stride: int | None = None,
          chunk: int | None = None, chunk_stride: int = 0, *, a_group_stride: int | None = None, a_chunk: int = 0,
          a_chunk_stride: int = 0) -> str | None:
    """Why the fast path cannot run this product (a short reason), or None if it can (tile divisibility, which
    depends on the config, is checked by the wrapper)."""
    if not HAVE_TMA:
        return "triton without tensor descriptors"
    if not (INTERPRET or (a.is_cuda and b.is_cuda and c.is_cuda)):
        return "not on a GPU"
    if a.dim() != 2 or b.dim() != 2 or c.dim() != 2:
        return "operands must be 2-D"
    if a.dtype not in _IN_DTYPES or b.dtype != a.dtype or c.dtype not in _OUT_DTYPES:
        return f"dtypes {a.dtype}/{b.dtype}/{c.dtype}"
    G = groups
    gs = N if group_stride is None else group_stride
    ch = N if chunk is None else chunk
    M = a.shape[0]
    if G <= 0 or N <= 0 or K <= 0 or M <= 0 or ch <= 0:
        return "empty problem"
    ags = K if a_group_stride is None else a_group_stride
    ach = a_chunk or K
    if c.shape[0] != M or b.shape[0] < G * N or b.shape[1] != K:
        return "shape mismatch"
    if K % 16 or N % 16 or ch % 16 or N % ch:
        return "K, N and chunk must be multiples of 16 (and chunk must divide N)"  # (and of the tile: see _fits)
    if a_chunk < 0 or ach % 16 or K % ach:
        return "a_chunk must be a multiple of 16 dividing K"  # (and of BLOCK_K: see _divides)
    last = (G - 1) * gs + (N // ch - 1) * chunk_stride + ch  # one past the last output column written
    if last > c.shape[1] or gs < 0 or chunk_stride < 0:
        return "output columns out of range"
    a_last = (G - 1) * ags + (K // ach - 1) * a_chunk_stride + ach  # one past the last A column read
    if a_last > a.shape[1] or ags < 0 or a_chunk_stride < 0:
        return "A columns out of range"
    for t in (a, b, c):
        if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return "needs 16-byte aligned base and row stride, unit column stride"
    return None


def linear_groups(a: Tensor, b: Tensor, c: Tensor, groups: int, N: int, K: int, group_stride: int | None = None,
                  chunk: int | None = None, chunk_stride: int = 0, *, a_group_stride: int | None = None,
                  a_chunk: int = 0, a_chunk_stride: int = 0, config: dict | None = None, desc: str | None = None,
                  warp_specialize: bool = False, flatten: bool = True) -> bool:
    """C[:, out_col(g, n)] = A[:, a_col(g, 0..K-1)] @ B[g*N:(g+1)*N, :]^T for every group g; True if it ran.

    Output remap: ``group_stride`` (default N), ``chunk`` (default N: off), ``chunk_stride``. A remap (chunked K):
    ``a_group_stride`` (default K), ``a_chunk`` (0 = off), ``a_chunk_stride`` (see the module docstring).
    Returns False (writing nothing) when the fast path's preconditions fail, so the caller can fall back; this
    includes a forced ``config`` whose BLOCK_K does not divide ``a_chunk`` (or BLOCK_N the output chunk).
    ``config`` forces one entry shaped like ``_CONFIGS`` (no autotuning); ``desc`` is "host" or "device"
    (default ``DESC_MODE``); ``warp_specialize`` / ``flatten`` are passed to the persistent loop.
    """
    if check(a, b, c, groups, N, K, group_stride, chunk, chunk_stride, a_group_stride=a_group_stride,
             a_chunk=a_chunk, a_chunk_stride=a_chunk_stride) is not None:
        return False
    M = a.shape[0]
    gs = N if group_stride is None else group_stride
    ch = N if chunk is None else chunk
    ach = a_chunk or K
    desc = desc or DESC_MODE

    def launch(cfg):
        _launch(a, b, c, M, N, K, groups, gs, ch, chunk_stride, cfg, desc, warp_specialize, flatten,
                a_group_stride, ach, a_chunk_stride)

    if config is None and (INTERPRET or not a.is_cuda):
        config = _INTERPRET_CONFIG
    if config is not None:
        if not _divides(config, N, K, ch, ach):
            return False
        launch(config)
        return True
    cands = [cfg for cfg in _CONFIGS if _fits(cfg, M, N, K, ch, ach)]
    if not cands:
        return False
    if not AUTOTUNE:
        default = _DEFAULT_SMALL if M <= 64 else _DEFAULT_BIG
        launch(default if default in cands else cands[0])
        return True
    key = _key(a, c, M, N, K, groups, ch, desc, warp_specialize, flatten, ach)
    if key in _BEST:
        cfg = _BEST[key]
    else:
        cfg = _tune(key, cands, launch)
    if cfg is None:
        return False  # nothing compiled for this shape
    launch(cfg)
    return True
