"""Token mixers as ``nn.Module`` s, with a decode-step API and a state cache, and a small standalone LM.

* :class:`DeltaMixer` — DeltaNet (``n_householder=1``), Gated DeltaNet (``gated=True``), DeltaProduct
  (``n_householder > 1``); ``allow_neg_eigval`` picks the eigenvalue range [-1, 1] (beta = 2 sigmoid) instead of
  [0, 1] (beta = sigmoid). q/k/v pass a causal depthwise short convolution + SiLU, q and every key are
  L2-normalized, the per-head output is RMS-normalized (times SiLU of an output gate when ``output_gate``).
* :class:`DiagonalSSMMixer` — a diagonal SSM (S4D Lin/Inv/Real, or selective with transitions in (0,1)/(-1,1)).

Every mixer maps ``(B, T, d_model) -> (B, T, d_model)``:
``y, cache = mixer(x, mask=None, cu_seqlens=None, cache=None, use_cache=False)``; ``y, cache = mixer.step(x_t, cache)``
decodes one token ``x_t (B, d_model)`` from the carried :class:`MixerCache` (recurrent state + short-conv window).
A full sequence equals prefill-then-decode (tested). Sequence calls use the backend named at construction
(``"chunked"``, ``"recurrent"``, ``"fla"`` or ``"auto"``: fla on CUDA bf16/fp16 where it can run, else chunked; the
choice is logged once and shown in the repr as ``backend=auto (last call ran ...)``); ``step`` is one recurrent step by
definition.
Padding: ``mask`` (B, T) with 1 for real tokens; padded tokens are identity steps, their outputs 0. When a cache is
returned, padding must be on the left (checked). ``cu_seqlens`` (B = 1, packed) takes precedence in the sense of
:mod:`structmat.mixers.delta`: it may not be combined with ``mask``; caching is not supported with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .delta import BACKENDS, beta_from_logits, delta_rule, l2norm
from .fla_backend import resolve_backend
from .ssm import INITS, S4DKernel, SelectiveDiagonal

__all__ = ["MixerCache", "ShortConv", "DeltaMixer", "DeltaNet", "GatedDeltaNet", "DeltaProduct",
           "DiagonalSSMMixer", "MixerLM", "RMSNorm"]


@dataclass
class MixerCache:
    """Decode state of one mixer: the recurrent state, the short-conv window and the tokens seen."""

    state: Tensor | None = None
    conv: Tensor | None = None
    seen: int = 0
    extra: dict = field(default_factory=dict)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _seq_start(T: int, cu_seqlens: Tensor | None, device) -> Tensor | None:
    if cu_seqlens is None:
        return None
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    sid = torch.bucketize(torch.arange(T, device=device), cu[1:], right=True)
    return cu[sid]  # first position of each token's sequence


class ShortConv(nn.Module):
    """Causal depthwise convolution of width ``kernel`` over (B, T, C), with a carried window of the last
    ``kernel - 1`` inputs and no leakage across ``cu_seqlens`` boundaries."""

    def __init__(self, channels: int, kernel: int = 4):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.randn(channels, kernel) / math.sqrt(kernel))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, window: Tensor | None = None, cu_seqlens: Tensor | None = None):
        B, T, C = x.shape
        K = self.kernel
        prev = x.new_zeros(B, K - 1, C) if window is None else window.to(x.dtype)
        xc = torch.cat([prev, x], 1)  # (B, K-1+T, C)
        start = _seq_start(T, cu_seqlens, x.device)
        y = self.bias.to(x.dtype).expand(B, T, C)
        pos = torch.arange(T, device=x.device)
        for i in range(K):  # tap i looks i steps back
            term = xc[:, K - 1 - i:K - 1 - i + T] * self.weight[:, K - 1 - i].to(x.dtype)
            if start is not None:
                term = term * ((pos - i) >= start).to(x.dtype)[None, :, None]
            y = y + term
        return y, xc[:, -(K - 1):] if K > 1 else x.new_zeros(B, 0, C)


def _check_left_padded(mask: Tensor | None):
    if mask is not None and not bool(mask[:, -1].all()):
        raise ValueError("a cache after a padded prefill needs left padding (mask[:, -1] all true)")


class DeltaMixer(nn.Module):
    """Generalized delta-rule token mixer (DeltaNet / Gated DeltaNet / DeltaProduct); see the module docstring."""

    def __init__(self, d_model: int, n_heads: int = 4, head_dim: int | None = None, n_householder: int = 1,
                 gated: bool = False, allow_neg_eigval: bool = True, conv_size: int = 4, output_gate: bool | None = None,
                 backend: str = "chunked", chunk_size: int = 64):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"DeltaMixer: unknown backend {backend!r}; choose one of {BACKENDS} ('auto' runs fla on "
                             "CUDA bf16/fp16 where it is installed and supports the inputs, else 'chunked')")
        hd = head_dim or d_model // n_heads
        self.backend_used: str | None = None  # what the last sequence call ran (differs from backend for "auto")
        self.d_model, self.n_heads, self.head_dim, self.nh = d_model, n_heads, hd, n_householder
        self.gated, self.allow_neg_eigval, self.backend, self.chunk_size = gated, allow_neg_eigval, backend, chunk_size
        self.output_gate = gated if output_gate is None else output_gate
        H, nh = n_heads, n_householder
        self.q_proj = nn.Linear(d_model, H * hd, bias=False)
        self.k_proj = nn.Linear(d_model, H * nh * hd, bias=False)
        self.v_proj = nn.Linear(d_model, H * nh * hd, bias=False)
        self.b_proj = nn.Linear(d_model, H * nh, bias=True)
        self.conv = ShortConv(H * hd * (1 + 2 * nh), conv_size) if conv_size > 1 else None
        if gated:
            self.a_proj = nn.Linear(d_model, H, bias=False)
            dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
            self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))
        if self.output_gate:
            self.g_proj = nn.Linear(d_model, H * hd, bias=False)
        self.o_norm = RMSNorm(hd)
        self.o_proj = nn.Linear(H * hd, d_model, bias=False)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}, n_householder={self.nh}, "
                f"gated={self.gated}, eig_range={'[-1,1]' if self.allow_neg_eigval else '[0,1]'}, "
                f"backend={self.backend}" + (f" (last call ran {self.backend_used})" if self.backend == "auto" and
                                              self.backend_used else ""))

    def _inputs(self, x, mask, window, cu_seqlens):
        B, T, _ = x.shape
        H, hd, nh = self.n_heads, self.head_dim, self.nh
        if mask is not None:
            x = x * mask.to(x.dtype)[:, :, None]
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)
        new_window = None
        if self.conv is not None:
            qkv, new_window = self.conv(qkv, window, cu_seqlens)
        qkv = F.silu(qkv)
        q, k, v = qkv.split([H * hd, H * nh * hd, H * nh * hd], -1)
        q = l2norm(q.view(B, T, H, hd))
        k = l2norm(k.view(B, T, H, nh, hd))
        v = v.view(B, T, H, nh, hd)
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        beta = beta_from_logits(self.b_proj(x).to(cd).view(B, T, H, nh), self.allow_neg_eigval)
        lg = None
        if self.gated:
            lg = -torch.exp(self.A_log.to(cd)) * F.softplus(self.a_proj(x).to(cd) + self.dt_bias.to(cd))
        return q, k, v, beta, lg, new_window

    def _out(self, o, x):
        B, T = x.shape[:2]
        o = self.o_norm(o)
        if self.output_gate:
            o = o * F.silu(self.g_proj(x)).view(B, T, self.n_heads, self.head_dim)
        return self.o_proj(o.reshape(B, T, -1).to(x.dtype))

    def forward(self, x: Tensor, mask: Tensor | None = None, cu_seqlens: Tensor | None = None,
                cache: MixerCache | None = None, use_cache: bool = False):
        if cu_seqlens is not None and (cache is not None or use_cache):
            raise ValueError("DeltaMixer: caching is not supported with cu_seqlens (decode one padded batch instead)")
        if use_cache:
            _check_left_padded(mask)
        window = None if cache is None else cache.conv
        state = None if cache is None else cache.state
        q, k, v, beta, lg, new_window = self._inputs(x, mask, window, cu_seqlens)
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or beta.requires_grad)
        self.backend_used = resolve_backend(self.backend, q, k, v, self.gated, needs_grad, who=type(self).__name__)
        o, S = delta_rule(q, k, v, beta, lg, initial_state=state, output_final_state=use_cache, mask=mask,
                          cu_seqlens=cu_seqlens, backend=self.backend_used, chunk_size=self.chunk_size)
        y = self._out(o, x)
        if not use_cache:
            return y, None
        seen = (0 if cache is None else cache.seen) + x.shape[1]
        return y, MixerCache(state=S, conv=new_window, seen=seen)

    def step(self, x_t: Tensor, cache: MixerCache | None = None):
        """Decode one token x_t (B, d_model) with one recurrent step; returns (y_t (B, d_model), new cache)."""
        x = x_t.unsqueeze(1)
        window = None if cache is None else cache.conv
        q, k, v, beta, lg, new_window = self._inputs(x, None, window, None)
        o, S = delta_rule(q, k, v, beta, lg, initial_state=None if cache is None else cache.state,
                          output_final_state=True, backend="recurrent")
        return self._out(o, x)[:, 0], MixerCache(state=S, conv=new_window, seen=(0 if cache is None else cache.seen) + 1)


def DeltaNet(d_model: int, n_heads: int = 4, allow_neg_eigval: bool = True, **kw) -> DeltaMixer:
    return DeltaMixer(d_model, n_heads, n_householder=1, gated=False, allow_neg_eigval=allow_neg_eigval, **kw)


def GatedDeltaNet(d_model: int, n_heads: int = 4, allow_neg_eigval: bool = True, **kw) -> DeltaMixer:
    return DeltaMixer(d_model, n_heads, n_householder=1, gated=True, allow_neg_eigval=allow_neg_eigval, **kw)


def DeltaProduct(d_model: int, n_heads: int = 4, n_householder: int = 2, allow_neg_eigval: bool = True,
                 **kw) -> DeltaMixer:
    return DeltaMixer(d_model, n_heads, n_householder=n_householder, allow_neg_eigval=allow_neg_eigval, **kw)


class DiagonalSSMMixer(nn.Module):
    """Gated diagonal-SSM mixer: in_proj -> (u, z); u -> short conv -> SiLU -> SSM; y = SSM(u) * SiLU(z) -> out_proj.
    ``kind`` is one of ``s4d-lin``, ``s4d-inv``, ``s4d-real`` (ZOH, time-invariant) or ``selective``."""

    def __init__(self, d_model: int, d_state: int = 16, kind: str = "selective", allow_neg_eigval: bool = True,
                 expand: int = 1, conv_size: int = 4):
        super().__init__()
        if kind not in INITS + ("selective",):
            raise ValueError(f"unknown SSM kind {kind!r}; choose one of {INITS + ('selective',)}")
        if kind != "selective" and allow_neg_eigval:
            allow_neg_eigval = False  # documented: the ZOH S4D transitions exp(dt A) have positive real part
        self.kind, self.allow_neg_eigval = kind, allow_neg_eigval
        di = expand * d_model
        self.in_proj = nn.Linear(d_model, 2 * di, bias=False)
        self.conv = ShortConv(di, conv_size) if conv_size > 1 else None
        self.ssm = (SelectiveDiagonal(di, d_state, allow_neg_eigval) if kind == "selective"
                    else S4DKernel(di, d_state, kind))
        self.out_proj = nn.Linear(di, d_model, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None = None, cu_seqlens: Tensor | None = None,
                cache: MixerCache | None = None, use_cache: bool = False):
        if cu_seqlens is not None:
            raise ValueError("DiagonalSSMMixer: pass a padded batch with mask (cu_seqlens is not supported)")
        if use_cache:
            _check_left_padded(mask)
        if mask is not None:
            x = x * mask.to(x.dtype)[:, :, None]
        u, z = self.in_proj(x).chunk(2, -1)
        window = None
        if self.conv is not None:
            u, window = self.conv(u, None if cache is None else cache.conv)
        u = F.silu(u)
        y, h = self.ssm(u, None if cache is None else cache.state, mask=mask)
        y = self.out_proj(y * F.silu(z))
        if mask is not None:
            y = y * mask.to(y.dtype)[:, :, None]
        if not use_cache:
            return y, None
        return y, MixerCache(state=h, conv=window, seen=(0 if cache is None else cache.seen) + x.shape[1])

    def step(self, x_t: Tensor, cache: MixerCache | None = None):
        B = x_t.shape[0]
        u, z = self.in_proj(x_t).chunk(2, -1)
        window = None
        if self.conv is not None:
            u, window = self.conv(u.unsqueeze(1), None if cache is None else cache.conv)
            u = u[:, 0]
        u = F.silu(u)
        state = self.ssm.zero_state(B, x_t.device) if cache is None or cache.state is None else cache.state
        y, h = self.ssm.step(u, state)
        return self.out_proj(y * F.silu(z)), MixerCache(state=h, conv=window,
                                                        seen=(0 if cache is None else cache.seen) + 1)


class _Block(nn.Module):
    def __init__(self, d_model: int, mixer: nn.Module, mlp_ratio: int = 4):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(d_model), RMSNorm(d_model)
        self.mixer = mixer
        hid = mlp_ratio * d_model
        self.up = nn.Linear(d_model, 2 * hid, bias=False)
        self.down = nn.Linear(hid, d_model, bias=False)

    def mlp(self, x):
        a, b = self.up(self.norm2(x)).chunk(2, -1)
        return self.down(F.silu(a) * b)


class MixerLM(nn.Module):
    """A small standalone LM: embedding -> n_layers x [pre-norm mixer, pre-norm SwiGLU MLP] -> norm -> head.
    ``mixer_factory()`` builds one mixer per layer."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, mixer_factory, mlp_ratio: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList([_Block(d_model, mixer_factory(), mlp_ratio) for _ in range(n_layers)])
        self.norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, tokens: Tensor, mask: Tensor | None = None, caches: list | None = None,
                use_cache: bool = False):
        x = self.embed(tokens)
        new = []
        for i, blk in enumerate(self.blocks):
            y, c = blk.mixer(blk.norm1(x), mask=mask, cache=None if caches is None else caches[i], use_cache=use_cache)
            x = x + y
            x = x + blk.mlp(x)
            new.append(c)
        return self.head(self.norm(x)), (new if use_cache else None)

    def step(self, token: Tensor, caches: list | None = None):
        x = self.embed(token)
        new = []
        for i, blk in enumerate(self.blocks):
            y, c = blk.mixer.step(blk.norm1(x), None if caches is None else caches[i])
            x = x + y
            x = x + blk.mlp(x)
            new.append(c)
        return self.head(self.norm(x)), new
