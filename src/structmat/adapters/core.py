"""``adapt(model, plan)``: wrap matched linear layers (dense or structured) as a frozen base plus a trainable delta.

The delta is any registered structure, built from the same registry as compression (``lowrank:rank=16`` is LoRA,
``kron:rank=4`` Compacter, ``randbasis`` NOLA/RandLoRA, ``ldu`` LoLDU, ``rows``/``cols`` S2FT, ``splr`` DSEE/SoRA,
``monarch``, ``sparse``, ...). The layer computes ``base(x) + scale * delta(x)`` with ``scale = alpha / r`` (or
rsLoRA's ``alpha / sqrt(r)``), r the delta's ``rank`` where it has one, else 1; ``alpha=None`` means scale 1.

Inits:

* ``zero``: the delta starts at exactly zero and still learns (its output-side factor is zeroed, ``zero_()``).
* ``pissa``: the delta is the projection of the base weight onto the delta structure (the principal singular
  vectors for low rank; the whitened projection when calibration statistics are given), and the base keeps the
  residual, so base + delta reproduces the original weight (a dense base only).
* ``eora``: training-free: the delta is the projection of the compression error ``W_original - base`` onto the delta
  structure on the calibration objective (for low rank: the SVD in the eigenspace of the calibration Gram, which is
  EoRA). Needs ``stats`` and ``reference`` (the original weights).

The frozen base's parameters have ``requires_grad=False``, so autograd (and the structured kernels) skip its weight
gradients. ``merge`` folds the delta into the base, projecting back onto the base's structure where it is
structured (calibrated where statistics exist), and reports the error this introduces; ``unmerge`` restores the
pair as it was.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..calibrate import InputStats
from ..structures import build, from_dense, resolve_spec
from ..structures.base import StructuredLinear, StructureConfig
from ..structures.lowrank import LowRank
from ..structures.sparse_lowrank import SparsePlusLowRank
from ..surgery import Plan, _conv1d_class, _locations, dense_weight

INITS = ("zero", "pissa", "eora")


class AdaptedLinear(nn.Module):
    """``base(x) + scale * delta(x)``: ``base`` an ``nn.Linear`` or a StructuredLinear (frozen), ``delta`` a
    StructuredLinear without bias."""

    def __init__(self, base: nn.Module, delta: StructuredLinear, scale: float, *, alpha: float | None = None,
                 rslora: bool = False, init: str = "zero") -> None:
        super().__init__()
        if not isinstance(delta, StructuredLinear) or delta.bias is not None:
            raise TypeError("AdaptedLinear: delta must be a StructuredLinear built with bias=False")
        in_f, out_f = _shape(base)
        if (delta.in_features, delta.out_features) != (in_f, out_f):
            raise ValueError(f"AdaptedLinear: delta is {delta.in_features}->{delta.out_features}, base {in_f}->{out_f}")
        self.base, self.delta = base, delta
        self.in_features, self.out_features = in_f, out_f
        self.scale, self.alpha, self.rslora, self.init = float(scale), alpha, bool(rslora), init

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.delta(x) * self.scale

    def merged_weight(self) -> Tensor:
        """base + scale * delta as a dense float64 tensor."""
        with torch.no_grad():
            return _weight_of(self.base).to(torch.float64) + self.scale * self.delta.to_dense().to(torch.float64)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}, init={self.init!r}, delta={self.delta.spec!r}"


def _shape(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, StructuredLinear):
        return module.in_features, module.out_features
    out_f, in_f = dense_weight(module).shape
    return in_f, out_f


def _weight_of(module: nn.Module) -> Tensor:
    return module.to_dense().detach() if isinstance(module, StructuredLinear) else dense_weight(module)


def delta_scale(config: StructureConfig, alpha: float | None, rslora: bool) -> float:
    """alpha / r (rsLoRA: alpha / sqrt(r)); r is the delta's rank where it has one, else 1; alpha=None gives 1."""
    if alpha is None:
        return 1.0
    rank = getattr(config, "rank", None) or 1
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> every nn.Linear, HF Conv1D, StructuredLinear and AdaptedLinear, never looking inside a
    StructuredLinear (its factors) or an AdaptedLinear (its base and delta)."""
    conv1d = _conv1d_class()
    found: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(module, (StructuredLinear, AdaptedLinear)):
            found[name] = module
            skip.append(name)
        elif isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
            found[name] = module
    return found


def adapter_modules(model: nn.Module) -> dict[str, AdaptedLinear]:
    """Qualified name -> every AdaptedLinear of the model."""
    return {n: m for n, m in adaptable_modules(model).items() if isinstance(m, AdaptedLinear)}


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The deltas' parameters (what fine-tuning trains)."""
    return [p for m in adapter_modules(model).values() for p in m.delta.parameters()]


@dataclass
class AdaptRow:
    name: str
    in_features: int
    out_features: int
    base: str  # "dense" or the base's spec
    delta: str
    base_params: int
    delta_params: int
    scale: float
    init: str
    output_error_before: float | None = None  # eora: relative output error of the base alone vs the reference
    output_error_after: float | None = None  # eora: of base + delta

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class AdaptReport:
    rows: list[AdaptRow] = field(default_factory=list)
    linear_params: int = 0  # every linear layer of the model (adapted or not), bases only

    @property
    def adapter_params(self) -> int:
        return sum(r.delta_params for r in self.rows)

    @property
    def adapter_fraction(self) -> float:
        return self.adapter_params / self.linear_params if self.linear_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [r.to_dict() for r in self.rows], "adapter_params": self.adapter_params,
                "linear_params": self.linear_params, "adapter_fraction": self.adapter_fraction}

    def format(self) -> str:
        lines = [f"{r.name}: {r.base} + {r.scale:g} * {r.delta} ({r.delta_params:,} params, init {r.init}"
                 + (f", output error {r.output_error_before:.4f} -> {r.output_error_after:.4f}"
                    if r.output_error_after is not None else "") + ")" for r in self.rows]
        lines.append(f"adapted {len(self.rows)} layers: {self.adapter_params:,} adapter params = "
                     f"{100 * self.adapter_fraction:.2f}% of {self.linear_params:,} linear params")
        return "\n".join(lines)


def _fit(weight: Tensor, config: StructureConfig, stats: InputStats | None) -> StructuredLinear:
    """The projection of ``weight`` onto ``config``: on the calibration objective where statistics exist and the
    structure has a data-aware method (whitened, else SparseGPT), the Frobenius-optimal one otherwise."""
    if stats is None:
        return from_dense(weight, config)
    from ..project import methods_for, project  # lazy: the data-aware projections

    methods = methods_for(config.name)
    method = "whitened" if "whitened" in methods else "sparsegpt" if "sparsegpt" in methods else "data-free"
    return project(weight, config, method=method, stats=stats)


def _reference_weights(reference: Any, names: Sequence[str]) -> dict[str, Tensor]:
    if reference is None:
        raise ValueError("adapt(init='eora') needs reference= (the original model or {name: dense weight}) and "
                         "stats= (calibration statistics per layer)")
    if isinstance(reference, nn.Module):
        dense = {n: m for n, m in adaptable_modules(reference).items()}
        out = {}
        for n in names:
            if n not in dense:
                raise ValueError(f"adapt(init='eora'): the reference model has no linear layer {n!r}")
            out[n] = _weight_of(dense[n])
        return out
    if isinstance(reference, Mapping):
        missing = [n for n in names if n not in reference]
        if missing:
            raise ValueError(f"adapt(init='eora'): reference has no weight for {missing[:3]}")
        return {n: reference[n].detach() for n in names}
    raise TypeError(f"adapt: reference must be a model or a dict name -> weight, got {type(reference).__name__}")


def adapt(model: nn.Module, plan: Plan | Mapping[str, Any] | Sequence[Any], init: str = "zero", *,
          alpha: float | None = None, rslora: bool = False, stats: Mapping[str, InputStats] | None = None,
          reference: nn.Module | Mapping[str, Tensor] | None = None, freeze: bool = True) -> AdaptReport:
    """Wrap every linear layer the plan matches (dense or structured) as base + delta, in place; return a report.

    ``plan`` maps module-name patterns to the delta's spec (as compression plans do; ``None`` skips). ``init`` is
    ``zero``, ``pissa`` or ``eora`` (see the module docstring); ``stats`` maps module names to calibration
    statistics (pissa: whitened split; eora: required); ``reference`` gives the original weights for eora.
    ``freeze=True`` freezes every parameter of the model but the deltas (adapter-only training); with False only the
    adapted bases are frozen. Every delta is built before the first swap: on any error the model is unchanged.
    """
    if init not in INITS:
        raise ValueError(f"adapt: init must be one of {', '.join(INITS)}, got {init!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
        raise ValueError(f"adapt: alpha must be a positive number or None (scale 1), got {alpha!r}")
    plan = Plan.coerce(plan)
    modules = adaptable_modules(model)
    work: list[tuple[str, nn.Module, StructureConfig]] = []
    for name, module in modules.items():
        target = plan.match(name)
        if target is None:
            continue
        if isinstance(module, AdaptedLinear):
            raise ValueError(f"adapt: {name!r} already has an adapter; merge(model) or unmerge first, or skip it "
                             "in the plan")
        in_f, out_f = _shape(module)
        try:
            config = resolve_spec(target.spec, in_f, out_f)
        except (ValueError, TypeError) as err:
            raise ValueError(f"adapt: module {name!r} ({in_f}->{out_f}) cannot take delta {target.spec_text}: "
                             f"{err}") from None
        work.append((name, module, config))
    if not work:
        raise ValueError(f"adapt: the plan matches no linear layer; layer names look like {list(modules)[:4]}")
    if init == "eora":
        if stats is None:
            raise ValueError("adapt(init='eora') needs stats= (structmat.calibrate statistics per layer)")
        refs = _reference_weights(reference, [n for n, _, _ in work])
    if init == "pissa":
        structured = [n for n, m, _ in work if isinstance(m, StructuredLinear)]
        if structured:
            raise ValueError(f"adapt(init='pissa') splits a dense weight; {structured[0]!r} is structured. Use "
                             "init='eora' (with the original weights) or 'zero' for a structured base")
    conv1d = _conv1d_class()
    report = AdaptReport(linear_params=sum(_weight_of(m).numel() for m in modules.values()
                                           if not isinstance(m, AdaptedLinear))
                         + sum(_weight_of(m.base).numel() for m in modules.values() if isinstance(m, AdaptedLinear)))
    built: list[tuple[nn.Module, AdaptedLinear]] = []
    for name, module, config in work:
        in_f, out_f = _shape(module)
        base = module
        if conv1d is not None and isinstance(module, conv1d):  # Conv1D stores (in, out): adapt an equal nn.Linear
            base = nn.Linear(in_f, out_f, bias=module.bias is not None, device=module.weight.device,
                             dtype=module.weight.dtype)
            with torch.no_grad():
                base.weight.copy_(module.weight.T)
                if module.bias is not None:
                    base.bias.copy_(module.bias)
        weight = _weight_of(base)
        scale = delta_scale(config, alpha, rslora)
        layer_stats = None if stats is None else stats.get(name)
        before = after = None
        try:
            if init == "zero":
                delta = build(config, in_f, out_f, bias=False, device=weight.device, dtype=weight.dtype).zero_()
            elif init == "pissa":
                delta = _fit(weight.to(torch.float64) / scale, config, layer_stats)
                residual = weight.to(torch.float64) - scale * delta.to_dense().detach()
                base = nn.Linear(in_f, out_f, bias=base.bias is not None, device=weight.device, dtype=weight.dtype)
                with torch.no_grad():
                    base.weight.copy_(residual)
                    if module.bias is not None:
                        base.bias.copy_(module.bias)
            else:
                if layer_stats is None:
                    raise ValueError("init='eora' needs calibration statistics for this layer in stats=")
                original = refs[name].to(device=weight.device, dtype=torch.float64)
                if original.shape != weight.shape:
                    raise ValueError(f"the reference weight has shape {tuple(original.shape)}, the layer "
                                     f"{tuple(weight.shape)}")
                error = original - weight.to(torch.float64)
                delta = _fit(error / scale, config, layer_stats)
                from ..project import output_error  # lazy

                before = output_error(original, weight, layer_stats)
                after = output_error(original, weight.to(torch.float64) + scale * delta.to_dense().detach(),
                                     layer_stats)
        except (ValueError, TypeError, RuntimeError) as err:
            raise ValueError(f"adapt: module {name!r} ({in_f}->{out_f}) with delta {config.spec} (init {init!r}): "
                             f"{err}. The model was not changed.") from err
        delta = delta.to(device=weight.device, dtype=weight.dtype)
        if delta.bias is not None:  # projections keep a bias slot only when one is given; a delta never has one
            raise ValueError(f"adapt: {name!r}: the delta was built with a bias")
        adapted = AdaptedLinear(base, delta, scale, alpha=alpha, rslora=rslora, init=init)
        adapted.train(module.training)
        report.rows.append(AdaptRow(name, in_f, out_f, "dense" if not isinstance(base, StructuredLinear)
                                    else base.spec, delta.spec, sum(p.numel() for p in base.parameters()),
                                    delta.param_count(), scale, init, before, after))
        built.append((module, adapted))

    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    where = _locations(model)
    for module, adapted in built:
        for p in adapted.base.parameters():
            p.requires_grad_(False)
        for p in adapted.delta.parameters():
            p.requires_grad_(True)
        for parent, key in where.get(id(module), []):
            setattr(parent, key, adapted)
    return report


# ----------------------------------------------------------------------------------------------
# merge / unmerge
# ----------------------------------------------------------------------------------------------


@dataclass
class MergeRow:
    name: str
    base: str
    weight_error: float  # ||(base + delta) - merged||_F / ||base + delta||_F
    output_error: float | None  # the same on the calibration objective, when statistics are given
    method: str
    nm_violations: int | None = None  # N:M bases: groups of m with more than n nonzeros after the merge

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class MergeReport:
    rows: list[MergeRow] = field(default_factory=list)

    @property
    def max_weight_error(self) -> float:
        return max((r.weight_error for r in self.rows), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [r.to_dict() for r in self.rows], "max_weight_error": self.max_weight_error}

    def format(self) -> str:
        lines = [f"{r.name}: {r.base} merged ({r.method}), weight error {r.weight_error:.3e}"
                 + ("" if r.output_error is None else f", output error {r.output_error:.3e}")
                 + ("" if r.nm_violations is None else f", N:M violations {r.nm_violations}") for r in self.rows]
        return "\n".join(lines)


def nm_violations(layer: StructuredLinear) -> int:
    """Groups of m consecutive inputs (per output row) holding more than n nonzeros."""
    dense = layer.to_dense().detach()
    pad = (-dense.shape[1]) % layer.m
    groups = torch.nn.functional.pad(dense, (0, pad)).reshape(dense.shape[0], -1, layer.m)
    return int(((groups != 0).sum(-1) > layer.n).sum())


def _merge_method(structure: str, stats: InputStats | None) -> str:
    if stats is None:
        return "data-free"
    from ..project import methods_for

    methods = methods_for(structure)
    return "whitened" if "whitened" in methods else "sparsegpt" if "sparsegpt" in methods else "data-free"


def _sums_exactly(adapted: AdaptedLinear) -> bool:
    """A low-rank delta on a low-rank base (or on sparse + low rank's low-rank part) sums exactly to rank r + a:
    merged without projecting (a projection back to rank r gave a healed SmolLM2 back more than its healing)."""
    return isinstance(adapted.delta, LowRank) and isinstance(adapted.base, (LowRank, SparsePlusLowRank))


def _lowrank_sum(adapted: AdaptedLinear) -> StructuredLinear | None:
    """The base's structure at rank r + a holding base + delta exactly, the two factor pairs side by side (the
    adapter's parameters join the layer's; a sparse part kept as it is); None where that would hold as many
    parameters as dense (a dense layer is then the exact merge)."""
    base, delta = adapted.base, adapted.delta
    low = base if isinstance(base, LowRank) else base.lowrank
    try:
        merged = build(dataclasses.replace(base.config, rank=low.rank + delta.rank), base.in_features,
                       base.out_features, bias=base.bias is not None, device=low.U.device, dtype=low.U.dtype)
    except ValueError:  # (as large as dense)
        return None
    with torch.no_grad():
        into = merged if isinstance(merged, LowRank) else merged.lowrank
        into.U.copy_(torch.cat([low.U, (adapted.scale * delta.U.to(torch.float64)).to(low.U.dtype)], dim=1))
        into.V.copy_(torch.cat([low.V, delta.V.to(low.V.dtype)], dim=0))
        if isinstance(base, SparsePlusLowRank):
            merged.sparse.load_state_dict(base.sparse.state_dict())
        if base.bias is not None:
            merged.bias.copy_(base.bias)
    return merged


def merge(model: nn.Module, stats: Mapping[str, InputStats] | None = None) -> MergeReport:
    """Fold every adapter into its base, in place. A dense base becomes an ``nn.Linear`` holding base + delta; a
    low-rank base with a low-rank delta becomes the exact low-rank layer of the summed ranks (sparse + low rank: its
    low-rank part grows), or, where that would be as large as dense, an exact ``nn.Linear``; any other structured
    base is projected back onto its own structure (same config: N:M stays exactly N:M, Monarch stays Monarch), on the
    calibration objective where ``stats`` has the layer (whitened, or SparseGPT for sparse bases), Frobenius-optimal
    otherwise. The error this introduces is reported per layer. ``unmerge`` restores the pairs."""
    found = adapter_modules(model)
    report = MergeReport()
    replaced: list[tuple[AdaptedLinear, nn.Module]] = []
    for name, adapted in found.items():
        base = adapted.base
        target = adapted.merged_weight()
        layer_stats = None if stats is None else stats.get(name)
        bias = None if base.bias is None else base.bias.detach()
        weight = _weight_of(base)
        exact = _sums_exactly(adapted)
        summed = _lowrank_sum(adapted) if exact else None
        if summed is not None:
            method, merged = "exact", summed
        elif isinstance(base, StructuredLinear) and not exact:
            method = _merge_method(base.name, layer_stats)
            if method == "data-free":
                merged = from_dense(target, base.config, None if bias is None else bias.to(torch.float64))
            else:
                from ..project import project

                merged = project(target, base.config, method=method, stats=layer_stats,
                                 bias=None if bias is None else bias.to(torch.float64))
            merged = merged.to(device=weight.device, dtype=weight.dtype)
        else:
            method = "exact"
            merged = nn.Linear(adapted.in_features, adapted.out_features, bias=bias is not None,
                               device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                merged.weight.copy_(target)
                if bias is not None:
                    merged.bias.copy_(bias)
        grad = any(p.requires_grad for p in base.parameters())
        for p in merged.parameters():
            p.requires_grad_(grad)
        merged.train(adapted.training)
        with torch.no_grad():
            got = _weight_of(merged).to(torch.float64)
            werr = float(torch.linalg.norm(target - got) / torch.linalg.norm(target).clamp_min(1e-300))
            oerr = None
            if layer_stats is not None:
                from ..project import output_error

                oerr = output_error(target, got, layer_stats)
        violations = nm_violations(merged) if isinstance(merged, StructuredLinear) and merged.name == "nm" else None
        report.rows.append(MergeRow(name, "dense" if not isinstance(base, StructuredLinear) else base.spec, werr,
                                    oerr, method, violations))
        object.__setattr__(merged, "_adapter_pair", adapted)  # not a submodule: unmerge's memory only
        replaced.append((adapted, merged))
    where = _locations(model)
    for adapted, merged in replaced:
        for parent, key in where.get(id(adapted), []):
            setattr(parent, key, merged)
    return report


def unmerge(model: nn.Module) -> int:
    """Put back every base + delta pair that ``merge`` folded (as it was at merge time); return the count."""
    where = _locations(model)
    count = 0
    for module in list(model.modules()):
        pair = module.__dict__.get("_adapter_pair")
        if pair is None:
            continue
        for parent, key in where.get(id(module), []):
            setattr(parent, key, pair)
        del module.__dict__["_adapter_pair"]
        count += 1
    return count


__all__ = ["AdaptedLinear", "AdaptReport", "AdaptRow", "MergeReport", "MergeRow", "adapt", "merge", "unmerge",
           "adapter_modules", "adapter_parameters", "adaptable_modules", "delta_scale", "nm_violations", "INITS"]
