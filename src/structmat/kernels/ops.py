"""``torch.library`` custom ops for the block-diagonal and Monarch products (Triton and cuBLAS engines).

Each op has a fake (meta) implementation and a registered autograd formula whose backward is itself a custom op,
so ``torch.compile(fullgraph=True)`` traces through them as opaque nodes. Shapes follow the structures' references:

  ``structmat::blockdiag_mm(x, W)``: x (N, b*p), W (b, u, p) -> y (N, b*u)  [== structures.blockdiag.blockdiag_bmm]
  ``structmat::monarch_mm(x, R, L)``: x (N, b*p), R (b, b*c, p), L (b, u, b*c) -> (y (N, b*u), h (N, b*b*c))
      [y == structures.monarch.monarch_multiply; h is the permuted intermediate kept for the backward pass]
  ``structmat::monarch_fused_mm(x, R, L)``: y alone, in one persistent launch (inference, many tokens, opt-in:
      ``MONARCH_FUSED``; ``_triton_monarch``)
  ``structmat::monarch_siblings_mm(x, R, L, members)``: the y of ``members`` fused Monarch siblings (their stacked
      factors, ``structmat.siblings``) in two grouped launches (inference, many tokens)
  ``structmat::nm_expand(values, positions, n, m)``: rows of an N:M weight expanded to dense (``_triton_nm_expand``);
      :func:`nm` is the many-token inference product on such tiles (never the whole dense weight)

Layouts. Stage 1 of Monarch computes, for every input block k, h_k = x_k @ R_k^T whose columns are ordered (s, q)
(chunk s of c intermediates goes to output block s). The kernel stores column (s, q) of group k at
``h[:, s*b*c + k*c + q]``, i.e. h is written directly in the (s, k, q) order that stage 2 (block s: y_s = h_s @ L_s^T)
reads as one contiguous row-panel. The backward pass writes dh in stage 1's (k, s, q) order the same way.
No transposed copy is ever materialised.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import _triton_monarch, _triton_nm_expand
from ._triton_gemm import INT32_EXTENT, grouped_gemm

#: Tests set this to fill every output buffer with NaN before the kernel writes it (an unwritten element shows).
POISON = False

#: Which engine runs each GEMM role when an op is called with engine="triton": "triton" (the grouped kernel) or
#: "cublas" (torch.bmm on strided views, writing through a strided ``out=``: cuBLAS strided-batched accepts any
#: batch stride, so no copy is made). The permuted roles (Monarch stage 1 and the gradient of its output, whose
#: output columns are not one strided matrix) use the Triton kernel's chunked store under "triton", and under
#: engine="cublas" one strided-batched call per output chunk (b calls, still no transposed copy).
#: Defaults from ``calibrate()`` on an H100 (benchmarks/NOTES.md, run 2): cuBLAS won or tied every non-permuted
#: role (bd forward 0.102 vs 0.131 ms at 8192x4096, nblocks=4), so Triton keeps only the permuted ones; and of
#: those only stage 1 (run 6, H200): the GPU times tie, and with the gradient of the intermediate on Triton the
#: whole forward+backward measured slower (benchmarks/experiments/impl_variants.py: 0.76 vs 0.63 ms at 8192 tokens,
#: 699 vs 640 us at 16), so that role goes through b cuBLAS calls.
IMPL = {"bd_fwd": "cublas", "bd_dx": "cublas", "bd_dw": "cublas", "mon_s1": "triton", "mon_dh": "cublas",
        "mon_s2": "cublas", "mon_dx": "cublas", "mon_dl": "cublas", "mon_dr": "cublas"}
ENGINES = ("triton", "cublas")


def _impl(role: str, engine: str) -> str:
    return "cublas" if engine == "cublas" else IMPL[role]


def _empty(shape, like: Tensor) -> Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _fits_int32(groups: int, M: int, N: int, K: int, sa: tuple, sb: tuple, sc: tuple, chunk: int,
                chunk_stride: int) -> bool:
    """Whether the largest element offset of every operand of ``_gemm``'s description is below INT32_EXTENT (the
    grouped kernel's row offsets are 32-bit within a group; a ~2^31-element activation, e.g. 512k tokens x 4096,
    takes cuBLAS instead)."""
    g = groups - 1
    c_last = (chunk - 1) * sc[2] + (N // chunk - 1) * chunk_stride if chunk else (N - 1) * sc[2]
    return max(g * sa[0] + (M - 1) * sa[1] + (K - 1) * sa[2], g * sb[0] + (K - 1) * sb[1] + (N - 1) * sb[2],
               g * sc[0] + (M - 1) * sc[1] + c_last) < INT32_EXTENT


def _gemm(role: str, engine: str, a: Tensor, sa: tuple, b: Tensor, sb: tuple, c: Tensor, sc: tuple, groups: int,
          M: int, N: int, K: int, chunk: int = 0, chunk_stride: int = 0) -> None:
    """``C[g] = A[g] @ B[g]`` for every group, each operand given by its (group, row, column) element strides from
    its tensor's start, so every role below is one description, run by either engine:

    * Triton: the grouped kernel reads the strides directly (chunked output columns included);
    * cuBLAS: ``torch.bmm`` on ``as_strided`` views writing through a strided ``out=`` (strided-batched GEMM, no
      copy); a chunked output becomes one call per chunk of output columns.

    Few-token calls are host-bound (about 4 us per view op on the lent H200's host), so this builds each view with
    one ``as_strided`` instead of view/transpose chains."""
    if _impl(role, engine) == "triton" and _fits_int32(groups, M, N, K, sa, sb, sc, chunk, chunk_stride):
        grouped_gemm(a, sa, b, sb, c, sc, groups, M, N, K, chunk=chunk, chunk_stride=chunk_stride)
        return
    A = a.as_strided((groups, M, K), sa, a.storage_offset())
    if not chunk:
        torch.bmm(A, b.as_strided((groups, K, N), sb, b.storage_offset()),
                  out=c.as_strided((groups, M, N), sc, c.storage_offset()))
        return
    for j in range(N // chunk):  # output columns [j*chunk, (j+1)*chunk) of every group -> offset j*chunk_stride
        torch.bmm(A, b.as_strided((groups, K, chunk), sb, b.storage_offset() + j * chunk * sb[2]),
                  out=c.as_strided((groups, M, chunk), sc, c.storage_offset() + j * chunk_stride))


# ----------------------------------------------------------------------------------------------------------------
# Block-diagonal
# ----------------------------------------------------------------------------------------------------------------


def _bd_forward(x: Tensor, W: Tensor, engine: str = "triton") -> Tensor:
    b, u, p = W.shape
    n = x.shape[0]
    y = _empty((n, b * u), x)
    # group g: A = x[:, g*p:(g+1)*p] (n, p); B[j, t] = W[g, t, j] (p, u); C = y[:, g*u:(g+1)*u]
    _gemm("bd_fwd", engine, x, (p * x.stride(1), x.stride(0), x.stride(1)), W, (W.stride(0), W.stride(2), W.stride(1)),
          y, (u, y.stride(0), 1), b, n, u, p)
    return y


def _bd_backward(dy: Tensor, x: Tensor, W: Tensor, engine: str = "triton",
                 need: tuple[bool, bool] = (True, True)) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of x and W (each only if ``need`` asks for it: a frozen weight costs no GEMM)."""
    b, u, p = W.shape
    n = x.shape[0]
    dx = dW = None
    dy = dy.contiguous()  # (autograd may hand an expanded or transposed gradient)
    if need[0]:
        dx = _empty((n, b * p), x)
        # dx_g = dy_g @ W_g: A = dy[:, g*u:] (n, u); B[t, j] = W[g, t, j]
        _gemm("bd_dx", engine, dy, (u, dy.stride(0), 1), W, (W.stride(0), W.stride(1), W.stride(2)),
              dx, (p, dx.stride(0), 1), b, n, p, u)
    if need[1]:
        dW = _empty((b, u, p), W)
        if n == 0:
            dW.zero_()
        else:  # dW_g = dy_g^T @ x_g: A[t, r] = dy[r, g*u+t] (u, n); B[r, j] = x[r, g*p+j] (n, p)
            _gemm("bd_dw", engine, dy, (u, 1, dy.stride(0)), x, (p * x.stride(1), x.stride(0), x.stride(1)),
                  dW, (u * p, p, 1), b, u, p, n)
    return dx, dW


@torch.library.custom_op("structmat::blockdiag_mm", mutates_args=())
def blockdiag_mm(x: Tensor, W: Tensor, engine: str = "triton") -> Tensor:
    return _bd_forward(x, W, engine)


@blockdiag_mm.register_fake
def _(x, W, engine="triton"):
    b, u, _ = W.shape
    return x.new_empty((x.shape[0], b * u))


@torch.library.custom_op("structmat::blockdiag_mm_backward", mutates_args=())
def blockdiag_mm_backward(dy: Tensor, x: Tensor, W: Tensor, engine: str = "triton") -> tuple[Tensor, Tensor]:
    return _bd_backward(dy, x, W, engine)


@blockdiag_mm_backward.register_fake
def _(dy, x, W, engine="triton"):
    return x.new_empty(x.shape), W.new_empty(W.shape)


def _bd_setup(ctx, inputs, output):
    x, W, engine = inputs
    ctx.save_for_backward(x, W)
    ctx.engine = engine
    ctx.set_materialize_grads(False)


def _bd_grad(ctx, dy):
    x, W = ctx.saved_tensors
    if dy is None:
        return None, None, None
    dx, dW = blockdiag_mm_backward(dy, x, W, ctx.engine)
    return dx, dW, None


blockdiag_mm.register_autograd(_bd_grad, setup_context=_bd_setup)


# ----------------------------------------------------------------------------------------------------------------
# Monarch
# ----------------------------------------------------------------------------------------------------------------


def _mon_forward(x: Tensor, R: Tensor, L: Tensor, engine: str = "triton") -> tuple[Tensor, Tensor]:
    """(y, h): the output and the permuted intermediate (kept for the backward). With ``MONARCH_FUSED`` (see there)
    in one launch that writes h as it goes and reads it back from L2, where its first call per shape times that
    faster than the two launches."""
    if not _fused_ok(x, R, L, engine):
        return _two_launch_forward(x, R, L, engine)
    y, h = _empty((x.shape[0], R.shape[0] * L.shape[1]), x), _empty((x.shape[0], R.shape[0] * R.shape[1]), x)
    y = _triton_monarch.monarch_fused(x, R, L, out=y, save=h,
                                      baseline=lambda: _two_launch_forward(x, R, L, engine, y, h)[0])
    return y, h


def _two_launch_forward(x: Tensor, R: Tensor, L: Tensor, engine: str = "triton", y: Tensor | None = None,
                        h: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(y, h) by two grouped GEMMs: stage 1 writes the permuted intermediate, stage 2 reads it (into ``y`` and
    ``h`` where given)."""
    b, bc, p = R.shape
    u = L.shape[1]
    c = bc // b
    n = x.shape[0]
    h = _empty((n, b * bc), x) if h is None else h  # (s, k, q) order
    y = _empty((n, b * u), x) if y is None else y
    # stage 1, group k: A = x[:, k*p:] (n, p); B[j, (s,q)] = R[k, s*c+q, j]; column (s,q) -> h[:, s*b*c + k*c + q]
    _gemm("mon_s1", engine, x, (p * x.stride(1), x.stride(0), x.stride(1)), R, (R.stride(0), R.stride(2), R.stride(1)),
          h, (c, h.stride(0), 1), b, n, bc, p, chunk=c, chunk_stride=bc)
    # stage 2, group s: A = h[:, s*b*c:] (n, b*c) contiguous; B[(k,q), t] = L[s, t, k*c+q]
    _gemm("mon_s2", engine, h, (bc, h.stride(0), 1), L, (L.stride(0), L.stride(2), L.stride(1)),
          y, (u, y.stride(0), 1), b, n, u, bc)
    return y, h


def monarch_siblings(x: Tensor, R: Tensor, L: Tensor, members: int, engine: str = "triton") -> Tensor:
    """The Monarch products of ``members`` fused siblings for one input (inference, many tokens): R and L their
    stacks (``structmat.siblings``: R (b, members*b*c, p), each block's rows member after member; L (members*b, u,
    b*c), block after block), y (N, members*b*u), member j's output in columns [j*b*u, (j+1)*b*u). Two grouped
    GEMMs for all members where each member alone takes two: stage 1 N = members*b*c columns per block (member j's
    chunks land in its own intermediate, h[:, j*b*b*c:]), stage 2 members*b groups. Thin attention projections
    (2048^2 at nb=4, K = 512) get wider products and more programs, and the model issues a third of the launches."""
    b, gbc, p = R.shape
    if gbc % members or L.shape[0] != members * b:
        raise ValueError(f"monarch_siblings: R {tuple(R.shape)} and L {tuple(L.shape)} are not the stacks of "
                         f"{members} Monarch siblings of {b} blocks")
    bc = gbc // members
    c, u, n = bc // b, L.shape[1], x.shape[0]
    h = _empty((n, members * b * bc), x)
    y = _empty((n, members * b * u), x)
    # stage 1, group k: column (j*b+s, q) of R[k]'s rows -> h[:, (j*b+s)*b*c + k*c + q] (member j's (s, k, q) order)
    _gemm("mon_s1", engine, x, (p * x.stride(1), x.stride(0), x.stride(1)), R, (R.stride(0), R.stride(2), R.stride(1)),
          h, (c, h.stride(0), 1), b, n, gbc, p, chunk=c, chunk_stride=bc)
    # stage 2, group j*b+s: A = h[:, (j*b+s)*b*c:] (contiguous b*c), B = L[j*b+s]^T, C = y[:, (j*b+s)*u:]
    _gemm("mon_s2", engine, h, (bc, h.stride(0), 1), L, (L.stride(0), L.stride(2), L.stride(1)),
          y, (u, y.stride(0), 1), members * b, n, u, bc)
    return y


@torch.library.custom_op("structmat::monarch_siblings_mm", mutates_args=())
def monarch_siblings_mm(x: Tensor, R: Tensor, L: Tensor, members: int, engine: str = "triton") -> Tensor:
    """Inference only (no autograd registered): :func:`monarch_siblings` under torch.compile."""
    return monarch_siblings(x, R, L, members, engine)


@monarch_siblings_mm.register_fake
def _(x, R, L, members, engine="triton"):
    return x.new_empty((x.shape[0], L.shape[0] * L.shape[1]))


#: Above the few-token range under the "triton" engine: Monarch's forward as ONE persistent kernel
#: (``_triton_monarch``, issue 12 deliver 3), where its first call per shape times it faster than the two-launch
#: forward (which runs otherwise). In inference (nothing needs a gradient) the intermediate lives in per-program L2
#: scratch instead of a round trip through HBM; in training it is written for the backward and read back from L2.
#: Off unless ``STRUCTMAT_MONARCH_FUSED=1``: correct (interpreter and H200 tests) but slower than the two launches on
#: the H200 (session 19, ``monarch-many-20261205T031840Z.json``: 4096^2 at 8192 tokens 1.21x dense against cuBLAS's
#: 1.64x; its products run at 313-440 TFLOP/s against 560-600, compute-bound at these sizes). (Set at run time: then
#: ``structmat.kernels.clear_cache()``, since ``auto``'s cached decisions read it.)
MONARCH_FUSED = [os.environ.get("STRUCTMAT_MONARCH_FUSED", "0") not in ("", "0")]
MONARCH_FUSED_MIN_TOKENS = [65]  # (at 1-64 tokens inference runs the decode kernels)
#: (fp32's IEEE dots in Triton run far below cuBLAS's fp32 path: dispatch.FP32_TRITON_MONARCH_EFF; tests add it to
#: run the kernel through the interpreter, which mishandles 16-bit dots)
MONARCH_FUSED_DTYPES = (torch.float16, torch.bfloat16)


def fused_applies(tokens: int, x: Tensor, R: Tensor, L: Tensor, engine: str) -> bool:
    """Whether a forward of ``tokens`` rows with x's dtype and these factors takes the one-launch kernel under
    ``engine`` (the dispatch asks it for a token count; ``_fused_ok`` for the call itself)."""
    return (MONARCH_FUSED[0] and engine == "triton" and IMPL["mon_s1"] == "triton"
            and tokens >= MONARCH_FUSED_MIN_TOKENS[0] and x.dtype in MONARCH_FUSED_DTYPES and x.dtype == R.dtype
            and _triton_monarch.offsets_fit(tokens, R, L))


def _fused_ok(x: Tensor, R: Tensor, L: Tensor, engine: str) -> bool:
    return (x.dim() == 2 and (x.is_cuda or _triton_monarch.INTERPRET)
            and fused_applies(x.shape[0], x, R, L, engine))


def _fused_forward(x: Tensor, R: Tensor, L: Tensor) -> Tensor:
    """Inference: the one-launch forward keeping no intermediate, or the two launches where its first call per shape
    measured them faster."""
    return _triton_monarch.monarch_fused(x, R, L, out=_empty((x.shape[0], R.shape[0] * L.shape[1]), x),
                                         baseline=lambda: _two_launch_forward(x, R, L, "triton")[0])


def _mon_backward(dy: Tensor, x: Tensor, R: Tensor, L: Tensor, h: Tensor, engine: str = "triton",
                  need: tuple[bool, bool, bool] = (True, True, True)) -> tuple[Tensor | None, ...]:
    """Gradients of x, R and L (each only if ``need`` asks for it; dh is computed only for dx or dR)."""
    b, bc, p = R.shape
    u = L.shape[1]
    c = bc // b
    n = x.shape[0]
    dy = dy.contiguous()  # (autograd may hand an expanded or transposed gradient)
    dx = dR = dL = None
    if need[0] or need[1]:
        dh = _empty((n, b * bc), x)  # (k, s, q) order, as stage 1 produced it
        # dh_s = dy_s @ L_s: A = dy[:, s*u:] (n, u); B[t, (k,q)] = L[s, t, k*c+q];
        # column (k,q) -> dh[:, k*b*c + s*c + q]
        _gemm("mon_dh", engine, dy, (u, dy.stride(0), 1), L, (L.stride(0), L.stride(1), L.stride(2)),
              dh, (c, dh.stride(0), 1), b, n, bc, u, chunk=c, chunk_stride=bc)
        if need[0]:  # dx_k = dh_k @ R_k: A = dh[:, k*b*c:] (n, b*c); B[(s,q), j] = R[k, s*c+q, j]
            dx = _empty((n, b * p), x)
            _gemm("mon_dx", engine, dh, (bc, dh.stride(0), 1), R, (R.stride(0), R.stride(1), R.stride(2)),
                  dx, (p, dx.stride(0), 1), b, n, p, bc)
        if need[1]:  # dR_k = dh_k^T @ x_k: A[(s,q), r] = dh[r, k*b*c + s*c+q] (b*c, n); B[r, j] = x[r, k*p+j]
            dR = _empty(R.shape, R)
            if n == 0:
                dR.zero_()
            else:
                _gemm("mon_dr", engine, dh, (bc, 1, dh.stride(0)), x, (p * x.stride(1), x.stride(0), x.stride(1)),
                      dR, (bc * p, p, 1), b, bc, p, n)
    if need[2]:  # dL_s = dy_s^T @ h_s: A[t, r] = dy[r, s*u+t] (u, n); B[r, (k,q)] = h[r, s*b*c + k*c+q] (n, b*c)
        dL = _empty(L.shape, L)
        if n == 0:
            dL.zero_()
        else:
            _gemm("mon_dl", engine, dy, (u, 1, dy.stride(0)), h, (bc, h.stride(0), 1),
                  dL, (u * bc, bc, 1), b, u, bc, n)
    return dx, dR, dL


@torch.library.custom_op("structmat::monarch_mm", mutates_args=())
def monarch_mm(x: Tensor, R: Tensor, L: Tensor, engine: str = "triton") -> tuple[Tensor, Tensor]:
    return _mon_forward(x, R, L, engine)


@monarch_mm.register_fake
def _(x, R, L, engine="triton"):
    b, bc, _ = R.shape
    return x.new_empty((x.shape[0], b * L.shape[1])), x.new_empty((x.shape[0], b * bc))


@torch.library.custom_op("structmat::monarch_fused_mm", mutates_args=())
def monarch_fused_mm(x: Tensor, R: Tensor, L: Tensor) -> Tensor:
    """Inference only (no autograd registered): y of ``monarch_mm`` in one launch, no intermediate returned."""
    return _fused_forward(x, R, L)


@monarch_fused_mm.register_fake
def _(x, R, L):
    return x.new_empty((x.shape[0], R.shape[0] * L.shape[1]))


@torch.library.custom_op("structmat::monarch_mm_backward", mutates_args=())
def monarch_mm_backward(dy: Tensor, x: Tensor, R: Tensor, L: Tensor, h: Tensor,
                        engine: str = "triton") -> tuple[Tensor, Tensor, Tensor]:
    return _mon_backward(dy, x, R, L, h, engine)


@monarch_mm_backward.register_fake
def _(dy, x, R, L, h, engine="triton"):
    return x.new_empty(x.shape), R.new_empty(R.shape), L.new_empty(L.shape)


def _mon_setup(ctx, inputs, output):
    x, R, L, engine = inputs
    ctx.save_for_backward(x, R, L, output[1])
    ctx.engine = engine
    ctx.mark_non_differentiable(output[1])  # h is internal: no gradient flows into it
    ctx.set_materialize_grads(False)


def _mon_grad(ctx, dy, dh_unused):
    x, R, L, h = ctx.saved_tensors
    if dy is None:
        return None, None, None, None
    return (*monarch_mm_backward(dy, x, R, L, h, ctx.engine), None)


monarch_mm.register_autograd(_mon_grad, setup_context=_mon_setup)


# Eager mode goes through plain autograd Functions over the same implementation: a torch.library custom op's
# Python dispatch and autograd wrapper cost about as much host time as the launches they wrap (benchmarks/NOTES.md,
# run 6), and few-token and training calls are host-bound. Under torch.compile the custom ops above are used, so
# the graph holds opaque nodes with fake kernels.


class _MonarchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, R, L, engine):
        y, h = _mon_forward(x, R, L, engine)
        ctx.save_for_backward(x, R, L, h)
        ctx.engine = engine
        return y

    @staticmethod
    def backward(ctx, dy):
        x, R, L, h = ctx.saved_tensors
        return (*_mon_backward(dy, x, R, L, h, ctx.engine, ctx.needs_input_grad[:3]), None)


class _BlockdiagFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, engine):
        ctx.save_for_backward(x, W)
        ctx.engine = engine
        return _bd_forward(x, W, engine)

    @staticmethod
    def backward(ctx, dy):
        x, W = ctx.saved_tensors
        return (*_bd_backward(dy, x, W, ctx.engine, ctx.needs_input_grad[:2]), None)


def _needs_autograd(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def monarch(x: Tensor, R: Tensor, L: Tensor, engine: str = "triton") -> Tensor:
    """The Monarch product y (the custom op under torch.compile, the same code without its dispatch otherwise)."""
    fused = _fused_ok(x, R, L, engine) and not _needs_autograd(x, R, L)
    if torch.compiler.is_compiling():
        return monarch_fused_mm(x, R, L) if fused else monarch_mm(x, R, L, engine)[0]
    if fused:
        return _fused_forward(x, R, L)
    if _needs_autograd(x, R, L):
        return _MonarchFunction.apply(x, R, L, engine)
    return _mon_forward(x, R, L, engine)[0]


def blockdiag(x: Tensor, W: Tensor, engine: str = "triton") -> Tensor:
    """The block-diagonal product (custom op under torch.compile, as :func:`monarch`)."""
    if torch.compiler.is_compiling():
        return blockdiag_mm(x, W, engine)
    if _needs_autograd(x, W):
        return _BlockdiagFunction.apply(x, W, engine)
    return _bd_forward(x, W, engine)


@torch.library.custom_op("structmat::nm_expand", mutates_args=())
def nm_expand_op(values: Tensor, positions: Tensor, n: int, m: int) -> Tensor:
    return _triton_nm_expand.nm_expand(values, positions, n, m)


@nm_expand_op.register_fake
def _(values, positions, n, m):
    return values.new_empty((values.shape[0], values.shape[1] // n * m))


def nm(x: Tensor, values: Tensor, positions: Tensor, n: int, m: int) -> Tensor:
    """The N:M product at many tokens in inference (no gradient): the weight rebuilt a tile of rows at a time, as the
    reference does (``structures.sparse._row_blocks``: never the whole dense weight), each tile by one expansion
    kernel, then one GEMM per tile."""
    from ..structures.sparse import nm_multiply

    expand = nm_expand_op if torch.compiler.is_compiling() else _triton_nm_expand.nm_expand
    return nm_multiply(x, values, positions, n, m, expand=expand)


def calibrate(tokens: int = 8192, features: int = 4096, nblocks: int = 4, dtype=torch.bfloat16) -> dict:
    """Time every switchable GEMM role on both engines at one representative shape (CUDA) and keep the faster in
    ``IMPL``. Returns {role: {"triton": ms, "cublas": ms}}. The math is the same either way."""
    import triton.testing

    b, n = nblocks, tokens
    p = u = features // b
    c = max(1, min(u, p) // b)
    bc = b * c
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, b * p, device=dev, dtype=dtype, generator=g)
    W = torch.randn(b, u, p, device=dev, dtype=dtype, generator=g)
    R = torch.randn(b, bc, p, device=dev, dtype=dtype, generator=g)
    L = torch.randn(b, u, bc, device=dev, dtype=dtype, generator=g)
    dy = torch.randn(n, b * u, device=dev, dtype=dtype, generator=g)
    _, h = _two_launch_forward(x, R, L)  # (the GEMM roles: never the one-launch form)
    roles = {"bd_fwd": lambda: _bd_forward(x, W), "bd_dx": lambda: _bd_backward(dy, x, W),
             "bd_dw": lambda: _bd_backward(dy, x, W), "mon_s2": lambda: _two_launch_forward(x, R, L),
             "mon_s1": lambda: _two_launch_forward(x, R, L), "mon_dh": lambda: _mon_backward(dy, x, R, L, h),
             "mon_dx": lambda: _mon_backward(dy, x, R, L, h), "mon_dl": lambda: _mon_backward(dy, x, R, L, h),
             "mon_dr": lambda: _mon_backward(dy, x, R, L, h)}
    out = {}
    for role, fn in roles.items():
        out[role] = {}
        for engine in ("triton", "cublas"):
            IMPL[role] = engine
            out[role][engine] = float(triton.testing.do_bench(fn, warmup=10, rep=30, return_mode="median"))
        IMPL[role] = min(out[role], key=out[role].get)
    return out
