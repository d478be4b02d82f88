"""Product: W = F_1 @ F_2 @ ... @ F_K, each factor any registered structure (e.g. ARMOR's
BlockDiagonal . NMSparse . BlockDiagonal). The factor at index K // 2 maps in -> out; the factors left of
it are out x out and those right of it in x in, unless ``dims`` gives the K - 1 inner sizes.

Projection (no closed form): a documented local method whose reached error is stored in ``fit_info``.
  1. Start every factor but the core at the projection of the identity and the core at the projection of W.
  2. Sweeps of alternating least squares: for factor k with fixed left product A and right product B, take
     the unconstrained minimizer A^+ W B^+ and project it onto factor k's structure; keep the change only if
     the total error drops (projecting in the factor's own metric is not the output metric).
  3. Refine all factors jointly by Adam on ||W - prod||_F^2 inside the structure, keeping the best iterate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import (StructuredLinear, StructureConfig, check_int, config_from_dict, register, split_exponent,
                   structure_class, work_dtype)


@dataclass(frozen=True)
class ProductConfig(StructureConfig):
    name = "product"
    factors: tuple[StructureConfig, ...]
    dims: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.factors, tuple) or len(self.factors) < 2:
            raise ValueError("product: give at least two factors, e.g. 'blockdiag:nblocks=4 * nm:n=2,m=4'")
        for f in self.factors:
            if not isinstance(f, StructureConfig):
                raise TypeError(f"product: every factor must be a structure config, got {type(f).__name__}")
            if f.name == "product":
                raise ValueError("product: nested products are not supported; list all factors in one product")
        if self.dims is not None:
            if len(self.dims) != len(self.factors) - 1:
                raise ValueError(f"product: dims needs {len(self.factors) - 1} inner sizes, got {len(self.dims)}")
            for d in self.dims:
                check_int(self.name, "dims", d)

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> "ProductConfig":
        unknown = set(values) - {"factors", "dims"}
        if unknown:
            raise ValueError(f"product: unknown key(s) {sorted(unknown)}; valid keys: factors, dims")
        factors = values.get("factors")
        if not isinstance(factors, (list, tuple)):
            raise ValueError("product: write a product as its factors joined by '*', e.g. "
                             "'blockdiag:nblocks=8 * nm:n=2,m=4 * blockdiag:nblocks=8'")
        factors = tuple(f if isinstance(f, StructureConfig) else config_from_dict(f) for f in factors)
        dims = values.get("dims")
        return cls(factors=factors, dims=None if dims is None else tuple(int(d) for d in dims))

    @property
    def spec(self) -> str:
        text = " * ".join(f.spec for f in self.factors)
        if self.dims is not None:
            raise ValueError(f"product with dims={self.dims} has no string form; use the config object or JSON")
        return text


@register
class Product(StructuredLinear):
    name = "product"
    Config = ProductConfig
    als_sweeps = 3
    adam_steps = 200

    def __init__(self, in_features: int, out_features: int, factors: tuple[StructureConfig, ...],
                 dims: tuple[int, ...] | None = None, bias: bool = True, *, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        ProductConfig(tuple(factors), dims)
        self.factors, self.dims = tuple(factors), dims
        k = len(factors)
        if dims is None:
            core = k // 2
            dims = tuple(out_features if i < core else in_features for i in range(k - 1))
        sizes = (out_features, *dims, in_features)  # factor i maps sizes[i + 1] -> sizes[i]
        self.core = k // 2
        self.layers = nn.ModuleList()
        for i, config in enumerate(factors):
            try:
                layer = structure_class(config.name).from_config(config, sizes[i + 1], sizes[i], bias=False,
                                                                 device=device, dtype=dtype)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{self._label()}: factor {i} ({config.spec}, {sizes[i + 1]}->{sizes[i]}): {err}") \
                    from None
            self.layers.append(layer)
        self._check_smaller_than_dense(sum(f.param_count() for f in self.layers), "use smaller factors")
        self.fit_info: dict[str, float] = {}

    @property
    def spec(self) -> str:
        return " * ".join(f.spec for f in self.factors)  # unlike ProductConfig.spec, never raises for dims

    def init_(self, generator: torch.Generator | None = None):
        for layer in self.layers:
            layer.init_(generator)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()
        return self

    def _rescalable(self) -> bool:
        return all(layer._rescalable() for layer in self.layers)

    def _rescale_(self, exponent: int) -> None:
        for layer, part in zip(self.layers, split_exponent(exponent, len(self.layers))):
            layer._rescale_(part)

    def _check_state(self) -> None:
        for layer in self.layers:
            layer._check_state()

    def zero_(self):
        """Zero the output-side factor's output-side factor(s): the product is zero and still learns."""
        self.layers[0].zero_()
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()
        return self

    def _factors(self):
        return {f"layers.{i}.{k}": v for i, f in enumerate(self.layers) for k, v in f._factors().items()}

    def param_groups(self):
        groups = [dict(g, name=f"layers.{i}.{g['name']}") for i, f in enumerate(self.layers)
                  for g in f.param_groups()]
        if self.bias is not None:
            groups.append({"name": "bias", "params": [self.bias], "lr_mult": 1.0, "weight_decay": 0.0})
        return groups

    def _matmul(self, x: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            x = layer._matmul(x)
        return x

    def to_dense(self) -> Tensor:
        dense = self.layers[0].to_dense()
        for layer in self.layers[1:]:
            dense = dense @ layer.to_dense()
        return dense

    def _weight_flops(self, tokens: int) -> int:
        return sum(layer._weight_flops(tokens) for layer in self.layers)

    def _error(self, w: Tensor) -> float:
        return torch.linalg.norm(w - self.to_dense().to(w.dtype)).item()

    def _project_(self, weight: Tensor) -> None:
        w = weight.to(work_dtype(weight))
        norm = torch.linalg.norm(w).clamp_min(torch.finfo(w.dtype).tiny).item()
        for i, layer in enumerate(self.layers):
            if i != self.core:
                eye = torch.eye(layer.out_features, layer.in_features, dtype=w.dtype, device=w.device)
                layer._project_(eye)
        self._refit_factor(self.core, w)
        start = self._error(w)
        for _ in range(self.als_sweeps):
            before = self._error(w)
            for i in range(len(self.layers)):
                self._refit_factor(i, w)
            if self._error(w) >= before * (1 - 1e-6):
                break
        after_als = self._error(w)
        best = self._adam_refine(w)
        self.fit_info = {"relative_error": best / norm, "after_core_projection": start / norm,
                         "after_als": after_als / norm}

    def _refit_factor(self, i: int, w: Tensor) -> None:
        """Replace factor i by the projection of its least-squares optimum if that lowers the error."""
        layer = self.layers[i]
        left = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
        for f in self.layers[:i]:
            left = left @ f.to_dense().to(w.dtype)
        right = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
        for f in reversed(self.layers[i + 1:]):
            right = f.to_dense().to(w.dtype) @ right
        target = torch.linalg.pinv(left) @ w @ torch.linalg.pinv(right)
        saved = _clone(layer.state_dict())
        before = self._error(w)
        layer._project_(target)
        if self._error(w) > before:
            layer.load_state_dict(saved)

    def _adam_refine(self, w: Tensor) -> float:
        params = [p for p in self.layers.parameters()]
        best_err, best_state = self._error(w), _clone(self.layers.state_dict())
        if self.adam_steps == 0:
            return best_err
        with torch.enable_grad():
            opt = torch.optim.Adam(params, lr=1e-3 * float(w.abs().mean()) ** 0.5)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.adam_steps)
            for _ in range(self.adam_steps):
                opt.zero_grad(set_to_none=True)
                loss = ((w - self.to_dense().to(w.dtype)) ** 2).sum()
                loss.backward()
                opt.step()
                sched.step()
                err = self._error(w)
                if err < best_err:
                    best_err, best_state = err, _clone(self.layers.state_dict())
        self.layers.load_state_dict(best_state)
        return best_err



def _clone(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}
