"""The delta rule through flash-linear-attention (fla, MIT; PyPI ``flash-linear-attention`` + ``fla-core`` 0.6.0,
the ``[gpu]`` extra): Triton kernels for the delta rule (``chunk_delta_rule``), the gated delta rule
(``chunk_gated_delta_rule``) and the (gated) delta product (``chunk_gated_delta_product``, ``n_h > 1``).

The mapping from :func:`structmat.mixers.delta_rule`'s contract to fla's is exact:

* scale: structmat never scales ``q`` (callers L2-normalize it), so fla gets ``scale=1.0``.
* beta: passed as is (no sigmoid in the kernel), so any range works, (0, 2) included (eigenvalues in [-1, 1]);
  cast to the kernels' dtype (that of q/k/v), as fla's own layers do, its gradient flows back in float32.
* gate: ``log_gate`` is fla's ``g`` (natural-log decay per token, float32). For ``n_h > 1`` fla applies it once per
  token, before the first Householder sub-step: structmat's order.
* ``n_h > 1``: keys/values/betas go in token-major, sub-step-minor order, ``(B, T * n_h, H, .)``.
* ``mask`` (padding): folded in as identity steps (beta = 0, log gate = 0) and the outputs of padded tokens zeroed,
  as the pure-PyTorch backends do.
* ``cu_seqlens``, ``initial_state (N, H, Dk, Dv)``, the final state (float32, as fla returns it): fla's layout.
* ``chunk_size`` is the chunked form's; fla's kernels use their own (64), which changes rounding only.

What fla cannot do (checked by :func:`fla_unsupported`, which says why): CPU tensors, float32/float64, head dims
above 256, and, on Hopper with Triton in [3.4, 3.7.1), the backward of the gated kernels (fla refuses it, issue
#640, unless its TileLang backend is installed). ``backend="auto"`` (see :func:`resolve_backend`) then runs the
chunked form and logs why, once per distinct decision.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
from torch import Tensor

__all__ = ["fla_available", "fla_unsupported", "resolve_backend", "delta_rule_fla", "call_fla_direct"]

log = logging.getLogger("structmat.mixers")

_MAX_HEAD_DIM = 256  # fla's chunk kernels assert K <= 256
_logged: set = set()


@functools.lru_cache(maxsize=None)
def fla_available() -> bool:
    """Whether fla's ops can be imported (without importing them: ``import fla`` is slow)."""
    try:
        return importlib.util.find_spec("fla.ops") is not None
    except (ImportError, ValueError):
        return False


def _ops():
    try:
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_product import chunk_gated_delta_product
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError as err:
        raise ImportError("backend='fla' needs flash-linear-attention: pip install 'structmat[gpu]' "
                          f"(or flash-linear-attention fla-core); import failed: {err}") from err
    return chunk_delta_rule, chunk_gated_delta_rule, chunk_gated_delta_product


@functools.lru_cache(maxsize=None)
def _gated_backward_refused() -> bool:
    """fla 0.6.0 refuses the gated backward on Hopper with Triton in [3.4, 3.7.1) (fla issue #640)."""
    try:
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except ImportError:
        return False
    if importlib.util.find_spec("tilelang") is not None:
        return False  # fla routes that kernel to TileLang then
    return bool(IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1)


def fla_unsupported(q: Tensor, k: Tensor, v: Tensor, gated: bool, needs_grad: bool) -> str | None:
    """``None`` when fla can run these inputs, else the reason it cannot (a short phrase)."""
    if not fla_available():
        return "flash-linear-attention is not installed (pip install 'structmat[gpu]')"
    if q.device.type != "cuda":
        return f"fla has no {q.device.type} kernels"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"fla's kernels take bf16/fp16, got {str(q.dtype).replace('torch.', '')}"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return "fla needs q, k, v in one dtype"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"fla's kernels take head dims <= {_MAX_HEAD_DIM}, got Dk={q.shape[-1]}"
    if gated and needs_grad and _gated_backward_refused():
        return "fla 0.6.0 refuses the gated backward on Hopper with Triton < 3.7.1 (fla issue #640)"
    return None


def resolve_backend(backend: str, q: Tensor, k: Tensor, v: Tensor, gated: bool, needs_grad: bool,
                    who: str = "delta_rule") -> str:
    """The backend that runs: ``"auto"`` becomes ``"fla"`` when :func:`fla_unsupported` has no objection, else
    ``"chunked"``; the decision and its reason are logged once per distinct (who, decision, reason)."""
    if backend != "auto":
        return backend
    why = fla_unsupported(q, k, v, gated, needs_grad)
    chosen = "chunked" if why else "fla"
    key = (who, chosen, why)
    if key not in _logged:
        _logged.add(key)
        log.info("%s: backend='auto' runs %r%s", who, chosen, f" ({why})" if why else
                 f" (CUDA {str(q.dtype).replace('torch.', '')})")
    return chosen


def delta_rule_fla(q, k, v, beta, log_gate=None, initial_state=None, output_final_state=False, mask=None,
                   cu_seqlens=None):
    """:func:`structmat.mixers.delta_rule` on fla's kernels. Inputs are already checked: q (B,T,H,Dk),
    k (B,T,H,nh,Dk), v (B,T,H,nh,Dv), beta (B,T,H,nh), log_gate (B,T,H) or None."""
    chunk_delta_rule, chunk_gated_delta_rule, chunk_gated_delta_product = _ops()
    B, T, H, nh, Dk = k.shape
    kd = q.dtype
    sd = torch.float64 if kd == torch.float64 else torch.float32  # gate and state: float32 for the kernels
    beta = beta.to(kd)
    g = None if log_gate is None else log_gate.to(sd)
    if mask is not None:  # padded tokens are identity steps: no write, no decay
        beta = beta * mask.to(kd)[:, :, None, None]
        g = None if g is None else g * mask.to(sd)[:, :, None]
    h0 = None if initial_state is None else initial_state.to(sd).contiguous()
    cu = None if cu_seqlens is None else cu_seqlens.to(device=q.device, dtype=torch.long)
    if nh == 1:
        # squeeze, not indexing: the backward of a view is a view, that of k[:, :, :, 0] a zero-filled copy (a
        # T-proportional cost measured as 5-10% of fla's time at T = 8k-16k on an H200)
        k1, v1, b1 = k.squeeze(3), v.squeeze(3), beta.squeeze(3)
        if g is None:
            o, S = chunk_delta_rule(q, k1, v1, b1, scale=1.0, initial_state=h0,
                                    output_final_state=output_final_state, cu_seqlens=cu)
        else:
            o, S = chunk_gated_delta_rule(q, k1, v1, g, b1, scale=1.0, initial_state=h0,
                                          output_final_state=output_final_state, cu_seqlens=cu)
    else:  # sub-steps of one token are consecutive: (B, T, H, nh, .) -> (B, T*nh, H, .)
        ks = k.transpose(2, 3).reshape(B, T * nh, H, Dk)
        vs = v.transpose(2, 3).reshape(B, T * nh, H, v.shape[-1])
        bs = beta.transpose(2, 3).reshape(B, T * nh, H)
        o, S = chunk_gated_delta_product(q, ks, vs, g, bs, nh, scale=1.0, initial_state=h0,
                                         output_final_state=output_final_state, cu_seqlens=cu)
    if mask is not None:
        o = o * mask.to(o.dtype)[:, :, None, None]
    return o.to(q.dtype), (S if output_final_state else None)


def call_fla_direct(q, k, v, beta, log_gate=None):
    """fla called directly on (B, T, H, D) inputs in its own layout (n_h = 1): the baseline of the benchmark."""
    chunk_delta_rule, chunk_gated_delta_rule, _ = _ops()
    if log_gate is None:
        return chunk_delta_rule(q, k, v, beta, scale=1.0)[0]
    return chunk_gated_delta_rule(q, k, v, log_gate, beta, scale=1.0)[0]
