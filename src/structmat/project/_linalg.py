"""Shared numerics of the data-aware projections: damped Gram, eigh-based square roots, the objective."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def damped(gram: Tensor, damp: float, dtype: torch.dtype | None = None) -> Tensor:
    """(H + H^T) / 2 + damp * mean(diag H) * I, in ``dtype`` (default: the Gram's own float dtype), as ONE new
    matrix (the symmetrization allocates it; scaling and damping are in place). ``damp`` is relative to the mean
    input energy."""
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    h = gram.to(dtype or (gram.dtype if gram.dtype in (torch.float32, torch.float64) else torch.float64))
    h = (h + h.mT).mul_(0.5)
    if damp > 0:  # (a batch of Grams: each damped by its own level)
        diagonal = h.diagonal(dim1=-2, dim2=-1)
        diagonal.add_(damp * diagonal.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny))
    return h


def sym_eigh(h: Tensor, symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a symmetric PSD matrix (batched ok) with eigenvalues clamped at zero.
    ``symmetric=True``: ``h`` is already exactly symmetric (e.g. from :func:`damped`); no averaged copy."""
    lam, q = torch.linalg.eigh(h if symmetric else 0.5 * (h + h.transpose(-1, -2)))
    return lam.clamp_min(0.0), q


def sqrt_factor(h: Tensor, symmetric: bool = False) -> Tensor:
    """S with S S^T = h (clamped to PSD): S = Q diag(sqrt(lambda)). Never inverted."""
    lam, q = sym_eigh(h, symmetric)
    return q.mul_(lam.sqrt().unsqueeze(-2))


def finite_factor(factor: Tensor) -> bool:
    """Whether a triangular Cholesky factor is finite, from its diagonal: a NaN/Inf anywhere in the factored part
    of the input flows into the diagonal entry of its row (each pivot sums the squares of its row), so n checks
    stand for n^2 (the statistics themselves are checked for NaN/Inf once, before any projection)."""
    return bool(torch.isfinite(factor.diagonal(dim1=-2, dim2=-1)).all())


def whitening_factor(gram: Tensor, damp: float = 0.0, dtype: torch.dtype | None = None) -> Tensor:
    """S with S S^T = the damped, symmetrized ``gram`` (:func:`damped`): its lower Cholesky factor when the
    factorization succeeds and is finite (the cost of SVD-LLM's own whitening), else the clamped ``eigh`` square
    root, which always exists. Either S gives the same whitened optimum (any S S^T = H does).

    Memory: ONE n x n matrix beside the Gram. The Cholesky factor overwrites the damped copy (LAPACK / cuSOLVER
    factor a column-major matrix in place; a symmetric matrix's transpose view is one), so the largest layer's
    projection does not hold a damped copy and a factor at once (268 MB each for an 8192-wide down_proj)."""
    h = damped(gram, damp, dtype)
    low = h.mT  # the same storage, column-major
    info = torch.empty((), dtype=torch.int32, device=h.device)
    torch.linalg.cholesky_ex(low, out=(low, info))
    if int(info) == 0 and finite_factor(low):
        return low
    log.debug("whitening: Cholesky of the damped Gram (%d x %d) failed (info=%d or non-finite); using the "
              "clamped eigh square root", h.shape[0], h.shape[0], int(info))
    del low, h  # overwritten by the failed factorization: damp a fresh copy
    return sqrt_factor(damped(gram, damp, dtype), symmetric=True)


def pinv_psd(h: Tensor, rcond: float = 1e-12) -> Tensor:
    """Pseudo-inverse of a symmetric PSD matrix (batched) via eigh; eigenvalues below rcond * max are dropped."""
    lam, q = sym_eigh(h)
    cutoff = rcond * lam.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(lam.dtype).tiny)
    inv = torch.where(lam > cutoff, 1.0 / lam.clamp_min(torch.finfo(lam.dtype).tiny), torch.zeros_like(lam))
    return (q * inv.unsqueeze(-2)) @ q.transpose(-1, -2)


def objective(error: Tensor, h: Tensor) -> Tensor:
    """tr(E H E^T) in the operands' dtype."""
    return ((error @ h) * error).sum()


def balanced(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """Rewrite left @ right (rank r) as A @ B with A = U sqrt(S), B = sqrt(S) V^T (the truncated-SVD split)."""
    q1, r1 = torch.linalg.qr(left)
    q2, r2 = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    root = s.sqrt()
    return (q1 @ u) * root, root.unsqueeze(-1) * (vh @ q2.T)


def cached_factor(stats, kind: str, damp: float, dtype: torch.dtype, device: torch.device, compute) -> Tensor:
    """``compute()`` once per (statistics object, kind, damp, dtype, device): layers that share an input (q/k/v,
    gate/up) share one InputStats object, so its factorization is computed once for all of them. The key holds
    the Gram's version counter, so an updated Gram is never served a stale factor."""
    if stats is None:
        return compute()
    return stats.cached(factor_key(stats, kind, damp, dtype, device), compute)


def factor_key(stats, kind: str, damp: float, dtype: torch.dtype, device: torch.device) -> tuple:
    """The cache key of :func:`cached_factor` (for code that fills the caches of many statistics at once)."""
    return (kind, float(damp), dtype, str(device), stats.gram._version, stats.count)
