"""Model surgery: swap dense linear layers for structured ones by plan, and back.

:func:`structurize` works on any model (no per-architecture code): every linear layer (:mod:`structmat.modules`)
that the :class:`~structmat.plan.Plan` matches is replaced by setting the attribute on its parent module(s). All new
layers are built before the first swap, so a failure leaves the model unchanged. :func:`densify` turns structured
layers back into ``nn.Linear`` (the pre-merge used for decoding). The plan language lives in :mod:`structmat.plan`
and module discovery in :mod:`structmat.modules`; their names are re-exported here for compatibility.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .modules import (_conv1d_class, _is_linear, _walk, dense_cost, dense_weight, linear_modules,  # noqa: F401
                      locations, structured_modules)
from .plan import DATA_FREE, PLAN_VERSION, Plan, SpecLike, Target  # noqa: F401  (re-exported)
from .structures import REGISTRY
from .structures import from_dense as _from_dense
from .structures.base import StructuredLinear

_locations = locations  # old private names, kept for code that imported them from here
_dense_cost = dense_cost

# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


@dataclass
class LayerRow:
    name: str
    in_features: int
    out_features: int
    old_params: int
    new_params: int
    old_flops: int  # per token
    new_flops: int  # per token
    weight_error: float  # ||W - W_hat||_F / ||W||_F
    output_error: float | None  # relative output error on the calibration inputs, None without calibration
    spec: str
    method: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Report:
    """Per swapped layer one :class:`LayerRow`; ``skipped`` lists the linear layers left dense (name -> params) so
    the totals cover every linear layer of the model."""

    rows: list[LayerRow] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_flops: dict[str, int] = field(default_factory=dict)
    unused_patterns: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[LayerRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def params_before(self) -> int:
        return sum(r.old_params for r in self.rows) + sum(self.skipped.values())

    @property
    def params_after(self) -> int:
        return sum(r.new_params for r in self.rows) + sum(self.skipped.values())

    @property
    def params_fraction(self) -> float:
        before = self.params_before
        return self.params_after / before if before else 1.0

    @property
    def flops_before(self) -> int:
        return sum(r.old_flops for r in self.rows) + sum(self.skipped_flops.values())

    @property
    def flops_after(self) -> int:
        return sum(r.new_flops for r in self.rows) + sum(self.skipped_flops.values())

    @property
    def flops_fraction(self) -> float:
        before = self.flops_before
        return self.flops_after / before if before else 1.0

    @classmethod
    def concat(cls, reports: Sequence["Report"]) -> "Report":
        """One report for several structurize calls on the same model (e.g. block by block): a layer swapped in
        any of them is a row; a layer is skipped only if no call swapped it."""
        rows = [r for rep in reports for r in rep.rows]
        swapped = {r.name for r in rows}
        skipped: dict[str, int] = {}
        skipped_flops: dict[str, int] = {}
        for rep in reports:
            for name, params in rep.skipped.items():
                if name not in swapped:
                    skipped[name] = params
                    skipped_flops[name] = rep.skipped_flops.get(name, 0)
        notes = [n for rep in reports for n in rep.notes]
        unused = [p for rep in reports for p in rep.unused_patterns]
        return cls(rows, skipped, skipped_flops, unused, notes)

    def totals(self) -> dict[str, Any]:
        return {
            "layers_structured": len(self.rows),
            "layers_skipped": len(self.skipped),
            "linear_params_before": self.params_before,
            "linear_params_after": self.params_after,
            "params_fraction": self.params_fraction,
            "linear_flops_per_token_before": self.flops_before,
            "linear_flops_per_token_after": self.flops_after,
            "flops_fraction": self.flops_fraction,
            "seconds": sum(r.seconds for r in self.rows),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [r.to_dict() for r in self.rows], "skipped": dict(self.skipped),
                "totals": self.totals(), "unused_patterns": list(self.unused_patterns), "notes": list(self.notes)}

    def format(self) -> str:
        """A plain-text table, one line per swapped layer, then the totals."""
        header = ("layer", "structure", "method", "params", "new params", "%", "FLOPs/tok", "new FLOPs/tok",
                  "w err", "out err", "s")
        lines = [header]
        for r in self.rows:
            lines.append((r.name, r.spec, r.method, f"{r.old_params:,}", f"{r.new_params:,}",
                          f"{100 * r.new_params / r.old_params:.1f}", f"{r.old_flops:,}", f"{r.new_flops:,}",
                          f"{r.weight_error:.4f}", "-" if r.output_error is None else f"{r.output_error:.4f}",
                          f"{r.seconds:.2f}"))
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        text = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                for row in lines]
        text.insert(1, "  ".join("-" * w for w in widths))
        t = self.totals()
        text.append("")
        text.append(f"structured {t['layers_structured']} linear layers, left {t['layers_skipped']} dense; "
                    f"linear params {t['linear_params_before']:,} -> {t['linear_params_after']:,} "
                    f"({100 * t['params_fraction']:.1f}%), FLOPs/token {t['linear_flops_per_token_before']:,} -> "
                    f"{t['linear_flops_per_token_after']:,} ({100 * t['flops_fraction']:.1f}%)")
        for pattern in self.unused_patterns:
            text.append(f"note: plan pattern {pattern!r} matched no linear layer")
        text.extend(f"note: {n}" for n in self.notes)
        return "\n".join(text)


# ----------------------------------------------------------------------------------------------
# structurize / densify
# ----------------------------------------------------------------------------------------------


def _build_layer(name: str, module: nn.Module, target: Target, stats: Any, fisher: Any) -> StructuredLinear:
    weight = dense_weight(module)
    bias = None if getattr(module, "bias", None) is None else module.bias.detach()
    out_f, in_f = weight.shape
    if target.method == DATA_FREE and stats is None:
        layer = _from_dense(weight, target.spec, bias)
    else:
        from .project import project  # lazy: the data-aware projections

        layer = project(weight, target.spec, method=target.method, stats=stats, fisher=fisher, bias=bias)
    if not isinstance(layer, StructuredLinear) or (layer.in_features, layer.out_features) != (in_f, out_f):
        raise ValueError(f"projection returned {type(layer).__name__} of the wrong shape")
    return layer.to(device=weight.device, dtype=weight.dtype)


def _prefit_pays(work: list[tuple[str, nn.Module, Target, int]]) -> bool:
    """Whether to fit layers of one shape and size together first (structmat.project.prefit): on a GPU, where a
    projection's column loop is launch-bound; on a CPU batching saves nothing and holds the fits in memory."""
    return any(dense_weight(module).is_cuda for _, module, _, _ in work)


def _check_targets(plan: Plan, work: list[tuple[str, nn.Module, Target, int]]) -> None:
    """Every target against its layer's shape, by a build on the meta device (no memory, no projection), before the
    first projection: a bad plan entry fails at once, not after the layers before it were fitted."""
    from .structures import build

    for name, module, target, index in work:
        out_f, in_f = dense_weight(module).shape
        try:
            build(target.spec, in_f, out_f, bias=getattr(module, "bias", None) is not None, device="meta")
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"module {name!r} ({type(module).__name__}, in_features={in_f}, out_features={out_f}) cannot take "
                f"{target.spec_text} (plan entry {plan.entries[index].pattern!r}): {err}. Fix: change the size in "
                f"that plan entry (or pass pad=True where the structure supports it), or skip this module by adding "
                f"an entry ({name!r}: None) before it. The model was not changed.") from err


def check_plan_fits(model: nn.Module, plan: Plan | Mapping[str, Any] | Sequence[Any]) -> None:
    """Raise the ``ValueError`` that ``structurize`` would, for any matched layer whose target does not fit its
    shape, without projecting anything (used by multi-step pipelines before their first step)."""
    plan = Plan.coerce(plan)
    work = []
    for name, module in linear_modules(model).items():
        found = plan.match_entry(name)
        if found is not None and found[1].target is not None:
            work.append((name, module, found[1].target, found[0]))
    _check_targets(plan, work)


def structurize(model: nn.Module, plan: Plan | Mapping[str, Any] | Sequence[Any],
                calibration: Mapping[str, Any] | None = None, fisher: Mapping[str, Tensor] | None = None,
                progress: bool = False) -> Report:
    """Replace, in place, every linear layer the plan matches by its structured projection; return a Report.

    ``calibration`` maps module names to ``structmat.calibrate.InputStats``; a layer with statistics is fitted by
    ``structmat.project.project`` with its target's method, and its relative output error on the calibration inputs
    is reported. ``fisher`` maps module names to squared-gradient sums (for Fisher-weighted methods). Every new layer
    is built before the first swap: on any error the model is left unchanged.
    """
    plan = Plan.coerce(plan)
    modules = linear_modules(model)
    used: set[int] = set()
    work: list[tuple[str, nn.Module, Target, int]] = []
    report = Report()
    for name, module in modules.items():
        found = plan.match_entry(name)
        if found is not None:
            used.add(found[0])
        if found is None or found[1].target is None:
            out_f, in_f = dense_weight(module).shape
            params, flops = dense_cost(out_f, in_f, getattr(module, "bias", None) is not None)
            report.skipped[name] = params
            report.skipped_flops[name] = flops
            continue
        work.append((name, module, found[1].target, found[0]))
    report.unused_patterns = [e.pattern if isinstance(e.pattern, str) else list(e.pattern)
                              for i, e in enumerate(plan.entries) if i not in used]

    _check_targets(plan, work)

    if calibration is not None and _prefit_pays(work):
        from .project import prefit  # lazy: the data-aware projections

        prefit([(dense_weight(module), target.spec, target.method, calibration.get(name))
                for name, module, target, _ in work])

    iterator: Iterable = work
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(work, desc="structurize", unit="layer")
    built: list[tuple[str, nn.Module, StructuredLinear]] = []
    # the last layer to use each statistics object: its derived factors (e.g. an 8192 x 8192 whitening factor)
    # are dropped once that layer is built, not held while the layers after it are projected
    last_use = {} if calibration is None else {id(calibration[n]): n for n, *_ in work if n in calibration}
    for name, module, target, index in iterator:
        pattern = plan.entries[index].pattern
        stats = None if calibration is None else calibration.get(name)
        layer_fisher = None if fisher is None else fisher.get(name)
        weight = dense_weight(module)
        out_f, in_f = weight.shape
        has_bias = getattr(module, "bias", None) is not None
        if target.method != DATA_FREE and stats is None and layer_fisher is None:
            raise ValueError(
                f"module {name!r} ({in_f}->{out_f}): method {target.method!r} needs calibration statistics, but "
                f"{'no calibration was given' if calibration is None else 'the calibration has none for it'}; "
                f"collect them (structmat.calibrate.collect_input_stats) for this module, or use method 'data-free' "
                f"in the plan entry {pattern!r}")
        start = time.perf_counter()
        try:
            layer = _build_layer(name, module, target, stats, layer_fisher)
        except (ValueError, TypeError, RuntimeError) as err:
            raise ValueError(
                f"module {name!r} ({type(module).__name__}, in_features={in_f}, out_features={out_f}) cannot take "
                f"{target.spec_text} (plan entry {pattern!r}): {err}. Fix: change the size in that plan entry (or "
                f"pass pad=True where the structure supports it), or skip this module by adding an entry "
                f"({name!r}: None) before it. The model was not changed.") from err
        if stats is not None and last_use.get(id(stats)) == name and hasattr(stats, "clear_cache"):
            stats.clear_cache()  # before the report's measurements: they need the Gram, not its factors
        with torch.no_grad():
            weight_error = layer.relative_error(weight)
            output_error = getattr(layer, "fit_info", {}).get("output_error")  # the projection measured it
            if stats is not None and output_error is None:
                from .project import output_error as _output_error  # lazy

                output_error = float(_output_error(weight, layer.to_dense().detach(), stats))
        seconds = time.perf_counter() - start
        old_params, old_flops = dense_cost(out_f, in_f, has_bias)
        try:
            spec_text = layer.spec
        except ValueError:
            spec_text = Target(layer.config).spec_text
        report.rows.append(LayerRow(name, in_f, out_f, old_params, layer.param_count(), old_flops, layer.flops(1),
                                    weight_error, output_error, spec_text, target.method, seconds))
        layer.train(module.training)
        built.append((name, module, layer))

    # Every layer is built: now swap (this part cannot fail on shapes or sizes).
    if built:
        where = locations(model)
        shared = _shared_parameter_owners(model)
        for name, module, layer in built:
            for parent, key in where.get(id(module), []):
                setattr(parent, key, layer)
            if id(module.weight) in shared:
                note = _untie(model, name)
                if note:
                    report.notes.append(note)
    return report


def _shared_parameter_owners(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (tied weights)."""
    count: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                count[id(p)] = count.get(id(p), 0) + 1
    return {k for k, v in count.items() if v > 1}


def _untie(model: nn.Module, name: str) -> str | None:
    """A tied weight (e.g. lm_head = embeddings) was structured: the two are no longer the same matrix, so the
    config must stop asking transformers to re-tie them (``tie_weights`` would otherwise overwrite the layer)."""
    changed = []
    for owner in [model, *[m for m in model.modules() if m is not model]]:
        config = getattr(owner, "config", None)
        if config is None:
            continue
        configs = [config]
        get_text = getattr(config, "get_text_config", None)
        if callable(get_text):
            try:
                text = get_text()
            except Exception:  # pragma: no cover - defensive: odd configs
                text = None
            if text is not None and text is not config:
                configs.append(text)
        for c in configs:
            if getattr(c, "tie_word_embeddings", False):
                c.tie_word_embeddings = False
                changed.append(c)
    if changed:
        return f"{name} shared its weight with another module (tied embeddings); set tie_word_embeddings=False"
    return f"{name} shared its weight with another module; the other module keeps the dense weight"


def densify(model: nn.Module, structures: str | Iterable[str] | None = None) -> int:
    """Replace every StructuredLinear by an ``nn.Linear`` whose weight is its ``to_dense()``; return the count.

    ``structures`` (registry names, e.g. ``("nm", "sparse")``) limits it to those layers: on a CPU, where the sparse
    layers have no kernel and rebuild dense tiles at every call, a mixed model's sparse layers can be made dense for
    speed while its factored layers keep their savings."""
    found = structured_modules(model)
    if structures is not None:
        names = {structures} if isinstance(structures, str) else set(structures)
        unknown = sorted(names - set(REGISTRY))
        if unknown:
            raise ValueError(f"densify: unknown structure name(s) {unknown}; known: {sorted(REGISTRY)}")
        found = {name: layer for name, layer in found.items() if layer.name in names}
    if not found:
        return 0
    where = locations(model)
    for name, layer in found.items():
        with torch.no_grad():
            weight = layer.to_dense().detach().clone()
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta",
                               dtype=weight.dtype)
            grad = any(p.requires_grad for p in layer.parameters())
            linear.weight = nn.Parameter(weight.contiguous(), requires_grad=grad)
            if layer.bias is not None:
                linear.bias = nn.Parameter(layer.bias.detach().clone().to(weight.dtype),
                                           requires_grad=layer.bias.requires_grad)
        linear.train(layer.training)
        for parent, key in where.get(id(layer), []):
            setattr(parent, key, linear)
    return len(found)


__all__ = ["Target", "Plan", "LayerRow", "Report", "linear_modules", "structured_modules", "structurize",
           "densify", "dense_weight", "PLAN_VERSION", "DATA_FREE"]
