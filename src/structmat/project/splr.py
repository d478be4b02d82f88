"""Whitened sparse + low-rank: minimize tr((W - S - L) H (W - S - L)^T) over S with nnz nonzeros and L of rank r.

Method (alternating, accept-only-improvements, so never worse than its start):
  0. start from the data-free SparsePlusLowRank projection (S0, L0) of the structure itself;
  1. L-step: L = the whitened rank-r projection of W - S (exactly optimal given S, ``project/lowrank.py``);
  2. S-step: S = SparseGPT (unstructured, exactly nnz kept, OBS updates) applied to W - L, a near-optimal
     sparse fit of the residual on the output objective;
  each step is kept only if it lowers the (undamped) objective; stop when a round improves by less than ``tol``
  (relative) or after ``rounds`` rounds. The result is therefore never worse than the data-free projection on the
  calibration objective.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._linalg import balanced, damped, objective, sqrt_factor
from .sparse import sparsegpt


def whitened_splr(w: Tensor, gram: Tensor, sparse0: Tensor, low0: tuple[Tensor, Tensor], *, rank: int, nnz: int,
                  damp: float = 1e-6, sparse_damp: float = 0.01, blocksize: int = 128, rounds: int = 4,
                  tol: float = 1e-4) -> tuple[Tensor, tuple[Tensor, Tensor], dict[str, float]]:
    """Returns (S dense float64, (U, V) balanced factors of L, info)."""
    h = gram.to(torch.float64)
    s_factor = sqrt_factor(damped(h, damp))

    def lowrank_step(target: Tensor) -> tuple[Tensor, Tensor]:
        u, _, _ = torch.linalg.svd(target @ s_factor, full_matrices=False)
        ur = u[:, :rank]
        return ur, ur.T @ target

    sparse, (left, right) = sparse0, low0
    best = objective(w - sparse - left @ right, h).item()
    history = [best]
    steps = {"lowrank": 0, "sparse": 0}
    for _ in range(rounds):
        start = best
        cand_l, cand_r = lowrank_step(w - sparse)
        value = objective(w - sparse - cand_l @ cand_r, h).item()
        if value < best:
            left, right, best = cand_l, cand_r, value
            steps["lowrank"] += 1
        cand_s, _ = sparsegpt(w - left @ right, h, nnz=nnz, blocksize=blocksize, damp=sparse_damp)
        value = objective(w - cand_s - left @ right, h).item()
        if value < best:
            sparse, best = cand_s, value
            steps["sparse"] += 1
        history.append(best)
        if start - best <= tol * start:
            break
    u, v = balanced(left, right)
    info = {"objective_start": history[0], "objective": best, "rounds": len(history) - 1,
            "lowrank_steps": steps["lowrank"], "sparse_steps": steps["sparse"]}
    return sparse, (u, v), info

