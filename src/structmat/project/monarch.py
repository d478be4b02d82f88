"""Whitened Monarch: minimize the calibration output error tr((W - M) H (W - M)^T), H = X^T X (+ damping), over
Monarch matrices M (see ``structures/monarch.py``: block (s, k) of the b x b grid is an independent rank-c
matrix; s indexes output blocks of u rows, k input blocks of p columns).

Method: exact block-coordinate descent over the b input (column) blocks. Write E = W - M, E_k its column block k,
H_kk' the blocks of H. As a function of column block k alone, with the others fixed,

    tr(E H E^T) = tr((E_k + G_k) H_kk (E_k + G_k)^T) + const,   G_k = (sum_{k' != k} E_k' H_k'k) H_kk^+ ,

(H_kk^+ a pseudo-inverse from ``eigh``; exact because the range of H_k'k lies in that of H_kk for PSD H). So the
optimal column block k is M_k = argmin ||(T_k - M_k) S_k||_F over M_k with rank-c row blocks, where
T_k = W_k + G_k and S_k S_k^T = H_kk. Row blocks decouple, and each is the whitened rank-c problem of
``project/lowrank.py``: M_sk = U_c U_c^T T_sk with U_c the top-c left singular vectors of T_sk S_k (no inverse of
S_k). Each block update is exactly optimal given the others, so every sweep is monotone.

Start: the better (on the damped objective) of the data-free Monarch projection and the "block-diagonal whitened"
point T_k = W_k (exact when inputs of different blocks are uncorrelated); then sweep until the relative decrease
is below ``tol`` or ``sweeps`` sweeps are done. Since the data-free projection is a candidate start and sweeps
are monotone, the result is never worse than data-free on the damped objective. Padding (``pad=True``): the
weight is padded with zero rows and columns and the Gram with zero rows and columns (the padded inputs are 0);
the padded rows of W are 0 and stay 0, padded columns are cropped at the end, which changes neither the rank of
any block nor the objective.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..structures.monarch import Monarch
from ._linalg import damped, objective, pinv_psd, sqrt_factor
from .registry import Problem, register_projection


def _diag_blocks(h: Tensor, b: int, p: int) -> Tensor:
    return h.reshape(b, p, b, p).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (b, p, p)


def _fit_column_block(target: Tensor, s_k: Tensor, b: int, c: int) -> Tensor:
    """Row blocks of ``target`` (b*u, p), each replaced by its S_k-whitened rank-c projection."""
    tb = target.reshape(b, -1, target.shape[1])  # (b, u, p)
    u_mat, _, _ = torch.linalg.svd(tb @ s_k, full_matrices=False)
    uc = u_mat[..., :c]
    return (uc @ (uc.transpose(1, 2) @ tb)).reshape(target.shape)


def whitened_monarch(w: Tensor, gram: Tensor, data_free: Tensor, *, nblocks: int, c: int, out_padded: int,
                     in_padded: int, damp: float = 1e-6, sweeps: int = 10, tol: float = 1e-4
                     ) -> tuple[Tensor, dict[str, float]]:
    """Returns the fitted Monarch member (w's dtype, real shape) and info. ``data_free`` is the data-free member."""
    out, inn = w.shape
    b, p = nblocks, in_padded // nblocks
    wp = w.new_zeros(out_padded, in_padded)
    wp[:out, :inn] = w
    hp = gram.new_zeros(in_padded, in_padded)
    hp[:inn, :inn] = gram.to(w.dtype)
    h = damped(hp, 0.0)
    if damp > 0:
        level = gram.diagonal().mean().clamp_min(torch.finfo(h.dtype).tiny)
        h = h + damp * level * torch.eye(in_padded, dtype=h.dtype, device=h.device)
    hkk = _diag_blocks(h, b, p)
    s = sqrt_factor(hkk)  # (b, p, p)
    hkk_pinv = pinv_psd(hkk)

    def sweep(m_hat: Tensor, first_from_w: bool = False) -> Tensor:
        e = wp - m_hat
        eh = e @ h
        for k in range(b):
            cols = slice(k * p, (k + 1) * p)
            if first_from_w:
                target = wp[:, cols]
            else:
                g = (eh[:, cols] - e[:, cols] @ hkk[k]) @ hkk_pinv[k]
                target = wp[:, cols] + g
            new = _fit_column_block(target, s[k], b, c)
            delta = (wp[:, cols] - new) - e[:, cols]
            if not first_from_w:
                eh += delta @ h[cols, :]
            e[:, cols] += delta
            m_hat[:, cols] = new
        return m_hat

    start_df = wp.new_zeros(out_padded, in_padded)
    start_df[:out, :inn] = data_free
    start_bd = sweep(wp.new_zeros(out_padded, in_padded), first_from_w=True)
    f_df, f_bd = objective(wp - start_df, h).item(), objective(wp - start_bd, h).item()
    m_hat, history = (start_bd, [f_bd]) if f_bd <= f_df else (start_df, [f_df])
    for _ in range(sweeps):
        if history[-1] <= 0:
            break
        candidate = sweep(m_hat.clone())
        value = objective(wp - candidate, h).item()
        if value > history[-1]:  # rounding only: a sweep is monotone in exact arithmetic
            break
        m_hat = candidate
        history.append(value)
        if history[-2] - value <= tol * history[-2]:
            break
    info = {"start": "block-whitened" if f_bd <= f_df else "data-free", "sweeps": len(history) - 1,
            "damped_objective_start": history[0], "damped_objective": history[-1]}
    return m_hat[:out, :inn], info


@register_projection("whitened", Monarch, needs_stats=True, optimal=True,
                     options={"damp": 1e-6, "sweeps": 10, "tol": 1e-4})
def _whitened(p: Problem, damp: float, sweeps: int, tol: float) -> tuple[Monarch, dict]:
    base = p.baseline
    what, info = whitened_monarch(p.w, p.h, base.to_dense().detach().to(p.w.dtype), nblocks=base.nblocks, c=base.c,
                                  out_padded=base.out_padded, in_padded=base.in_padded, damp=damp, sweeps=sweeps,
                                  tol=tol)
    bias = None if p.bias is None else p.bias.to(p.w.dtype)
    return p.cls.from_dense(what, bias, **p.args).to(dtype=p.weight.dtype), info


@register_projection("fisher", Monarch, needs_stats=False, needs_fisher=True)
def _fisher(p: Problem) -> Monarch:
    """FWSVD for Monarch: rows weighted by the Fisher row sums, D = diag(sqrt(sum_j F_ij)). A row scaling keeps
    every block's rank, so the weighted objective ||D (W - M)||_F^2 decouples into the b x b blocks and
    M = D^-1 Monarch(D W) (the structure's own per-block truncated SVD of D W, rows scaled back) is its exact
    minimizer over Monarch matrices."""
    rows = p.fisher.to(p.w.device, p.w.dtype).sum(dim=1)
    d = rows.clamp_min(1e-12 * rows.max().clamp_min(torch.finfo(p.w.dtype).tiny)).sqrt().unsqueeze(1)
    scaled = p.cls.from_dense(d * p.w, None, **p.args).to_dense().detach().to(p.w.dtype)
    bias = None if p.bias is None else p.bias.to(p.w.dtype)
    return p.cls.from_dense(scaled / d, bias, **p.args).to(dtype=p.weight.dtype)
