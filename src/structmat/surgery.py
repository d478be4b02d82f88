"""Model surgery: swap dense linear layers for structured ones by module-name pattern, and back.

A :class:`Plan` is an ordered list of ``(pattern, target)`` entries:

* a string pattern is a regular expression that must match the module's FULL qualified name (``re.fullmatch``);
* a list pattern matches exact names or name suffixes: ``name == item or name.endswith("." + item)``;
* the target is a :class:`Target` (a structure spec + a projection method) or ``None`` (skip the module);
* the FIRST matching entry wins; a module no entry matches is left alone.

:func:`structurize` works on any model (no per-architecture code): every ``nn.Linear`` and every HF GPT-2 style
``Conv1D`` (weight stored ``(in, out)``) is a candidate, and a matched module is replaced by setting the attribute on
its parent module(s). All new layers are built before the first swap, so a failure leaves the model unchanged.
:func:`densify` turns structured layers back into ``nn.Linear`` (the pre-merge used for decoding).
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .structures import from_dense as _from_dense
from .structures.base import RatioSpec, StructuredLinear, StructureConfig, config_from_dict, parse_spec

PLAN_VERSION = 1
DATA_FREE = "data-free"

SpecLike = str | StructureConfig | RatioSpec


# ----------------------------------------------------------------------------------------------
# Targets and plans
# ----------------------------------------------------------------------------------------------


def _spec_to_json(spec: StructureConfig | RatioSpec) -> str | dict[str, Any]:
    """A JSON value from which ``_spec_from_json`` rebuilds an equal spec."""
    if isinstance(spec, RatioSpec):
        parts = [f"ratio={spec.ratio!r}"]
        for key, value in spec.fixed:
            if isinstance(value, tuple):
                value = "x".join(str(v) for v in value)
            parts.append(f"{key}={value}")
        return f"{spec.structure}:{','.join(parts)}"
    return spec.to_dict()


def _spec_from_json(value: Any) -> StructureConfig | RatioSpec:
    if isinstance(value, dict):
        return config_from_dict(value)
    return parse_spec(value)


@dataclass(frozen=True)
class Target:
    """What a matched module becomes: a structure spec (string, config or budget form ``name:ratio=0.5``) and the
    projection method (``"data-free"``: the Frobenius-optimal projection; anything else is handed to
    ``structmat.project.project`` with the module's calibration statistics). ``spec`` is stored parsed, so
    ``Target("lowrank:rank=8") == Target(LowRankConfig(rank=8))``."""

    spec: StructureConfig | RatioSpec
    method: str = DATA_FREE

    def __post_init__(self) -> None:
        try:
            parsed = parse_spec(self.spec)
        except TypeError as err:
            raise ValueError(f"Target: {err}") from None
        object.__setattr__(self, "spec", parsed)
        if not isinstance(self.method, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*", self.method):
            raise ValueError(f"Target: method must be a name such as 'data-free' or 'whitened', got {self.method!r}")

    @property
    def spec_text(self) -> str:
        value = _spec_to_json(self.spec)
        if isinstance(value, str):
            return value
        try:
            return self.spec.spec
        except ValueError:  # a product with explicit inner dims has no string form
            return repr(value)

    def to_dict(self) -> dict[str, Any]:
        return {"spec": _spec_to_json(self.spec), "method": self.method}

    @classmethod
    def coerce(cls, value: Any) -> "Target | None":
        """``None`` (skip), a Target, a spec string / config / RatioSpec, a config dict ``{"structure": ...}`` or a
        target dict ``{"spec": ..., "method": ...}``."""
        if value is None or isinstance(value, Target):
            return value
        if isinstance(value, (str, StructureConfig, RatioSpec)):
            return cls(value)
        if isinstance(value, dict):
            if "spec" in value:
                unknown = set(value) - {"spec", "method"}
                if unknown:
                    raise ValueError(f"Target: unknown key(s) {sorted(unknown)}; valid keys: spec, method")
                return cls(_spec_from_json(value["spec"]), value.get("method", DATA_FREE))
            if "structure" in value:
                return cls(config_from_dict(value))
        raise ValueError(f"cannot read a plan target from {value!r}; give a spec string such as 'lowrank:ratio=0.5', "
                         "a structure config, a Target or None (skip)")


Pattern = str | tuple[str, ...]


@dataclass(frozen=True)
class _Entry:
    pattern: Pattern
    target: Target | None
    regex: re.Pattern | None = field(default=None, compare=False, repr=False)

    def matches(self, name: str) -> bool:
        if self.regex is not None:
            return self.regex.fullmatch(name) is not None
        return any(name == item or name.endswith("." + item) for item in self.pattern)


def _make_entry(pattern: Any, target: Any) -> _Entry:
    if isinstance(pattern, str):
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"plan pattern {pattern!r} is not a valid regular expression ({err}); "
                             "escape special characters (re.escape) or use a list of exact names/suffixes") from None
        return _Entry(pattern, Target.coerce(target), regex)
    if isinstance(pattern, (list, tuple)):
        items = []
        for item in pattern:
            if not isinstance(item, str) or not item.lstrip("."):
                raise ValueError(f"plan pattern {list(pattern)!r}: every item must be a non-empty module name or "
                                 f"suffix, got {item!r}")
            items.append(item.lstrip("."))
        if not items:
            raise ValueError("plan pattern []: an empty list matches nothing; remove the entry")
        return _Entry(tuple(items), Target.coerce(target))
    raise ValueError(f"plan pattern {pattern!r}: use a regex string (full match on the qualified name) or a list of "
                     "exact names / suffixes")


class Plan:
    """An ordered list of ``(pattern, Target | None)`` entries; the first matching entry wins.

    ``Plan({r".*attention.*": "lowrank:ratio=0.5", r".*pooler.*": None})`` or
    ``Plan([(["q_proj", "k_proj"], Target("monarch:nblocks=4", "whitened")), (r".*", None)])``.
    """

    def __init__(self, entries: Mapping[str, Any] | Iterable[tuple[Any, Any]] | None = None) -> None:
        if entries is None:
            entries = []
        if isinstance(entries, Plan):
            entries = [(e.pattern, e.target) for e in entries.entries]
        elif isinstance(entries, Mapping):
            entries = list(entries.items())
        built = []
        for item in entries:
            if isinstance(item, dict) and "pattern" in item:
                item = (item["pattern"], item.get("target"))
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"plan entry {item!r}: write (pattern, target)")
            built.append(_make_entry(*item))
        self.entries: tuple[_Entry, ...] = tuple(built)

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def coerce(cls, plan: Any) -> "Plan":
        if isinstance(plan, Plan):
            return plan
        if isinstance(plan, Mapping):
            return cls.from_dict(plan)
        if isinstance(plan, (list, tuple)):
            return cls(plan)
        raise TypeError(f"a plan must be a Plan, a dict pattern -> target or a list of (pattern, target), "
                        f"got {type(plan).__name__}")

    @classmethod
    def exact(cls, targets: Mapping[str, Any]) -> "Plan":
        """A plan naming modules exactly: ``{qualified_name: target}`` (no suffix or regex semantics)."""
        return cls([(re.escape(name), target) for name, target in targets.items()])

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        """Read ``to_dict()``'s form ``{"version": 1, "entries": [...]}`` or a plain mapping pattern -> target."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a plan must be a dict, got {type(data).__name__}")
        version = data.get("version")
        if isinstance(version, int) and not isinstance(version, bool):
            if version > PLAN_VERSION:
                raise ValueError(f"plan version {version} is newer than this structmat understands "
                                 f"(version {PLAN_VERSION}); upgrade structmat")
            if version < 1:
                raise ValueError(f"plan version {version} is not valid; expected {PLAN_VERSION}")
            unknown = set(data) - {"version", "entries"}
            if "entries" not in data or unknown or not isinstance(data["entries"], list):
                raise ValueError("a versioned plan must be {'version': 1, 'entries': [{'pattern': ..., "
                                 "'target': ...}, ...]}" + (f"; unknown keys {sorted(unknown)}" if unknown else ""))
            entries = []
            for entry in data["entries"]:
                if not isinstance(entry, dict) or set(entry) - {"pattern", "target"} or "pattern" not in entry:
                    raise ValueError(f"plan entry {entry!r}: write {{'pattern': ..., 'target': ...}}")
                entries.append((entry["pattern"], entry.get("target")))
            return cls(entries)
        return cls(list(data.items()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable; ``Plan.from_dict(plan.to_dict()) == plan``."""
        return {
            "version": PLAN_VERSION,
            "entries": [{"pattern": e.pattern if isinstance(e.pattern, str) else list(e.pattern),
                         "target": None if e.target is None else e.target.to_dict()} for e in self.entries],
        }

    # --- matching --------------------------------------------------------------------------------
    def match_entry(self, name: str) -> tuple[int, _Entry] | None:
        """The first entry matching ``name`` (its index and the entry), or None."""
        for i, entry in enumerate(self.entries):
            if entry.matches(name):
                return i, entry
        return None

    def match(self, name: str) -> Target | None:
        """The target for module ``name``: None when the first match skips it or nothing matches."""
        found = self.match_entry(name)
        return None if found is None else found[1].target

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and self.entries == other.entries

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        inner = ", ".join(f"({e.pattern!r}, {e.target!r})" for e in self.entries)
        return f"Plan([{inner}])"


# ----------------------------------------------------------------------------------------------
# Finding and replacing modules
# ----------------------------------------------------------------------------------------------


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def _is_linear(module: nn.Module, conv1d: type | None) -> bool:
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module | None]]:
    """(qualified name, module, parent) for every module, first occurrence only, never descending into a
    StructuredLinear (its factors are internal) nor into torch's MultiheadAttention (which reads its out_proj weight
    directly, so swapping it would be silently ignored)."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module, nn.Module | None]] = [("", model, None)]
    while stack:
        name, module, parent = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module, parent
        if isinstance(module, (StructuredLinear, nn.MultiheadAttention)):
            continue
        children = [(f"{name}.{k}" if name else k, child, module)
                    for k, child in module._modules.items() if child is not None]
        stack.extend(reversed(children))


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> every ``nn.Linear`` and HF ``Conv1D`` that is not already structured, in module order."""
    conv1d = _conv1d_class()
    return {name: m for name, m, _ in _walk(model) if name and _is_linear(m, conv1d)}


def structured_modules(model: nn.Module) -> dict[str, StructuredLinear]:
    """Qualified name -> every top-level StructuredLinear (the factors inside a Product are not listed)."""
    return {name: m for name, m, _ in _walk(model) if name and isinstance(m, StructuredLinear)}


def _locations(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) -> every (parent, attribute) that holds it (a module may be registered under several names)."""
    where: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for key, child in parent._modules.items():
            if child is not None:
                where.setdefault(id(child), []).append((parent, key))
    return where


def dense_weight(module: nn.Module) -> Tensor:
    """The ``(out_features, in_features)`` weight of an nn.Linear or HF Conv1D (Conv1D stores it transposed)."""
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.detach().T
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    raise TypeError(f"{type(module).__name__} is neither nn.Linear nor transformers' Conv1D")


def _dense_cost(out_f: int, in_f: int, bias: bool) -> tuple[int, int]:
    """(params, FLOPs per token) of a dense layer, counted as StructuredLinear counts them."""
    return in_f * out_f + (out_f if bias else 0), 2 * in_f * out_f + (out_f if bias else 0)


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
            params, flops = _dense_cost(out_f, in_f, getattr(module, "bias", None) is not None)
            report.skipped[name] = params
            report.skipped_flops[name] = flops
            continue
        work.append((name, module, found[1].target, found[0]))
    report.unused_patterns = [e.pattern if isinstance(e.pattern, str) else list(e.pattern)
                              for i, e in enumerate(plan.entries) if i not in used]

    iterator: Iterable = work
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(work, desc="structurize", unit="layer")
    built: list[tuple[str, nn.Module, StructuredLinear]] = []
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
        with torch.no_grad():
            weight_error = layer.relative_error(weight)
            output_error = None
            if stats is not None:
                from .project import output_error as _output_error  # lazy

                output_error = float(_output_error(weight, layer.to_dense().detach(), stats))
        seconds = time.perf_counter() - start
        old_params, old_flops = _dense_cost(out_f, in_f, has_bias)
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
        where = _locations(model)
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


def densify(model: nn.Module) -> int:
    """Replace every StructuredLinear by an ``nn.Linear`` whose weight is its ``to_dense()``; return the count."""
    found = structured_modules(model)
    if not found:
        return 0
    where = _locations(model)
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
           "densify", "dense_weight", "PLAN_VERSION"]
