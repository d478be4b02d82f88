"""The projection registry: each data-aware method registers itself where it is defined.

    @register_projection("whitened", LowRank, needs_stats=True, optimal=True, options={"damp": 1e-6})
    def whitened_lowrank(problem: Problem, damp: float) -> StructuredLinear: ...

A registered function receives a :class:`Problem` (the weight in the compute dtype, the resolved config, the Gram,
the data-free baseline on demand) and its options, and returns a layer (or ``(layer, info)``). ``optimal=True``
marks a method that is never worse than the data-free projection by construction (an exact minimizer, or a
descent started from data-free): the guard does not evaluate the data-free projection for it unless asked.
An optional ``pricer`` returns the squared relative output error of many sizes at once (the budget solver's
candidates), e.g. every rank of a low-rank basis from one decomposition; without one each size is projected.
``data-free`` applies to every structure and needs no registration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import torch
from torch import Tensor

from ..calibrate import InputStats
from ..structures import REGISTRY, StructuredLinear, StructureConfig, from_dense

DATA_FREE = "data-free"


@dataclass
class Problem:
    """One projection: ``w`` is the weight in the compute dtype; ``weight`` the caller's tensor (its dtype and
    device are the layer's)."""

    weight: Tensor
    w: Tensor
    config: StructureConfig
    stats: InputStats | None
    fisher: Tensor | None
    bias: Tensor | None

    @property
    def cls(self) -> type[StructuredLinear]:
        return REGISTRY[self.config.name]

    @property
    def args(self) -> dict[str, Any]:
        return {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)}

    @cached_property
    def h(self) -> Tensor:
        """The Gram in the compute dtype, on the weight's device."""
        return self.stats.gram.to(self.w.device, self.w.dtype)

    @cached_property
    def baseline(self) -> StructuredLinear:
        """The data-free projection (the guard's reference and the start of descent methods)."""
        return from_dense(self.weight, self.config, self.bias)

    def new_layer(self) -> StructuredLinear:
        """An UNINITIALIZED layer of the target config (built on the meta device, then given memory): the
        projection fills every factor and buffer, so a random init would be wasted work."""
        out_features, in_features = self.weight.shape
        layer = self.cls(in_features, out_features, bias=self.bias is not None, device="meta",
                         dtype=self.weight.dtype, **self.args)
        return layer.to_empty(device=self.weight.device)


@dataclass(frozen=True)
class Projection:
    method: str
    structure: str
    fn: Callable[..., Any]
    needs_stats: bool
    needs_fisher: bool = False
    optimal: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    pricer: Callable[..., list[float]] | None = None
    pricing_options: dict[str, Any] = field(default_factory=dict)
    budget_default: dict[str, Any] | None = None

    def resolve_options(self, given: dict[str, Any]) -> dict[str, Any]:
        allowed = {**self.options, **({} if "guard" in self.options else {"guard": not self.optimal})}
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise ValueError(f"project: method {self.method!r} on {self.structure!r} takes no option(s) {unknown}; "
                             f"valid options: {sorted(allowed) or 'none'}")
        return {**allowed, **given}


PROJECTIONS: dict[tuple[str, str], Projection] = {}


def _structure_name(structure: type[StructuredLinear] | str) -> str:
    name = structure if isinstance(structure, str) else getattr(structure, "name", None)
    if name not in REGISTRY:
        raise ValueError(f"register_projection: unknown structure {structure!r}; registered: {sorted(REGISTRY)}")
    return name


def register_projection(method: str, structure: type[StructuredLinear] | str, *, needs_stats: bool,
                        needs_fisher: bool = False, optimal: bool = False, options: dict[str, Any] | None = None,
                        pricer: Callable[..., list[float]] | None = None,
                        pricing_options: dict[str, Any] | None = None,
                        budget_default: dict[str, Any] | None = None) -> Callable:
    """Register ``fn(problem, **options)`` as ``method`` for ``structure`` (a StructuredLinear class or name).

    ``pricing_options``: options the budget's pricing uses instead of the projection's defaults (e.g. fewer
    sweeps for a price that only has to rank sizes). ``budget_default``: this method is one of the default budget's
    allowed structures, with these size-ladder arguments held fixed (``{}`` for none); see :func:`default_allow`."""
    name = _structure_name(structure)
    if method == DATA_FREE:
        raise ValueError("register_projection: 'data-free' is every structure's own from_dense; do not register it")

    def decorate(fn: Callable) -> Callable:
        old = PROJECTIONS.get((method, name))
        same_site = old is not None and (old.fn.__module__, old.fn.__qualname__) == (fn.__module__, fn.__qualname__)
        if old is not None and not same_site:  # the same definition run again (a reload) may replace itself
            raise ValueError(f"register_projection: {method!r} for {name!r} is already registered by "
                             f"{old.fn.__module__}.{old.fn.__qualname__}")
        PROJECTIONS[(method, name)] = Projection(method, name, fn, needs_stats, needs_fisher, optimal,
                                                 dict(options or {}), pricer, dict(pricing_options or {}),
                                                 None if budget_default is None else dict(budget_default))
        return fn
    return decorate


def default_allow() -> str:
    """The default budget's allowed structures, ``structure@method[:arg=value,...]`` comma-separated, from the
    registrations that asked for it (``budget_default``), in registration order."""
    parts = []
    for (method, structure), found in PROJECTIONS.items():
        if found.budget_default is not None:
            args = ",".join(f"{k}={v}" for k, v in found.budget_default.items())
            parts.append(f"{structure}@{method}" + (f":{args}" if args else ""))
    return ",".join(parts)


def methods_for(structure: str) -> list[str]:
    """The projection methods that apply to a structure name (data-free first, then in registration order)."""
    return [DATA_FREE] + [m for (m, s) in PROJECTIONS if s == structure]


def all_methods() -> dict[str, tuple[str, ...]]:
    """method -> the structures it applies to."""
    out: dict[str, tuple[str, ...]] = {DATA_FREE: tuple(sorted(REGISTRY))}
    for method, structure in PROJECTIONS:
        out[method] = (*out.get(method, ()), structure)
    return out


def get_projection(method: str, structure: str) -> Projection | None:
    """The registered projection, None for data-free; ValueError naming the valid choices otherwise."""
    if method == DATA_FREE:
        return None
    if method not in all_methods():
        raise ValueError(f"project: unknown method {method!r}; valid methods: {', '.join(all_methods())}")
    found = PROJECTIONS.get((method, structure))
    if found is None:
        raise ValueError(f"project: method {method!r} does not apply to structure {structure!r}; valid methods for "
                         f"{structure}: {', '.join(methods_for(structure))}")
    return found


def check_method(method: str, structure: str, options: dict[str, Any] | None = None) -> None:
    """Validate a (method, structure, options) choice without any data (for early checks of plans and flags)."""
    if structure not in REGISTRY:
        raise ValueError(f"unknown structure {structure!r}; valid: {', '.join(sorted(REGISTRY))}")
    found = get_projection(method, structure)
    if found is not None and options:
        found.resolve_options(dict(options))


def compute_dtype(stats: InputStats | None, dtype: torch.dtype | None) -> torch.dtype:
    """The projection's working precision: asked for, else the statistics' dtype (float32 or float64)."""
    if dtype is not None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"project: dtype must be torch.float32 or torch.float64, got {dtype}")
        return dtype
    if stats is not None and stats.gram.dtype in (torch.float32, torch.float64):
        return stats.gram.dtype
    return torch.float64


__all__ = ["Problem", "Projection", "PROJECTIONS", "register_projection", "default_allow", "methods_for", "all_methods",
           "get_projection", "check_method", "compute_dtype"]
