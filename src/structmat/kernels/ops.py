"""Triton-backed ``torch.library`` custom ops for the block-diagonal and Monarch products.

Each op has a fake (meta) implementation and a registered autograd formula whose backward is itself a custom op,
so ``torch.compile(fullgraph=True)`` traces through them as opaque nodes. Shapes follow the structures' references:

  ``structmat::blockdiag_mm(x, W)``: x (N, b*p), W (b, u, p) -> y (N, b*u)  [== structures.blockdiag.blockdiag_bmm]
  ``structmat::monarch_mm(x, R, L)``: x (N, b*p), R (b, b*c, p), L (b, u, b*c) -> (y (N, b*u), h (N, b*b*c))
      [y == structures.monarch.monarch_multiply; h is the permuted intermediate kept for the backward pass]

Layouts. Stage 1 of Monarch computes, for every input block k, h_k = x_k @ R_k^T whose columns are ordered (s, q)
(chunk s of c intermediates goes to output block s). The kernel stores column (s, q) of group k at
``h[:, s*b*c + k*c + q]``, i.e. h is written directly in the (s, k, q) order that stage 2 (block s: y_s = h_s @ L_s^T)
reads as one contiguous row-panel. The backward pass writes dh in stage 1's (k, s, q) order the same way.
No transposed copy is ever materialised.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton_gemm import grouped_gemm

#: Tests set this to fill every output buffer with NaN before the kernel writes it (an unwritten element shows).
POISON = False


def _empty(shape, like: Tensor) -> Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _zeros_if_empty(t: Tensor, n_tokens: int) -> Tensor | None:
    return t.zero_() if n_tokens == 0 else None


# ----------------------------------------------------------------------------------------------------------------
# Block-diagonal
# ----------------------------------------------------------------------------------------------------------------


def _bd_forward(x: Tensor, W: Tensor) -> Tensor:
    b, u, p = W.shape
    n = x.shape[0]
    y = _empty((n, b * u), x)
    # group g: A = x[:, g*p:(g+1)*p] (n, p); B[j, t] = W[g, t, j] (p, u); C = y[:, g*u:(g+1)*u]
    grouped_gemm(x, (p * x.stride(1), x.stride(0), x.stride(1)), W, (W.stride(0), W.stride(2), W.stride(1)),
                 y, (u, y.stride(0), 1), b, n, u, p)
    return y


def _bd_backward(dy: Tensor, x: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    b, u, p = W.shape
    n = x.shape[0]
    dx = _empty((n, b * p), x)
    dW = _empty((b, u, p), W)
    # dx_g = dy_g @ W_g: A = dy[:, g*u:] (n, u); B[t, j] = W[g, t, j]
    grouped_gemm(dy, (u * dy.stride(1), dy.stride(0), dy.stride(1)), W, (W.stride(0), W.stride(1), W.stride(2)),
                 dx, (p, dx.stride(0), 1), b, n, p, u)
    if n == 0:
        return dx, dW.zero_()
    # dW_g = dy_g^T @ x_g: A[t, r] = dy[r, g*u+t] (u, n); B[r, j] = x[r, g*p+j] (n, p)
    grouped_gemm(dy, (u * dy.stride(1), dy.stride(1), dy.stride(0)), x, (p * x.stride(1), x.stride(0), x.stride(1)),
                 dW, (u * p, p, 1), b, u, p, n)
    return dx, dW


@torch.library.custom_op("structmat::blockdiag_mm", mutates_args=())
def blockdiag_mm(x: Tensor, W: Tensor) -> Tensor:
    return _bd_forward(x, W)


@blockdiag_mm.register_fake
def _(x, W):
    b, u, _ = W.shape
    return x.new_empty((x.shape[0], b * u))


@torch.library.custom_op("structmat::blockdiag_mm_backward", mutates_args=())
def blockdiag_mm_backward(dy: Tensor, x: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    return _bd_backward(dy, x, W)


@blockdiag_mm_backward.register_fake
def _(dy, x, W):
    return x.new_empty(x.shape), W.new_empty(W.shape)


def _bd_setup(ctx, inputs, output):
    x, W = inputs
    ctx.save_for_backward(x, W)
    ctx.set_materialize_grads(False)


def _bd_grad(ctx, dy):
    x, W = ctx.saved_tensors
    if dy is None:
        return None, None
    dx, dW = blockdiag_mm_backward(dy, x, W)
    return dx, dW


blockdiag_mm.register_autograd(_bd_grad, setup_context=_bd_setup)


# ----------------------------------------------------------------------------------------------------------------
# Monarch
# ----------------------------------------------------------------------------------------------------------------


def _mon_forward(x: Tensor, R: Tensor, L: Tensor) -> tuple[Tensor, Tensor]:
    b, bc, p = R.shape
    u = L.shape[1]
    c = bc // b
    n = x.shape[0]
    h = _empty((n, b * bc), x)  # (s, k, q) order
    y = _empty((n, b * u), x)
    # stage 1, group k: A = x[:, k*p:] (n, p); B[j, (s,q)] = R[k, s*c+q, j]; column (s,q) -> h[:, s*b*c + k*c + q]
    grouped_gemm(x, (p * x.stride(1), x.stride(0), x.stride(1)), R, (R.stride(0), R.stride(2), R.stride(1)),
                 h, (c, h.stride(0), 1), b, n, bc, p, chunk=c, chunk_stride=bc)
    # stage 2, group s: A = h[:, s*b*c:] (n, b*c) contiguous; B[(k,q), t] = L[s, t, k*c+q]
    grouped_gemm(h, (bc, h.stride(0), 1), L, (L.stride(0), L.stride(2), L.stride(1)),
                 y, (u, y.stride(0), 1), b, n, u, bc)
    return y, h


def _mon_backward(dy: Tensor, x: Tensor, R: Tensor, L: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    b, bc, p = R.shape
    u = L.shape[1]
    c = bc // b
    n = x.shape[0]
    dh = _empty((n, b * bc), x)  # (k, s, q) order, as stage 1 produced it
    dx = _empty((n, b * p), x)
    dR = _empty(R.shape, R)
    dL = _empty(L.shape, L)
    # dh_s = dy_s @ L_s: A = dy[:, s*u:] (n, u); B[t, (k,q)] = L[s, t, k*c+q]; column (k,q) -> dh[:, k*b*c + s*c + q]
    grouped_gemm(dy, (u * dy.stride(1), dy.stride(0), dy.stride(1)), L, (L.stride(0), L.stride(1), L.stride(2)),
                 dh, (c, dh.stride(0), 1), b, n, bc, u, chunk=c, chunk_stride=bc)
    # dx_k = dh_k @ R_k: A = dh[:, k*b*c:] (n, b*c); B[(s,q), j] = R[k, s*c+q, j]
    grouped_gemm(dh, (bc, dh.stride(0), 1), R, (R.stride(0), R.stride(1), R.stride(2)),
                 dx, (p, dx.stride(0), 1), b, n, p, bc)
    if n == 0:
        return dx, dR.zero_(), dL.zero_()
    # dL_s = dy_s^T @ h_s: A[t, r] = dy[r, s*u+t] (u, n); B[r, (k,q)] = h[r, s*b*c + k*c+q] (n, b*c)
    grouped_gemm(dy, (u * dy.stride(1), dy.stride(1), dy.stride(0)), h, (bc, h.stride(0), 1),
                 dL, (u * bc, bc, 1), b, u, bc, n)
    # dR_k = dh_k^T @ x_k: A[(s,q), r] = dh[r, k*b*c + s*c+q] (b*c, n); B[r, j] = x[r, k*p+j] (n, p)
    grouped_gemm(dh, (bc, 1, dh.stride(0)), x, (p * x.stride(1), x.stride(0), x.stride(1)),
                 dR, (bc * p, p, 1), b, bc, p, n)
    return dx, dR, dL


@torch.library.custom_op("structmat::monarch_mm", mutates_args=())
def monarch_mm(x: Tensor, R: Tensor, L: Tensor) -> tuple[Tensor, Tensor]:
    return _mon_forward(x, R, L)


@monarch_mm.register_fake
def _(x, R, L):
    b, bc, _ = R.shape
    return x.new_empty((x.shape[0], b * L.shape[1])), x.new_empty((x.shape[0], b * bc))


@torch.library.custom_op("structmat::monarch_mm_backward", mutates_args=())
def monarch_mm_backward(dy: Tensor, x: Tensor, R: Tensor, L: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _mon_backward(dy, x, R, L, h)


@monarch_mm_backward.register_fake
def _(dy, x, R, L, h):
    return x.new_empty(x.shape), R.new_empty(R.shape), L.new_empty(L.shape)


def _mon_setup(ctx, inputs, output):
    x, R, L = inputs
    ctx.save_for_backward(x, R, L, output[1])
    ctx.mark_non_differentiable(output[1])  # h is internal: no gradient flows into it
    ctx.set_materialize_grads(False)


def _mon_grad(ctx, dy, dh_unused):
    x, R, L, h = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros(x.shape[0], L.shape[0] * L.shape[1], dtype=x.dtype, device=x.device)
    return monarch_mm_backward(dy, x, R, L, h)


monarch_mm.register_autograd(_mon_grad, setup_context=_mon_setup)


def monarch(x: Tensor, R: Tensor, L: Tensor) -> Tensor:
    """The Monarch product through the Triton kernels; returns only y."""
    return monarch_mm(x, R, L)[0]


def blockdiag(x: Tensor, W: Tensor) -> Tensor:
    return blockdiag_mm(x, W)
