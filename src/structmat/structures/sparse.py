"""Sparse structures with a fixed support: NMSparse (n of every m consecutive inputs per row) and
FixedSparse (any support of a given density). Only the nonzero values are parameters; the support is an
index buffer. Projection: keep the largest magnitudes (top-n per group, top-k overall), which is the
Frobenius-optimal member because each kept entry can equal W exactly and dropped ones cost |w|^2.
The reference forward scatters the values into a dense matrix; kernels may do better.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import StructuredLinear, StructureConfig, check_divides, check_fraction, check_int, register, round_up


@dataclass(frozen=True)
class NMSparseConfig(StructureConfig):
    name = "nm"
    n: int
    m: int
    pad: bool = False

    def __post_init__(self) -> None:
        check_int(self.name, "n", self.n)
        check_int(self.name, "m", self.m, minimum=2)
        if self.n >= self.m:
            raise ValueError(f"nm: n={self.n} must be < m={self.m} (n = m would be dense)")


@dataclass(frozen=True)
class FixedSparseConfig(StructureConfig):
    name = "sparse"
    density: float

    def __post_init__(self) -> None:
        check_fraction(self.name, "density", self.density)


def nnz_for(density: float, in_features: int, out_features: int) -> int:
    return max(1, round(density * in_features * out_features))


class _SparseBase(StructuredLinear):
    """Shared by sparse structures: values + index buffer, draw support in init_."""

    def init_(self, generator: torch.Generator | None = None):
        with torch.no_grad():
            if self.index.device.type != "meta":
                self.index.copy_(self._random_support(generator))
        return super().init_(generator)

    def _matmul(self, x: Tensor) -> Tensor:
        return F.linear(x, self.to_dense())

    def _check_state(self) -> None:
        self._check_index()

    def _check_index(self) -> None:
        """Validate the index buffer of a loaded state (range, duplicates, pattern): a bad index would fail at the
        first forward or, worse, compute another matrix. The one place that knows how indices are stored."""
        raise NotImplementedError

    def _index_error(self, problem: str) -> ValueError:
        return ValueError(f"{self._label()} {self.spec}: the sparse index buffer {problem}; the weights are corrupt, "
                          "save the model again")

    def _check_index_tensor(self, shape: tuple[int, ...]) -> Tensor:
        index = self.index
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise self._index_error(f"has dtype {index.dtype}, expected an integer dtype")
        if tuple(index.shape) != shape:
            raise self._index_error(f"has shape {tuple(index.shape)}, expected {shape}")
        return index.to(torch.long)


@register
class NMSparse(_SparseBase):
    name = "nm"
    Config = NMSparseConfig
    scaled_by = ("values",)

    def __init__(self, in_features: int, out_features: int, n: int, m: int, pad: bool = False, bias: bool = True, *,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        NMSparseConfig(n, m, pad)
        self.n, self.m, self.pad = n, m, bool(pad)
        if m > in_features:  # bounded padding: the group may not exceed the input it pads
            raise ValueError(f"{self._label()}: m={m} exceeds in_features={in_features}, so padding would dominate "
                             f"the layer; use m <= {in_features}")
        if not pad:
            check_divides(self._label(), "m", m, {"in_features": in_features}, pad_ok=True)
        self.in_padded = round_up(in_features, m)
        self.groups = self.in_padded // m
        self._check_smaller_than_dense(out_features * self.groups * n, "use a smaller n/m")
        shape = (out_features, self.groups * n)
        self.values = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.register_buffer("index", torch.zeros(shape, device=device, dtype=torch.long))
        self.init_()

    @classmethod
    def config_for_ratio(cls, in_features, out_features, ratio, m=4, pad=False, **fixed):
        if fixed:
            raise ValueError(f"nm: ratio= takes only m and pad besides, got {sorted(fixed)}")
        n = min(max(1, round(ratio * m)), m - 1)
        return NMSparseConfig(n=n, m=m, pad=bool(pad))

    @classmethod
    def size_ladder(cls, in_features, out_features, sizes=4, m=4, pad=False, **fixed):
        """Every n:m with n < m (1:4, 2:4, 3:4 by default)."""
        if fixed:
            raise ValueError(f"nm: the size ladder takes only m and pad, got {sorted(fixed)}")
        return [NMSparseConfig(n=n, m=m, pad=bool(pad)) for n in range(1, m)]

    def _random_support(self, generator):
        scores = torch.rand(self.out_features, self.groups, self.m, generator=generator, device=self.index.device)
        return self._group_top(scores)

    def _group_top(self, scores: Tensor) -> Tensor:
        """Absolute column indices of the n largest scores in each group of m, sorted."""
        pos = scores.topk(self.n, dim=-1).indices.sort(dim=-1).values
        offset = torch.arange(self.groups, device=scores.device).unsqueeze(-1) * self.m
        return (pos + offset).reshape(self.out_features, -1)

    def _check_index(self) -> None:
        if self.index.device.type == "meta":
            return
        index = self._check_index_tensor((self.out_features, self.groups * self.n))
        group = index.reshape(self.out_features, self.groups, self.n)
        start = torch.arange(self.groups, device=index.device).view(1, -1, 1) * self.m
        if bool(((group < start) | (group >= start + self.m)).any()):
            raise self._index_error(f"breaks the {self.n}:{self.m} pattern (an index lies outside its group of "
                                    f"{self.m} columns, or outside 0..{self.in_padded - 1})")
        if self.n > 1 and bool((group.sort(dim=-1).values.diff(dim=-1) == 0).any()):
            raise self._index_error("repeats a column within a group")

    def to_dense(self) -> Tensor:
        dense = self.values.new_zeros(self.out_features, self.in_padded).scatter(1, self.index, self.values)
        return dense[:, : self.in_features]

    def _project_(self, weight: Tensor) -> None:
        padded = F.pad(weight, (0, self.in_padded - self.in_features))
        self.index.copy_(self._group_top(padded.abs().reshape(self.out_features, self.groups, self.m)))
        self.values.copy_(padded.gather(1, self.index))

    def _weight_flops(self, tokens: int) -> int:
        return 2 * tokens * self.values.numel()

    def _factors(self) -> dict[str, tuple[float, float]]:
        density = self.n / self.m
        return {"values": (self.in_padded * density, self.out_features * density)}


@register
class FixedSparse(_SparseBase):
    name = "sparse"
    Config = FixedSparseConfig
    scaled_by = ("values",)

    def __init__(self, in_features: int, out_features: int, density: float, bias: bool = True, *,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        FixedSparseConfig(density)
        self.density = float(density)
        nnz = nnz_for(density, in_features, out_features)
        self._check_smaller_than_dense(nnz, "use density < 1 - 1/(in*out)")
        self.values = nn.Parameter(torch.empty(nnz, device=device, dtype=dtype))
        self.register_buffer("index", torch.zeros(nnz, device=device, dtype=torch.long))
        self.init_()

    @classmethod
    def config_for_ratio(cls, in_features, out_features, ratio, **fixed):
        if fixed:
            raise ValueError(f"sparse: ratio= takes no other keys, got {sorted(fixed)}")
        return FixedSparseConfig(density=ratio)

    def _random_support(self, generator):
        size = self.in_features * self.out_features
        perm = torch.randperm(size, generator=generator, device=self.index.device)
        return perm[: self.values.numel()].sort().values

    def _check_index(self) -> None:
        if self.index.device.type == "meta":
            return
        index = self._check_index_tensor(tuple(self.values.shape))
        size = self.in_features * self.out_features
        if index.numel() and bool(((index < 0) | (index >= size)).any()):
            raise self._index_error(f"has entries outside 0..{size - 1}")
        if index.numel() > 1 and bool((index.sort().values.diff() == 0).any()):
            raise self._index_error("repeats a position")

    def to_dense(self) -> Tensor:
        flat = self.values.new_zeros(self.out_features * self.in_features).scatter(0, self.index, self.values)
        return flat.reshape(self.out_features, self.in_features)

    def _project_(self, weight: Tensor) -> None:
        flat = weight.reshape(-1)
        # argsort beats topk when nnz is a large fraction of the matrix
        self.index.copy_(torch.argsort(flat.abs(), descending=True)[: self.values.numel()].sort().values)
        self.values.copy_(flat[self.index])

    def _weight_flops(self, tokens: int) -> int:
        return 2 * tokens * self.values.numel()

    def _factors(self) -> dict[str, tuple[float, float]]:
        nnz = self.values.numel()
        return {"values": (nnz / self.out_features, nnz / self.in_features)}
