"""Dense: the reference structure (an ordinary linear layer in the StructuredLinear contract)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import StructuredLinear, StructureConfig, register


@dataclass(frozen=True)
class DenseConfig(StructureConfig):
    name = "dense"


@register
class Dense(StructuredLinear):
    name = "dense"
    Config = DenseConfig
    scaled_by = ("weight",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.init_()

    def _matmul(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def to_dense(self) -> Tensor:
        return self.weight

    def _project_(self, weight: Tensor) -> None:
        self.weight.copy_(weight)

    def _weight_flops(self, tokens: int) -> int:
        return 2 * tokens * self.in_features * self.out_features

    def _factors(self) -> dict[str, tuple[float, float]]:
        return {"weight": (self.in_features, self.out_features)}
