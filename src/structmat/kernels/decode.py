"""Few-token (decode) products as ``torch.library`` custom ops, with fake kernels so that ``torch.compile`` and CUDA
graphs capture them; inference only (no autograd: dispatch sends a call here only when nothing needs a gradient).

  ``structmat::decode_lowrank(x, U, V)``      y = (x V^T) U^T: stage 1 split over the input dim (fp32 partials of
                                              the rank vector, a few KB that stay in L2), stage 2 sums them on load;
                                              above one token the last split sums them (one intermediate to read),
                                              and up to 16 tokens, where its weight is small, stage 2 is launched
                                              early (PDL) and loads its weight while stage 1 runs
  ``structmat::decode_blockdiag(x, W)``       one launch over (block, row block)
  ``structmat::decode_monarch(x, R, L)``      stage 1 writes the permuted intermediate (fp32 split-K partials, in
                                              the order stage 2 reads), stage 2 sums them on load
  ``structmat::decode_nm(x, values, positions, n, m)``  values and packed positions; 2:4 of 16-bit values at
                                              1-2 tokens: each group's two inputs picked from its four by a byte
                                              permute; at 3-32 tokens (and 2 on large weights) on an sm_80+ GPU:
                                              the sparse tensor cores (mma.sp, ``_gluon_nm24``), values and codes
                                              as stored; other N:M at one token: each value meets the input its
                                              position selects; more tokens: tiles of values expanded on chip for
                                              tl.dot (2:4 by byte permutes), the reduction split where row blocks
                                              are few (the last split sums)
At one token, low-rank and Monarch overlap their stages: on Hopper and later as two launches joined by programmatic
dependent launch (``_triton_decode.pdl_launcher``: the stage-2 grid loads its weight while stage 1 runs, then waits
for it), elsewhere as ONE launch (``_triton_decode._decode_fused``, Monarch from MONARCH_FUSED_MIN_BYTES of weight):
both stages share one grid, the second stage's tiles loading their weight while the first runs. Above one token,
below that size, with ``STRUCTMAT_FUSED_DECODE=0`` or a stage-2 reduction above ``FUSED_MAX_K2``: the two-launch
form (above one token low-rank's stage 1 split as at one token and summed in its kernel,
``_triton_decode.MULTI_TOKEN_REDUCE``; Monarch's unsplit, ``MULTI_TOKEN_SPLITS``).

Each weight byte is read from HBM once; the intermediates (tokens x rank or tokens x in) are tiny. Eager calls run
the same code without the custom op's dispatch (host time is what few-token calls pay).
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch
from torch import Tensor

from . import ops as _ops
from . import _triton_decode
from ._triton_decode import (MAX_TOKENS, fused_launcher, fused_ok, gemv_launcher, nm_launcher, pdl_dot_launcher,
                             pdl_dot_ok, pdl_launcher, pdl_ok, plan_fused, plan_gemv, rows, scratch_after_partials,
                             split_counters, sync_buffer)

__all__ = ["MAX_TOKENS", "blockdiag", "lowrank", "monarch", "nm"]


def _empty(shape: tuple, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    if _ops.POISON:  # tests: an element a kernel does not write shows as NaN
        return torch.full(shape, float("nan"), dtype=like.dtype if dtype is None else dtype, device=like.device)
    # (new_empty: contiguous, on like's device; its arguments cost the host less than torch.empty's keywords, and
    # every few-token call allocates its output)
    return like.new_empty(shape) if dtype is None else like.new_empty(shape, dtype=dtype)


def _tokens(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() != 2 else x.shape[0]


# Each product as a plan for one shape (``<op>_plan(x, *operands)``): tile plans, launch grids and constant arguments
# worked out once; the returned ``run(x, *operands)`` allocates the outputs and launches. Eager calls plan and run at
# once; a layer's cached inference plan (``dispatch.planner``) keeps the plan and only runs it.


_AS_CAPTURED = [False]
#: every scratch an eager plan keeps (while its plan lives): a memory census names them (``inference.hidden_tensors``)
KEPT_SCRATCH: weakref.WeakSet[Tensor] = weakref.WeakSet()


def _eager(x: Tensor) -> bool:
    """A plan made here runs eagerly on the GPU (not captured into a CUDA graph, not traced): the host's time per
    call is what counts, and the stream orders its calls (scratch buffers may be kept between them)."""
    return (x.is_cuda and not _AS_CAPTURED[0] and not torch.cuda.is_current_stream_capturing()
            and not torch.compiler.is_compiling())


@contextlib.contextmanager
def captured_form():
    """Plans made inside take the form a CUDA-graph capture takes (to compile and load its kernels before a capture,
    never inside one)."""
    saved, _AS_CAPTURED[0] = _AS_CAPTURED[0], True
    try:
        yield
    finally:
        _AS_CAPTURED[0] = saved


def _stream(x: Tensor) -> int | None:
    """The counters' stream key of a plan for ``x``: an eager plan's current stream (its calls count in that stream's
    buffers, ``_triton_decode._zeros_outside_capture``), None for any other (the device's buffers)."""
    return torch._C._cuda_getCurrentRawStream(x.get_device()) if _eager(x) else None


def _scratch(shape: tuple, like: Tensor, keep: bool):
    """A plan's fp32 scratch (split-K partials, a first stage's output): allocated per call, or once per thread and
    reused where ``keep`` (an eager plan: one thread's calls are ordered on its stream; threads sharing a model each
    get their own, since two calls' launches interleave on a shared stream: one's second stage would read the
    other's first; a plan is not shared between streams)."""
    if not keep:
        return lambda: _empty(shape, like, torch.float32)
    held = threading.local()

    def get() -> Tensor:
        buf = getattr(held, "buf", None)
        if buf is None:
            buf = held.buf = _empty(shape, like, torch.float32)
            KEPT_SCRATCH.add(buf)
        return buf

    return get


def _fused_plan(x: Tensor, g1: int, m1: int, k1: int, g2: int, m2: int, k2: int):
    """(plan, sync buffer, launcher) of the one-token product with overlapped stages for these sizes, or None where it
    does not apply (more than one token, switched off, a stage-2 reduction too long, or the one-grid form first met
    inside a CUDA graph capture: ``sync_buffer``). The launcher: the PDL pair where ``pdl_ok`` (except eager calls,
    where one launch costs the host less than two: ``_triton_decode.EAGER_ONE_GRID``), else the one grid."""
    if not fused_ok(_tokens(x), k2):
        return None
    plan = plan_fused(g1, m1, k1, g2, m2, k2, _triton_decode.INTERPRET)
    if pdl_ok(x.device) and not (_triton_decode.EAGER_ONE_GRID[0] and _eager(x)):
        return plan, None, pdl_launcher
    sync = sync_buffer(x.device, _stream(x))
    if sync is None:
        return None
    return plan, sync, fused_launcher


def _stage1_plan(n: int, groups: int, M: int, K: int, device: torch.device, act: int, stream: int | None = None):
    """(plan, counters) of low-rank's first stage outside the fused one-token forms: above one token with
    ``MULTI_TOKEN_REDUCE``, split as at one token and summed in the kernel (counters given); otherwise (one token,
    the knob off, no split, or first met inside a CUDA graph capture before the counters exist) split at most
    ``MULTI_TOKEN_SPLITS`` ways above one token, the partials summed by stage 2 (counters None)."""
    if n > 1 and _triton_decode.MULTI_TOKEN_REDUCE[0]:
        plan = plan_gemv(n, groups, M, K, device, split_ok=True, act=bool(act), reduce=True)
        if plan["splits"] > 1:
            cnt = split_counters(device, groups * -(-M // plan["BLOCK_M"]), stream)
            if cnt is not None:
                return plan, cnt
    return plan_gemv(n, groups, M, K, device, split_ok=True, act=bool(act)), None


def lowrank_plan(x: Tensor, U: Tensor, V: Tensor, act: int = 0):
    """U (out, r) and V (r, in); or g siblings that read the same input stacked (``structmat.fuse_siblings``):
    U (g, out, r) and V (g*r, in), one product whose output is the g outputs side by side, (n, g*out).
    ``act`` (every plan): x is a gated MLP's gate/up output (n, 2*in), the product's input SiLU(gate) * up."""
    n, k, lead = _tokens(x), V.shape[1], tuple(x.shape[:-1])
    g, out, r = U.shape if U.dim() == 3 else (1, *U.shape)
    us = U.stride() if U.dim() == 3 else (0, *U.stride())
    vs = (0, *V.stride())  # (a plan holds its factors' strides: layers drop their plans when a factor may change)
    y_shape = (*lead, g * out)
    gr = V.shape[0]  # stage 1 is one (g*r, in) product; stage 2 group j reads its r columns of it
    fused = _fused_plan(x, 1, gr, k, g, out, r)
    if fused is not None:  # one launch: t = x V^T (split-K fp32 partials), then y = t U^T
        plan, sync, launcher = fused
        launch = launcher(plan, gr, k, out, r, act=bool(act))
        scratch = _scratch((plan["S1"], gr), x, _eager(x))

        def run_fused(x: Tensor, U: Tensor, V: Tensor, act: int = 0) -> Tensor:
            t = scratch()
            y = _empty(y_shape, x)
            cs = rows(x)[1]
            launch(x, (0, cs), V, vs, t, (gr, 0, 1, 0), U, us, (r, 1), y, (out, 1), sync, k * cs)
            return y

        return run_fused
    p1, cnt = _stage1_plan(n, 1, gr, k, x.device, act, _stream(x))
    p2 = plan_gemv(n, g, out, r, x.device, split_ok=False)
    if cnt is not None:  # stage 1's splits summed in its kernel: stage 2 reads the intermediate h (n, g*r)
        # (the second stage launched early, its weight loaded while stage 1 runs)
        pair = pdl_dot_ok(n, r, U.numel() * U.element_size(), x.device)
        stage1 = gemv_launcher(1, n, gr, k, p1, V.dtype, act=bool(act), reduce=True, pdl=pair)
        stage2 = (pdl_dot_launcher(g, n, out, r, U.dtype) if pair else gemv_launcher(g, n, out, r, p2, U.dtype))
        words, views = scratch_after_partials(p1["splits"] * n * gr, n * gr, x.dtype)  # (partials, then h)
        scratch = _scratch((words,), x, _eager(x))

        def run_reduced(x: Tensor, U: Tensor, V: Tensor, act: int = 0) -> Tensor:
            t, h = views(scratch())
            rs, cs = rows(x)
            stage1(x, (0, rs, cs), V, vs, h, (0, gr, 1), k * cs, t, cnt)
            y = _empty(y_shape, x)
            stage2(h, (r, gr, 1), U, us, y, (out, g * out, 1))
            return y

        return run_reduced
    stage1 = gemv_launcher(1, n, gr, k, p1, V.dtype, c_split_stride=n * gr, act=bool(act))
    stage2 = gemv_launcher(g, n, out, r, p2, U.dtype, a_partials=p1["splits"], a_partial_stride=n * gr)
    scratch = _scratch((p1["splits"], n, gr), x, _eager(x))

    def run(x: Tensor, U: Tensor, V: Tensor, act: int = 0) -> Tensor:
        t = scratch()
        rs, cs = rows(x)
        stage1(x, (0, rs, cs), V, vs, t, (0, gr, 1), k * cs)
        y = _empty(y_shape, x)
        stage2(t, (r, gr, 1), U, us, y, (out, g * out, 1))
        return y

    return run


def blockdiag_plan(x: Tensor, W: Tensor, siblings: int = 1, act: int = 0):
    """W (b, u, p); or ``siblings`` layers' blocks side by side, W (b, siblings*u, p) (``structmat.fuse_siblings``):
    one launch whose output is the siblings' outputs side by side (the store puts row j*u + i of block k at
    j*b*u + k*u + i)."""
    b, m, p = W.shape
    u, n, lead = m // siblings, _tokens(x), tuple(x.shape[:-1])
    launch = gemv_launcher(b, n, m, p, plan_gemv(n, b, m, p, x.device, split_ok=False, act=bool(act)), W.dtype,
                           chunk=u if siblings > 1 else 0, chunk_stride=b * u, act=bool(act))

    ws, y_shape = W.stride(), (*lead, b * m)

    def run(x: Tensor, W: Tensor, siblings: int = 1, act: int = 0) -> Tensor:
        y = _empty(y_shape, x)
        rs, cs = rows(x)
        launch(x, (p * cs, rs, cs), W, ws, y, (u, b * m, 1), b * p * cs)
        return y

    return run


def monarch_plan(x: Tensor, R: Tensor, L: Tensor, act: int = 0):
    """R (b, b*c, p) and L (b, u, b*c); or g siblings that read the same input (``structmat.fuse_siblings``):
    R (b, g*b*c, p) (each block's rows of every sibling, side by side) and L (g*b, u, b*c), one product whose
    output is the g outputs side by side. Stage 1's chunked store puts row (j, s, q) of block k at
    j*b*b*c + s*b*c + k*c + q: sibling j's permuted intermediate, where stage 2's group j*b + s reads it."""
    b, m1, p = R.shape
    g2, u, bc = L.shape  # g2 = g*b stage-2 groups of (u, b*c)
    c, n, lead = bc // b, _tokens(x), tuple(x.shape[:-1])
    rs_, ls, y_shape = R.stride(), L.stride(), (*lead, g2 * u)
    nbytes = (R.numel() + L.numel()) * R.element_size()
    if _triton_decode.EAGER_ONE_GRID[0] and _eager(x):
        least = 0  # (eager: one launch where two would be; the host's time is what counts)
    else:
        least = _triton_decode.MONARCH_PDL_MIN_BYTES if pdl_ok(x.device) else _triton_decode.MONARCH_FUSED_MIN_BYTES
    fused = _fused_plan(x, b, m1, p, g2, u, bc) if nbytes >= least else None
    if fused is not None:  # one launch: stage 1 stores the permuted intermediate's partials, stage 2 sums them
        plan, sync, launcher = fused
        launch = launcher(plan, m1, p, u, bc, chunk1=c, act=bool(act))
        scratch = _scratch((plan["S1"], g2 * bc), x, _eager(x))

        def run_fused(x: Tensor, R: Tensor, L: Tensor, act: int = 0) -> Tensor:
            h = scratch()
            y = _empty(y_shape, x)
            cs = rows(x)[1]
            launch(x, (p * cs, cs), R, rs_, h, (g2 * bc, c, 1, bc), L, ls, (bc, 1), y, (u, 1), sync, b * p * cs)
            return y

        return run_fused
    # (above one token Monarch's first stage keeps its split summed by stage 2: summed in its kernel it measured
    # slower: 8192->2048 at 4 and 16 tokens 14.2 / 14.8 us against 13.3 / 13.3, decode-layers-20261204T135731Z.json)
    p1 = plan_gemv(n, b, m1, p, x.device, split_ok=True, act=bool(act))
    p2 = plan_gemv(n, g2, u, bc, x.device, split_ok=False)
    # stage 1, group k: row (j, s, q) of R_k -> h[:, j*b*b*c + s*b*c + k*c + q] (the order stage 2 reads), one
    # partial per split
    stage1 = gemv_launcher(b, n, m1, p, p1, R.dtype, chunk=c, chunk_stride=bc, c_split_stride=n * g2 * bc,
                           act=bool(act))
    # stage 2, group j*b + s: h[:, (j*b + s)*b*c:][:b*c] (summed over the partials) @ L_(j*b + s)^T
    stage2 = gemv_launcher(g2, n, u, bc, p2, L.dtype, a_partials=p1["splits"], a_partial_stride=n * g2 * bc)
    scratch = _scratch((p1["splits"], n, g2 * bc), x, _eager(x))

    def run(x: Tensor, R: Tensor, L: Tensor, act: int = 0) -> Tensor:
        h = scratch()
        rs, cs = rows(x)
        stage1(x, (p * cs, rs, cs), R, rs_, h, (c, g2 * bc, 1), b * p * cs)
        y = _empty(y_shape, x)
        stage2(h, (bc, g2 * bc, 1), L, ls, y, (u, g2 * u, 1))
        return y

    return run


def nm_plan(x: Tensor, values: Tensor, positions: Tensor, n: int, m: int, act: int = 0):
    k = x.shape[-1] // 2 if act else x.shape[-1]
    lead = tuple(x.shape[:-1])
    launch, shape = nm_launcher(_tokens(x), values.shape[0], k, values.shape[1], n, m, x.device, x.dtype,
                                act=bool(act), stream=_stream(x))
    scratch = _scratch(shape, x, _eager(x)) if shape is not None else (lambda: None)
    y_shape, gated = (*lead, values.shape[0]), bool(act)

    def run(x: Tensor, values: Tensor, positions: Tensor, n: int, m: int, act: int = 0) -> Tensor:
        y = _empty(y_shape, x)
        launch(x, values, positions, y, scratch(), k * rows(x)[1] if gated else 0)  # (the up half's offset)
        return y

    return run


def _lowrank(x: Tensor, U: Tensor, V: Tensor, act: int = 0) -> Tensor:
    return lowrank_plan(x, U, V, act)(x, U, V, act)


def _blockdiag(x: Tensor, W: Tensor, siblings: int = 1, act: int = 0) -> Tensor:
    return blockdiag_plan(x, W, siblings, act)(x, W, siblings, act)


def _monarch(x: Tensor, R: Tensor, L: Tensor, act: int = 0) -> Tensor:
    return monarch_plan(x, R, L, act)(x, R, L, act)


def _nm(x: Tensor, values: Tensor, positions: Tensor, n: int, m: int, act: int = 0) -> Tensor:
    return nm_plan(x, values, positions, n, m, act)(x, values, positions, n, m, act)


PLANS = {"lowrank": lowrank_plan, "blockdiag": blockdiag_plan, "monarch": monarch_plan, "nm": nm_plan}


@torch.library.custom_op("structmat::decode_lowrank", mutates_args=())
def decode_lowrank_op(x: Tensor, U: Tensor, V: Tensor, act: int = 0) -> Tensor:
    return _lowrank(x, U, V, act)


@decode_lowrank_op.register_fake
def _(x, U, V, act=0):
    return x.new_empty((x.shape[0], U.shape[0] * U.shape[1] if U.dim() == 3 else U.shape[0]))


@torch.library.custom_op("structmat::decode_blockdiag", mutates_args=())
def decode_blockdiag_op(x: Tensor, W: Tensor, siblings: int = 1, act: int = 0) -> Tensor:
    return _blockdiag(x, W, siblings, act)


@decode_blockdiag_op.register_fake
def _(x, W, siblings=1, act=0):
    return x.new_empty((x.shape[0], W.shape[0] * W.shape[1]))


@torch.library.custom_op("structmat::decode_monarch", mutates_args=())
def decode_monarch_op(x: Tensor, R: Tensor, L: Tensor, act: int = 0) -> Tensor:
    return _monarch(x, R, L, act)


@decode_monarch_op.register_fake
def _(x, R, L, act=0):
    return x.new_empty((x.shape[0], L.shape[0] * L.shape[1]))


@torch.library.custom_op("structmat::decode_nm", mutates_args=())
def decode_nm_op(x: Tensor, values: Tensor, positions: Tensor, n: int, m: int, act: int = 0) -> Tensor:
    return _nm(x, values, positions, n, m, act)


@decode_nm_op.register_fake
def _(x, values, positions, n, m, act=0):
    return x.new_empty((x.shape[0], values.shape[0]))


def lowrank(x: Tensor, U: Tensor, V: Tensor, act: int = 0) -> Tensor:
    return (decode_lowrank_op if torch.compiler.is_compiling() else _lowrank)(x, U, V, act)


def blockdiag(x: Tensor, W: Tensor, siblings: int = 1, act: int = 0) -> Tensor:
    return (decode_blockdiag_op if torch.compiler.is_compiling() else _blockdiag)(x, W, siblings, act)


def monarch(x: Tensor, R: Tensor, L: Tensor, act: int = 0) -> Tensor:
    return (decode_monarch_op if torch.compiler.is_compiling() else _monarch)(x, R, L, act)


def nm(x: Tensor, values: Tensor, positions: Tensor, n: int, m: int, act: int = 0) -> Tensor:
    return (decode_nm_op if torch.compiler.is_compiling() else _nm)(x, values, positions, n, m, act)
