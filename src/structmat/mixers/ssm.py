"""Diagonal state-space models: zero-order-hold S4D (Lin / Inv / Real init) and a selective variant.

Per channel ``h`` and state ``n``: ``x_t -> s_t = a_t * s_{t-1} + b_t * x_t``, ``y_t = Re(sum_n C_n s_t) + D x_t``.

* **S4D** (time-invariant): continuous ``A_n`` (complex for Lin/Inv, stored as ``N/2`` conjugate pairs whose output is
  ``2 Re``; real for Real), step ``dt = exp(log_dt)``; zero-order hold: ``a = exp(dt A)``, ``b = (exp(dt A) - 1) / A * B``.
  Inits (Gu et al., "On the parameterization and initialization of diagonal state space models"):
  Lin ``A_n = -1/2 + i pi n``; Inv ``A_n = -1/2 + i N/pi (N/(2n+1) - 1)``; Real ``A_n = -(n+1)``. Eigenvalues of the
  transition lie in the open unit disk (positive real part of the spectrum of ``a`` for Real).
* **Selective** (Mamba-style, real diagonal, input-dependent): ``dt_t = softplus(W x_t + b)``,
  ``a_t = exp(dt_t A)`` in (0, 1), or with ``allow_neg_eigval`` ``a_t = 2 exp(dt_t A) - 1`` in (-1, 1)
  (the [-1, 1] eigenvalue range of Grazzi et al.); ``b_t = dt_t B_t`` (the usual simplified hold for B).

The recurrence runs as a Hillis-Steele parallel scan over time (:func:`diag_scan`: ``log2 T`` elementwise steps, no
division, no logarithm, so negative and complex transitions are exact) or, for decoding, one step at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INITS = ("s4d-lin", "s4d-inv", "s4d-real")

__all__ = ["diag_scan", "diag_scan_recurrent", "s4d_init", "S4DKernel", "SelectiveDiagonal", "INITS"]


def _cd(x: Tensor) -> torch.dtype:
    """Compute dtype: float64 stays, everything else runs in float32."""
    return torch.float64 if x.dtype in (torch.float64, torch.complex128) else torch.float32


def _shift(x: Tensor, d: int, fill: float) -> Tensor:
    """x shifted by d along dim 1 (x[:, t-d]), the first d rows filled with ``fill``."""
    head = torch.full_like(x[:, :d], fill)
    return torch.cat([head, x[:, :-d]], 1)


def diag_scan(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """All states of ``h_t = a_t * h_{t-1} + b_t`` (time on dim 1; any trailing shape; real or complex)."""
    T = a.shape[1]
    A, Bv = a, b
    d = 1
    while d < T:
        Bv = Bv + A * _shift(Bv, d, 0.0)
        A = A * _shift(A, d, 1.0)
        d *= 2
    if h0 is not None:
        Bv = Bv + A * h0.unsqueeze(1)
    return Bv


def diag_scan_recurrent(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """Reference loop for :func:`diag_scan`."""
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    out = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, 1)


def s4d_init(init: str, channels: int, d_state: int) -> tuple[Tensor, Tensor | None]:
    """(log(-Re A) of shape (channels, M), Im A of shape (channels, M) or None for real); M = d_state/2 complex."""
    if init not in INITS:
        raise ValueError(f"unknown S4D init {init!r}; choose one of {INITS}")
    if init == "s4d-real":
        re = torch.arange(1, d_state + 1, dtype=torch.float32).expand(channels, d_state)
        return torch.log(re).clone(), None
    if d_state % 2:
        raise ValueError(f"complex S4D inits need an even d_state (conjugate pairs), got {d_state}")
    m = d_state // 2
    n = torch.arange(m, dtype=torch.float32)
    if init == "s4d-lin":
        im = math.pi * n
    else:
        im = (d_state / math.pi) * (d_state / (2 * n + 1) - 1)
    re = torch.full((channels, m), 0.5)
    return torch.log(re), im.expand(channels, m).clone()


class S4DKernel(nn.Module):
    """Time-invariant diagonal SSM over ``channels`` independent inputs, ZOH-discretized (see module docstring)."""

    def __init__(self, channels: int, d_state: int = 16, init: str = "s4d-lin", dt_min: float = 1e-3,
                 dt_max: float = 1e-1, generator: torch.Generator | None = None):
        super().__init__()
        self.channels, self.d_state, self.init = channels, d_state, init
        log_re, im = s4d_init(init, channels, d_state)
        self.complex = im is not None
        m = log_re.shape[1]
        self.log_neg_re = nn.Parameter(log_re)
        self.im = nn.Parameter(im) if self.complex else None
        u = torch.rand(channels, generator=generator)
        self.log_dt = nn.Parameter(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        if self.complex:
            c = torch.randn(channels, m, 2, generator=generator) * math.sqrt(0.5)
            self.C = nn.Parameter(c)  # (re, im)
        else:
            self.C = nn.Parameter(torch.randn(channels, m, generator=generator))
        self.D = nn.Parameter(torch.ones(channels))

    def discretize(self) -> tuple[Tensor, Tensor, Tensor]:
        """(a, b, C) of the zero-order hold: a = exp(dt A), b = (a - 1)/A * B with B = 1."""
        cd = _cd(self.log_dt)
        dt = torch.exp(self.log_dt.to(cd))[:, None]
        if self.complex:
            A = torch.complex(-torch.exp(self.log_neg_re.to(cd)), self.im.to(cd))
            C = torch.view_as_complex(self.C.to(cd).contiguous())
        else:
            A = -torch.exp(self.log_neg_re.to(cd))
            C = self.C.to(cd)
        a = torch.exp(dt * A)
        b = (a - 1) / A
        return a, b, C

    def forward(self, x: Tensor, state: Tensor | None = None, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, channels) -> y (B, T, channels), final state (B, channels, M). A masked token (mask 0) is an
        identity step: a = 1, b = 0."""
        a, b, C = self.discretize()
        xc = x.to(_cd(x))
        B, T, _ = x.shape
        av = a.expand(B, T, *a.shape)
        bv = b * xc[..., None]
        if mask is not None:
            m = mask.bool()[:, :, None, None]
            av, bv = torch.where(m, av, torch.ones_like(av)), torch.where(m, bv, torch.zeros_like(bv))
        h = diag_scan(av, bv, state)
        y = (h * C).sum(-1)
        y = 2 * y.real if self.complex else y
        return (y + self.D.to(y.dtype) * xc).to(x.dtype), h[:, -1]

    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        a, b, C = self.discretize()
        xc = x.to(_cd(x))
        h = a * state + b * xc[..., None]
        y = (h * C).sum(-1)
        y = 2 * y.real if self.complex else y
        return (y + self.D.to(y.dtype) * xc).to(x.dtype), h

    def zero_state(self, batch: int, device=None) -> Tensor:
        rd = _cd(self.log_neg_re)
        dt = (torch.complex128 if rd == torch.float64 else torch.complex64) if self.complex else rd
        return torch.zeros(batch, self.channels, self.log_neg_re.shape[1], dtype=dt, device=device)


class SelectiveDiagonal(nn.Module):
    """Selective real diagonal SSM (Mamba-style) with transitions in (0, 1) or, with allow_neg_eigval, (-1, 1)."""

    def __init__(self, channels: int, d_state: int = 16, allow_neg_eigval: bool = False, dt_rank: int | None = None,
                 dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        self.channels, self.d_state, self.allow_neg_eigval = channels, d_state, allow_neg_eigval
        r = dt_rank or max(1, math.ceil(channels / 16))
        self.x_proj = nn.Linear(channels, r + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(r, channels, bias=True)
        self.dt_rank = r
        dt = torch.exp(torch.rand(channels) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():  # softplus^-1(dt)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(channels, 1))
        self.D = nn.Parameter(torch.ones(channels))

    def _params(self, x: Tensor):
        cd = _cd(x)
        xf = x.to(cd)
        dbc = self.x_proj(x)
        dt_in, Bt, Ct = dbc.split([self.dt_rank, self.d_state, self.d_state], -1)
        dt = F.softplus(self.dt_proj(dt_in).to(cd))  # (..., channels)
        Bt, Ct = Bt.to(cd), Ct.to(cd)
        a = torch.exp(dt[..., None] * -torch.exp(self.A_log.to(cd)))  # (..., channels, N) in (0, 1)
        if self.allow_neg_eigval:
            a = 2 * a - 1
        b = (dt * xf)[..., None] * Bt[..., None, :]
        return a, b, Ct

    def forward(self, x: Tensor, state: Tensor | None = None, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, channels) -> y, final state (B, channels, N); a masked token is an identity step."""
        a, b, Ct = self._params(x)
        if mask is not None:
            m = mask.bool()[:, :, None, None]
            a, b = torch.where(m, a, torch.ones_like(a)), torch.where(m, b, torch.zeros_like(b))
        h = diag_scan(a, b, state)
        y = (h * Ct[..., None, :]).sum(-1) + self.D.to(h.dtype) * x.to(h.dtype)
        return y.to(x.dtype), h[:, -1]

    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        a, b, Ct = self._params(x)
        h = a * state + b
        y = (h * Ct[..., None, :]).sum(-1) + self.D.to(h.dtype) * x.to(h.dtype)
        return y.to(x.dtype), h

    def zero_state(self, batch: int, device=None) -> Tensor:
        return torch.zeros(batch, self.channels, self.d_state, device=device, dtype=_cd(self.A_log))
