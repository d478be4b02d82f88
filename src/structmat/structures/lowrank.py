"""LowRank: W = U @ V with U (out x r), V (r x in). Projection: truncated SVD (Eckart-Young)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import StructuredLinear, StructureConfig, check_int, register, round_down8, run_op, truncated_svd, work_dtype


@dataclass(frozen=True)
class LowRankConfig(StructureConfig):
    name = "lowrank"
    rank: int

    def __post_init__(self) -> None:
        check_int(self.name, "rank", self.rank)


def max_rank(in_features: int, out_features: int) -> int:
    """Largest rank whose factors hold fewer numbers than the dense matrix."""
    return (in_features * out_features - 1) // (in_features + out_features)


def lowrank_multiply(x: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """Reference: x (N, in) -> (N, out) through the rank-r bottleneck."""
    return F.linear(F.linear(x, V), U)


@register
class LowRank(StructuredLinear):
    name = "lowrank"
    Config = LowRankConfig
    scaled_by = ("U", "V")
    zero_factors = ("U",)

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        check_int(self._label(), "rank", rank)
        self.rank = rank
        limit = max_rank(in_features, out_features)
        self._check_smaller_than_dense(rank * (in_features + out_features), f"use rank <= {limit}")
        self.U = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.V = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.init_()

    @classmethod
    def config_for_ratio(cls, in_features, out_features, ratio, **fixed):
        rank = round_down8(int(ratio * in_features * out_features / (in_features + out_features)))
        return LowRankConfig(rank=max(1, min(rank, max_rank(in_features, out_features))))

    @classmethod
    def size_ladder(cls, in_features, out_features, sizes=4, **fixed):
        """Every rank that is a multiple of 8 below dense (every rank for tiny layers): a low-rank basis prices all
        of them from one decomposition, so the ladder is fine."""
        if fixed:
            raise ValueError(f"lowrank: the size ladder takes no fixed arguments, got {sorted(fixed)}")
        top = max_rank(in_features, out_features)
        return [LowRankConfig(rank=r) for r in (list(range(8, top + 1, 8)) or list(range(1, top + 1)))]

    def _matmul(self, x: Tensor) -> Tensor:
        return run_op("lowrank", lowrank_multiply, x, self.U, self.V, plans=self._plans)

    def to_dense(self) -> Tensor:
        return self.U @ self.V

    def _project_(self, weight: Tensor) -> None:
        left, right, _ = truncated_svd(weight.to(work_dtype(weight)), self.rank)
        self.U.copy_(left)
        self.V.copy_(right)

    def _weight_flops(self, tokens: int) -> int:
        return 2 * tokens * self.rank * (self.in_features + self.out_features)

    def _factors(self) -> dict[str, tuple[float, float]]:
        return {"V": (self.in_features, self.rank), "U": (self.rank, self.out_features)}
