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

from ..structures.sparse_lowrank import SparsePlusLowRank
from ._linalg import balanced, damped, objective, sqrt_factor
from .registry import Problem, register_projection
from .sparse import sparsegpt


def whitened_splr(w: Tensor, gram: Tensor, sparse0: Tensor, low0: tuple[Tensor, Tensor], *, rank: int, nnz: int,
                  damp: float = 1e-6, sparse_damp: float = 0.01, blocksize: int = 128, rounds: int = 4,
                  tol: float = 1e-4) -> tuple[Tensor, tuple[Tensor, Tensor], dict[str, float]]:
    """Returns (S dense, (U, V) balanced factors of L, info), in w's dtype."""
    h = gram.to(w.dtype)
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



@register_projection("whitened", SparsePlusLowRank, needs_stats=True, optimal=True,
                     options={"damp": 1e-6, "sparse_damp": 0.01, "blocksize": 128, "rounds": 4, "tol": 1e-4})
def _whitened(p: Problem, **options) -> tuple[SparsePlusLowRank, dict]:
    base = p.baseline
    s0 = base.sparse.to_dense().detach().to(p.w.dtype)
    low0 = (base.lowrank.U.detach().to(p.w.dtype), base.lowrank.V.detach().to(p.w.dtype))
    nnz = base.sparse.values.numel()
    sparse_part, (u, v), info = whitened_splr(p.w, p.h, s0, low0, rank=p.config.rank, nnz=nnz, **options)
    layer = p.new_layer()
    index = sparse_part.reshape(-1).abs().topk(nnz).indices.sort().values
    with torch.no_grad():
        layer.lowrank.U.copy_(u)
        layer.lowrank.V.copy_(v)
        layer.sparse.index.copy_(index)
        layer.sparse.values.copy_(sparse_part.reshape(-1)[index])
    return layer, info
