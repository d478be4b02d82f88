"""SparsePlusLowRank: W = S + U V with S of fixed support (SLTrain / LOST style).

Projection (no closed form): alternating exact minimization, GoDec-style. Given S, the best U V is the
rank-r truncated SVD of W - S; given U V, the best S of nnz entries keeps the nnz largest |W - U V|.
Each half-step is optimal given the other, so the error never increases. GoDec finds the support but
converges slowly after that, so a second phase fixes the support and fits U V to the off-support entries by
alternating least squares (each half-step exact, so again monotone); the on-support entries are then free.
Both phases stop on stagnation, an error below 1e-13, or their sweep limits (class attributes). The error reached is in ``fit_info``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import StructuredLinear, StructureConfig, check_fraction, check_int, register, truncated_svd, work_dtype
from .lowrank import LowRank
from .sparse import FixedSparse, nnz_for


@dataclass(frozen=True)
class SparsePlusLowRankConfig(StructureConfig):
    name = "splr"
    rank: int
    density: float

    def __post_init__(self) -> None:
        check_int(self.name, "rank", self.rank)
        check_fraction(self.name, "density", self.density)


@register
class SparsePlusLowRank(StructuredLinear):
    name = "splr"
    Config = SparsePlusLowRankConfig
    zero_factors = ("sparse.values", "lowrank.U")
    godec_sweeps = 30  # support search
    als_rounds, als_sweeps = 5, 40  # support re-picks, and ALS sweeps per support

    def __init__(self, in_features: int, out_features: int, rank: int, density: float, bias: bool = True, *,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        SparsePlusLowRankConfig(rank, density)
        self.rank, self.density = rank, float(density)
        total = nnz_for(density, in_features, out_features) + rank * (in_features + out_features)
        self._check_smaller_than_dense(total, "lower the rank or the density")
        self.sparse = FixedSparse(in_features, out_features, density, bias=False, device=device, dtype=dtype)
        self.lowrank = LowRank(in_features, out_features, rank, bias=False, device=device, dtype=dtype)
        self.fit_info: dict[str, float] = {}
        self.init_()

    @classmethod
    def config_for_ratio(cls, in_features, out_features, ratio, **fixed):
        """Half the budget to each part unless one part is fixed."""
        dense = in_features * out_features
        if set(fixed) - {"rank", "density"}:
            raise ValueError(f"splr: ratio= takes rank or density besides, got {sorted(fixed)}")
        if "rank" in fixed:
            check_int("splr", "rank", fixed["rank"])
        if "density" in fixed:
            check_fraction("splr", "density", fixed["density"])
        if "rank" in fixed:
            rank = fixed["rank"]
            density = ratio - rank * (in_features + out_features) / dense
        elif "density" in fixed:
            density = fixed["density"]
            rank = int((ratio - density) * dense / (in_features + out_features))
        else:
            density = ratio / 2
            rank = int(ratio / 2 * dense / (in_features + out_features))
        if rank < 1 or density <= 0:
            raise ValueError(f"splr: ratio={ratio} leaves no room for both parts at {in_features}x{out_features}")
        return SparsePlusLowRankConfig(rank=rank, density=density)

    def init_(self, generator: torch.Generator | None = None):
        self.sparse.init_(generator)
        self.lowrank.init_(generator)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()
        return self

    def _rescalable(self) -> bool:
        return self.sparse._rescalable() and self.lowrank._rescalable()

    def _rescale_(self, exponent: int) -> None:
        self.sparse._rescale_(exponent)  # a sum: both parts scale fully
        self.lowrank._rescale_(exponent)

    def _check_state(self) -> None:
        self.sparse._check_state()

    def _factors(self):
        return {f"sparse.{k}": v for k, v in self.sparse._factors().items()} | \
               {f"lowrank.{k}": v for k, v in self.lowrank._factors().items()}

    def _matmul(self, x: Tensor) -> Tensor:
        return self.sparse._matmul(x) + self.lowrank._matmul(x)

    def to_dense(self) -> Tensor:
        return self.sparse.to_dense() + self.lowrank.to_dense()

    def _project_(self, weight: Tensor) -> None:
        w = weight.to(work_dtype(weight))
        norm = torch.linalg.norm(w).clamp_min(torch.finfo(w.dtype).tiny)
        nnz = self.sparse.values.numel()
        # Phase 1, GoDec, started from the largest entries of W: finds the support.
        index = w.reshape(-1).abs().topk(nnz).indices.sort().values
        sparse_dense = _on_support(w, index)
        history: list[float] = []
        for _ in range(self.godec_sweeps):
            left, right, _ = truncated_svd(w - sparse_dense, self.rank)
            resid = w - left @ right
            previous, index = index, resid.reshape(-1).abs().topk(nnz).indices.sort().values
            sparse_dense = _on_support(resid, index)
            history.append((torch.linalg.norm(resid - sparse_dense) / norm).item())
            stalled = len(history) > 1 and history[-2] - history[-1] <= 1e-4 * history[-2]
            if history[-1] < 1e-13 or stalled or torch.equal(previous, index):
                break
        # Phase 2: with the support fixed, the entries on it are free, so fit U V to the entries off it
        # (weighted low-rank / matrix completion) by alternating least squares; each half-step is exact.
        # Then re-pick the support as the top entries of W - U V (also exact) and repeat until it is stable.
        als: list[float] = [history[-1]]
        for _ in range(self.als_rounds if history[-1] >= 1e-13 else 0):
            observed = torch.ones_like(w).reshape(-1).index_fill_(0, index, 0.0).view_as(w)
            for _ in range(self.als_sweeps):
                right = _masked_lstsq(w, observed, left)  # V given U
                left = _masked_lstsq(w.T, observed.T, right.T).T  # U given V
                als.append((torch.linalg.norm(observed * (w - left @ right)) / norm).item())
                if als[-1] < 1e-13 or als[-2] - als[-1] <= 1e-7 * als[-2]:
                    break
            previous, index = index, (w - left @ right).reshape(-1).abs().topk(nnz).indices.sort().values
            if als[-1] < 1e-13 or torch.equal(previous, index):
                break
        resid = (w - left @ right).reshape(-1)
        self.lowrank.U.copy_(left)
        self.lowrank.V.copy_(right)
        self.sparse.index.copy_(index)
        self.sparse.values.copy_(resid[index])
        reached = (torch.linalg.norm(resid.index_fill(0, index, 0.0)) / norm).item()
        self.fit_info = {"relative_error": reached, "godec_sweeps": len(history), "als_sweeps": len(als) - 1}

    def _weight_flops(self, tokens: int) -> int:
        return self.sparse._weight_flops(tokens) + self.lowrank._weight_flops(tokens) + tokens * self.out_features


def _on_support(w: Tensor, index: Tensor) -> Tensor:
    flat = w.reshape(-1)
    return torch.zeros_like(flat).index_copy_(0, index, flat[index]).view_as(w)


def _masked_lstsq(w: Tensor, observed: Tensor, left: Tensor) -> Tensor:
    """argmin_V sum_ij observed_ij (w_ij - (left @ V)_ij)^2, column by column, as the minimum-norm solution.

    Rank-deficient or constant matrices make the r x r Gram matrices singular, and a ridge below the working
    precision (1e-12 in float32) does not help; so each Gram is solved through its eigendecomposition (in float64),
    dropping the directions whose eigenvalue is below the input precision (eps of w's dtype x r x the largest one)."""
    gram = torch.einsum("ij,ir,is->jrs", observed, left, left).to(torch.float64)  # (in, r, r)
    rhs = ((observed * w).T @ left).to(torch.float64).unsqueeze(-1)  # (in, r, 1)
    evals, evecs = torch.linalg.eigh(gram)
    floor = torch.finfo(w.dtype).eps * left.shape[1] * evals[:, -1:].clamp_min(0.0)
    keep = evals > floor.clamp_min(torch.finfo(torch.float64).tiny)
    inverse = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    solution = evecs @ (inverse.unsqueeze(-1) * (evecs.transpose(-2, -1) @ rhs))
    return solution.squeeze(-1).T.to(w.dtype)
