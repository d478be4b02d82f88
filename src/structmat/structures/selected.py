"""SelectedRows / SelectedColumns (S2FT): W is zero outside k selected output rows (or input columns).

The values of the k rows (k x in) or columns (out x k) are the parameters; which rows/columns is an index buffer
(sorted, saved with the state dict like a sparse support). Projection: keep the k rows (columns) of largest norm,
which is Frobenius-optimal (a kept row can equal W's row exactly, a dropped one costs its squared norm). A fresh
init draws a random selection, as S2FT does. The forward touches only the selected part: k*in multiply-adds per
token for rows (the output is scattered), out*k for columns (the input is gathered).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import StructuredLinear, StructureConfig, check_int, register


@dataclass(frozen=True)
class SelectedRowsConfig(StructureConfig):
    name = "rows"
    k: int

    def __post_init__(self) -> None:
        check_int(self.name, "k", self.k)


@dataclass(frozen=True)
class SelectedColumnsConfig(StructureConfig):
    name = "cols"
    k: int

    def __post_init__(self) -> None:
        check_int(self.name, "k", self.k)


class _Selected(StructuredLinear):
    """Shared: k of the ``axis`` dimension (0: rows, 1: columns) are kept."""

    axis: int = 0

    def __init__(self, in_features: int, out_features: int, k: int, bias: bool = True, *, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        check_int(self._label(), "k", k)
        size = (out_features, in_features)[self.axis]
        if k >= size:
            raise ValueError(f"{self._label()} {self.name}:k={k}: k must be < {('out', 'in')[self.axis]}_features="
                             f"{size} (k = {size} would be dense); use k <= {size - 1}")
        self.k = k
        shape = (k, in_features) if self.axis == 0 else (out_features, k)
        self.values = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.register_buffer("index", torch.zeros(k, device=device, dtype=torch.long))
        self.init_()

    @classmethod
    def config_for_ratio(cls, in_features, out_features, ratio, **fixed):
        if fixed:
            raise ValueError(f"{cls.name}: ratio= takes no other keys, got {sorted(fixed)}")
        size = (out_features, in_features)[cls.axis]
        return cls.Config(k=max(1, min(size - 1, round(ratio * size))))

    def init_(self, generator: torch.Generator | None = None):
        if self.index.device.type != "meta":
            size = (self.out_features, self.in_features)[self.axis]
            with torch.no_grad():
                perm = torch.randperm(size, generator=generator, device="cpu")[: self.k].sort().values
                self.index.copy_(perm)
        return super().init_(generator)

    def _check_state(self) -> None:
        """A loaded index must name k distinct rows (columns) in range, sorted: anything else is another matrix."""
        index, size = self.index, (self.out_features, self.in_features)[self.axis]
        if index.dtype != torch.long or tuple(index.shape) != (self.k,):
            raise ValueError(f"{self._label()} {self.spec}: the index buffer has {index.dtype} {tuple(index.shape)}, "
                             f"expected int64 ({self.k},); the weights are corrupt, save the model again")
        if self.k and (int(index.min()) < 0 or int(index.max()) >= size or bool((index[1:] <= index[:-1]).any())):
            raise ValueError(f"{self._label()} {self.spec}: the index buffer must hold {self.k} sorted distinct "
                             f"indices in [0, {size}); the weights are corrupt, save the model again")

    def to_dense(self) -> Tensor:
        dense = self.values.new_zeros(self.out_features, self.in_features)
        return dense.index_copy(self.axis, self.index, self.values)

    def _project_(self, weight: Tensor) -> None:
        norms = weight.to(torch.float64).square().sum(dim=1 - self.axis)
        self.index.copy_(norms.topk(self.k).indices.sort().values)
        self.values.copy_(weight.index_select(self.axis, self.index))

    def _weight_flops(self, tokens: int) -> int:
        return 2 * tokens * self.values.numel()


@register
class SelectedRows(_Selected):
    name = "rows"
    Config = SelectedRowsConfig
    scaled_by = ("values",)
    axis = 0

    def _matmul(self, x: Tensor) -> Tensor:
        part = x @ self.values.to(x.dtype).T  # (N, k)
        return part.new_zeros(x.shape[0], self.out_features).index_copy(1, self.index, part)

    def _factors(self) -> dict[str, tuple[float, float]]:
        return {"values": (self.in_features, self.k)}


@register
class SelectedColumns(_Selected):
    name = "cols"
    Config = SelectedColumnsConfig
    scaled_by = ("values",)
    axis = 1

    def _matmul(self, x: Tensor) -> Tensor:
        return x.index_select(1, self.index) @ self.values.to(x.dtype).T

    def _factors(self) -> dict[str, tuple[float, float]]:
        return {"values": (self.k, self.out_features)}
