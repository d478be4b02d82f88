"""Data-aware low-rank projections. All four are subspace projections found from ONE SVD:

* ``data-free``: truncated SVD of W (Eckart-Young), i.e. W_r = U_r U_r^T W with U from svd(W).
* ``whitened`` (SVD-LLM objective): minimize ||(W - W_r) X||_F = tr(E H E^T), H = X^T X (+ damping), over rank-r
  W_r. With any S such that S S^T = H (here the Cholesky factor of the damped H as in SVD-LLM, checked; where it
  fails, S = Q diag(sqrt(lambda)) from ``eigh`` with eigenvalues clamped at 0), the objective is ||W S - W_r S||_F^2, and since W_r S has rank <= r it is at least the tail of svd(W S). The
  matrix W_r = U_r U_r^T W (U_r the top-r left singular vectors of W S) attains it: U_r U_r^T W S = [W S]_r.
  So the optimum needs no inverse of S or H, and stays exact when H is singular (fewer tokens than inputs; then
  the eigh factor is used).
* ``asvd`` (ASVD): the same construction with S = diag(mean|x|^alpha) (activation-aware channel scaling,
  alpha = 0.5 by default): W_r = [W S]_r S^-1 = U_r U_r^T W.
* ``fisher`` (FWSVD): rows weighted by D = diag(sqrt(sum_j F_ij)) (Fisher row sums): W_r = D^-1 [D W]_r =
  W V_r V_r^T with V_r the top-r right singular vectors of D W.

Because every method is a projection on one basis, the output error of EVERY rank comes from that one
decomposition (:func:`error_curve`), which the budget solver uses to price ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..calibrate import InputStats
from ..structures.lowrank import LowRank
from ._linalg import cached_factor, whitening_factor
from .registry import Problem, register_projection

LOWRANK_METHODS = ("data-free", "whitened", "asvd", "fisher")


def thin_svd(a: Tensor, right: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """``torch.linalg.svd(a, full_matrices=False)``; for a wide matrix (columns >= 2 x rows) through a QR of a^T
    first: a = R^T Q^T, svd(R^T) = U S W^T, so a = U S (Q W)^T. The same factors (exact arithmetic), but the
    dense SVD runs on the small square R and the wide one only meets a Householder QR, whose workspace is a
    sliver: on a GPU cuSOLVER's SVD of a 2048 x 8192 float32 matrix (the 1B shape's down_proj) asks for several
    times the matrix in workspace, the peak of a block's projection. ``right=False``: only U and S (the third
    factor is None), and a wide matrix's QR keeps R alone: no Q and no Q W, each as large as ``a``."""
    rows, cols = a.shape[-2:]
    if cols < 2 * rows:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u, s, vh if right else None
    q, r = torch.linalg.qr(a.mT, mode="reduced" if right else "r")
    u, s, wh = torch.linalg.svd(r.mT)
    return u, s, wh @ q.mT if right else None


def lowrank_basis(w: Tensor, method: str, stats: InputStats | None, fisher: Tensor | None, *, damp: float = 1e-6,
                  alpha: float = 0.5) -> tuple[str, Tensor, Tensor]:
    """(side, basis, singular values): side 'left' means W_r = B_r B_r^T W, 'right' means W_r = W B_r B_r^T.

    ``w`` is float32 or float64 (the compute dtype). The basis has min(out, in) orthonormal columns ordered by
    importance. The whitening factor of a Gram is computed once per statistics object (shared inputs share it).
    """
    if method == "data-free":
        u, s, _ = torch.linalg.svd(w, full_matrices=False)
        return "left", u, s
    if method == "whitened":
        root = cached_factor(stats, "sqrt", damp, w.dtype, w.device,
                             lambda: whitening_factor(stats.gram.to(w.device), damp, w.dtype))
        target = w @ root
        u, s, _ = thin_svd(target, right=False)  # the basis is U: no right factor
        return "left", u, s
    if method == "asvd":
        scale = stats.mean_abs.to(w.device, w.dtype).clamp_min(0.0) ** alpha
        u, s, _ = torch.linalg.svd(w * scale, full_matrices=False)
        return "left", u, s
    if method == "fisher":
        rows = fisher.to(w.device, w.dtype).sum(dim=1)
        floor = 1e-12 * rows.max().clamp_min(torch.finfo(w.dtype).tiny)
        _, s, vh = torch.linalg.svd(rows.clamp_min(floor).sqrt().unsqueeze(1) * w, full_matrices=False)
        return "right", vh.T, s
    raise ValueError(f"unknown low-rank method {method!r}; valid: {', '.join(LOWRANK_METHODS)}")


def apply_basis(w: Tensor, side: str, basis: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Balanced factors (U, V) of the rank-``rank`` projection of ``w`` on ``basis``."""
    b = basis[:, :rank]
    # b has orthonormal columns, so the SVD of the small factor alone splits the product (no QR of b needed):
    # left: B B^T W = (B U2) S V2^T with U2 S V2^T = svd(B^T W); right: W B B^T = U2 S (B V2)^T, svd(W B).
    if side == "left":
        u2, s, vh = thin_svd(b.T @ w)
        root = s.sqrt()
        return (b @ u2) * root, root.unsqueeze(-1) * vh
    u2, s, vh = torch.linalg.svd(w @ b, full_matrices=False)
    root = s.sqrt()
    return u2 * root, root.unsqueeze(-1) * (vh @ b.T)


def error_curve(w: Tensor, side: str, basis: Tensor, h: Tensor) -> Tensor:
    """Relative output error sqrt(tr(E_r H E_r^T) / tr(W H W^T)) of the projection for r = 0..k (w's dtype)."""
    wh = w @ h
    total = (wh * w).sum()
    if side == "left":
        # E_r = (I - P_r) W with P_r = B_r B_r^T: tr(E_r H E_r^T) = tr(W H W^T) - sum_{i<=r} b_i^T W H W^T b_i.
        bw = basis.T @ w
        gains = ((bw @ h) * bw).sum(dim=1)
        err = total - torch.cat([gains.new_zeros(1), gains.cumsum(0)])
    else:
        # E_r = W (I - P_r): tr(E H E^T) = tr(WHW^T) - 2 tr(P_r W^T W H) + tr(P_r W^T W P_r H).
        wb = w @ basis  # (out, k)
        cross = ((w.T @ wb) * (h @ basis)).sum(dim=0)  # b_i^T (W^T W) H b_i
        a = wb.T @ wb  # B^T W^T W B
        hb = basis.T @ h @ basis  # B^T H B
        lead = (a * hb).cumsum(0).cumsum(1).diagonal()  # sum over the leading r x r block
        err = total - 2 * torch.cat([cross.new_zeros(1), cross.cumsum(0)]) + torch.cat([lead.new_zeros(1), lead])
    # an all-zero output energy prices every rank at 0 (decided on the device: no host read per layer)
    return torch.where(total > 0, (err.clamp_min(0.0) / total.clamp_min(torch.finfo(err.dtype).tiny)).sqrt(),
                       torch.zeros_like(err))


# ----------------------------------------------------------------------------------------------
# Registered methods: every one is a projection on one basis, so one decomposition also prices every rank.
# ----------------------------------------------------------------------------------------------


def _fit(method: str):
    def fit(p: Problem, damp: float = 1e-6, alpha: float = 0.5) -> LowRank:
        side, basis, _ = lowrank_basis(p.w, method, p.stats, p.fisher, damp=damp, alpha=alpha)
        u, v = apply_basis(p.w, side, basis, p.config.rank)
        layer = p.new_layer()
        with torch.no_grad():
            layer.U.copy_(u)
            layer.V.copy_(v)
        return layer
    return fit


def _price(method: str):
    def price(p: Problem, configs: list, guard: bool, damp: float = 1e-6, alpha: float = 0.5) -> list[float]:
        side, basis, _ = lowrank_basis(p.w, method, p.stats, p.fisher, damp=damp, alpha=alpha)
        curve = error_curve(p.w, side, basis, p.h)
        if guard:  # what the guarded projection returns at each rank
            side0, basis0, _ = lowrank_basis(p.w, "data-free", None, None)
            curve = torch.minimum(curve, error_curve(p.w, side0, basis0, p.h))
        ranks = torch.tensor([c.rank for c in configs], device=curve.device)
        return curve[ranks].double().square().tolist()  # one host read for every size
    return price


# whitened is the exact minimizer of the (damped) objective: no guard by default
register_projection("whitened", LowRank, needs_stats=True, optimal=True, options={"damp": 1e-6},
                    pricer=_price("whitened"), budget_default={})(_fit("whitened"))
register_projection("asvd", LowRank, needs_stats=True, options={"alpha": 0.5},
                    pricer=_price("asvd"))(_fit("asvd"))
register_projection("fisher", LowRank, needs_stats=False, needs_fisher=True,
                    pricer=_price("fisher"))(_fit("fisher"))
