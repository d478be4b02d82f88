"""The plan language shared by compression, fresh initialization and adapters.

A :class:`Plan` is an ordered list of ``(pattern, target)`` entries:

* a string pattern is a regular expression that must match the module's FULL qualified name (``re.fullmatch``);
* a list pattern matches exact names or name suffixes: ``name == item or name.endswith("." + item)``;
* the target is a :class:`Target` (a structure spec + a projection method) or ``None`` (skip the module);
* the FIRST matching entry wins; a module no entry matches is left alone.

A plan is JSON-serializable (``to_dict`` / ``from_dict``, with a version field); types are resolved only through
the structure registry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .structures.base import RatioSpec, StructureConfig, config_from_dict, parse_spec

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


__all__ = ["Target", "Plan", "PLAN_VERSION", "DATA_FREE", "SpecLike"]
