"""Input statistics of linear layers, streamed in float64 (or float32 when asked), once per distinct input tensor."""

from __future__ import annotations

import json
import os
import tempfile
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..validate import all_finite


def _conv1d_class() -> type | None:
    try:  # transformers is a dependency, but stats must not fail if it cannot be imported
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - depends on the environment
        return None
    return Conv1D


def linear_in_features(module: nn.Module) -> int:
    """Input size of an ``nn.Linear`` (weight (out, in)) or HF ``Conv1D`` (weight (in, out)); else ValueError."""
    if isinstance(module, nn.Linear):
        return module.in_features
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.shape[0]
    raise ValueError(f"{type(module).__name__} is neither nn.Linear nor transformers' Conv1D")


def _checked_rows(owner: str, x: Tensor, gram: Tensor) -> tuple[Tensor, Tensor]:
    """The rows of ``x`` (any leading shape, last dimension = ``gram``'s rows) in ``gram``'s dtype, and their sum of
    |x| per channel; a clear error for a wrong type, width or device and for any NaN/Inf entry."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner} expects a tensor, got {type(x).__name__}")
    in_features = gram.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(f"{owner}: input has last dimension {x.shape[-1]}, expected in_features={in_features}")
    rows = x.detach().reshape(-1, in_features)
    if rows.device != gram.device:
        raise ValueError(f"{owner}: input is on {rows.device} but the statistics live on {gram.device}; "
                         f"call stats.to({str(rows.device)!r}) first")
    rows = rows.to(gram.dtype)
    # sum |x| per channel as one reduction (no |x| copy of the rows); a NaN/Inf entry makes its channel's sum
    # non-finite, so the check reads n sums instead of a rows-sized mask (counted only when there is one)
    abs_sum = torch.linalg.vector_norm(rows, ord=1, dim=0)
    if not bool(torch.isfinite(abs_sum).all()):
        bad = int((~torch.isfinite(rows)).sum())
        raise ValueError(f"{owner}: the input has {bad} NaN/Inf entries"
                         + ("" if bad else f" in its sums (finite values too large to add up in {gram.dtype})")
                         + "; calibration never skips them. Fix the model or data that produced them (e.g. run in "
                         "float32 instead of float16, check the inputs and attention masks)")
    return rows, abs_sum


@dataclass
class InputStats:
    """Streaming statistics of the inputs ``x`` (rows of length ``in_features``) of a linear layer.

    ``gram`` = sum over tokens of x x^T (in x in), ``abs_sum`` = sum over tokens of |x| (in), ``count`` = tokens
    seen, accumulated in the dtype of ``gram`` (float64 by default; float32 halves memory and is several times
    faster on GPUs). Everything stays on the device of the activations.
    """

    gram: Tensor
    abs_sum: Tensor
    count: int = 0

    def __post_init__(self) -> None:
        if self.gram.dim() != 2 or self.gram.shape[0] != self.gram.shape[1]:
            raise ValueError(f"InputStats: gram must be square (in, in), got {tuple(self.gram.shape)}")
        if self.abs_sum.shape != (self.gram.shape[0],):
            raise ValueError(f"InputStats: abs_sum must have shape ({self.gram.shape[0]},), "
                             f"got {tuple(self.abs_sum.shape)}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise ValueError(f"InputStats: count must be a non-negative int, got {self.count!r}")

    @classmethod
    def empty(cls, in_features: int, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float64) -> "InputStats":
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"InputStats: statistics accumulate in torch.float32 or torch.float64, got {dtype}")
        return cls(torch.zeros(in_features, in_features, dtype=dtype, device=device),
                   torch.zeros(in_features, dtype=dtype, device=device), 0)

    @property
    def in_features(self) -> int:
        return self.gram.shape[0]

    @property
    def device(self) -> torch.device:
        return self.gram.device

    @property
    def mean_abs(self) -> Tensor:
        """Mean |x| per input channel (the ASVD / activation-aware scale)."""
        if self.count == 0:
            raise ValueError("InputStats.mean_abs: no tokens seen yet; run calibration batches first")
        return self.abs_sum / self.count

    @property
    def second_moment(self) -> Tensor:
        """gram / count: the uncentered covariance E[x x^T]."""
        if self.count == 0:
            raise ValueError("InputStats.second_moment: no tokens seen yet; run calibration batches first")
        return self.gram / self.count

    def update(self, x: Tensor) -> "InputStats":
        """Add the rows of ``x`` (any leading shape, last dimension ``in_features``), in the statistics' dtype on its device."""
        rows, abs_sum = _checked_rows("InputStats.update", x, self.gram)
        self.gram.addmm_(rows.T, rows)
        self.abs_sum.add_(abs_sum)
        self.count += rows.shape[0]
        return self

    def merge(self, other: "InputStats") -> "InputStats":
        """Add another stream's statistics into this one (in place; returns self)."""
        if not isinstance(other, InputStats):
            raise TypeError(f"InputStats.merge expects InputStats, got {type(other).__name__}")
        if other.in_features != self.in_features:
            raise ValueError(f"InputStats.merge: in_features {other.in_features} != {self.in_features}")
        self.gram.add_(other.gram.to(self.gram.device, self.gram.dtype))
        self.abs_sum.add_(other.abs_sum.to(self.abs_sum.device, self.gram.dtype))
        self.count += other.count
        return self

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "InputStats":
        """A copy on ``device`` (dtype kept unless given)."""
        dtype = dtype or self.gram.dtype
        return InputStats(self.gram.to(device=device, dtype=dtype, copy=True),
                          self.abs_sum.to(device=device, dtype=dtype, copy=True), self.count)

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors (``count`` as an int64 scalar), ready for safetensors."""
        return {"gram": self.gram.contiguous(), "abs_sum": self.abs_sum.contiguous(),
                "count": torch.tensor(self.count, dtype=torch.int64)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "InputStats":
        missing = {"gram", "abs_sum", "count"} - set(state)
        if missing:
            raise ValueError(f"InputStats.from_state_dict: missing {sorted(missing)}")
        count = state["count"]
        count = int(count.item()) if isinstance(count, Tensor) else int(count)
        gram = state["gram"]
        gram = gram.to(gram.dtype if gram.dtype in (torch.float32, torch.float64) else torch.float64)
        abs_sum = state["abs_sum"].to(device=gram.device, dtype=gram.dtype)
        stats = cls(gram.clone(), abs_sum.clone(), count)
        stats.check_finite("InputStats.from_state_dict")
        return stats

    def cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """A derived quantity (e.g. an eigendecomposition of the damped Gram) computed once for this object;
        :meth:`clear_cache` frees them."""
        cache = self.__dict__.setdefault("_derived", {})
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    def take_cached(self, key: tuple) -> Any:
        """Remove and return a cached quantity (None when absent): for a result computed ahead for one consumer,
        e.g. a layer's fit from a batched projection of several layers."""
        return self.__dict__.get("_derived", {}).pop(key, None)

    def clear_cache(self) -> None:
        self.__dict__.pop("_derived", None)

    def check_finite(self, owner: str = "InputStats") -> None:
        if not (all_finite(self.gram) and all_finite(self.abs_sum)):
            raise ValueError(f"{owner}: the statistics contain NaN/Inf; recollect them from finite activations")


@dataclass
class GramColumns:
    """Columns ``lo:hi`` of a layer's Gram and its whole ``abs_sum``: what one pass collects when the whole Gram
    does not fit on the device (``compress.blockwise`` with ``offload="all"``). ``gram`` is (in, hi - lo)."""

    gram: Tensor
    abs_sum: Tensor
    lo: int
    hi: int
    count: int = 0

    @classmethod
    def empty(cls, in_features: int, lo: int, hi: int, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float64) -> "GramColumns":
        if not 0 <= lo < hi <= in_features:
            raise ValueError(f"GramColumns: columns {lo}:{hi} do not lie in 0:{in_features}")
        return cls(torch.zeros(in_features, hi - lo, dtype=dtype, device=device),
                   torch.zeros(in_features, dtype=dtype, device=device), lo, hi, 0)

    def update(self, x: Tensor) -> "GramColumns":
        rows, abs_sum = _checked_rows("GramColumns.update", x, self.gram)
        self.gram.addmm_(rows.T, rows[:, self.lo:self.hi])
        self.abs_sum.add_(abs_sum)
        self.count += rows.shape[0]
        return self


def assemble(parts: list[InputStats | GramColumns], device: torch.device | str = "cpu") -> InputStats:
    """One layer's InputStats on ``device`` from passes that each collected the whole Gram or some of its columns
    (every column exactly once, every pass over the same tokens)."""
    if not parts:
        raise ValueError("assemble: no parts")
    n = parts[0].gram.shape[0]
    if any(p.count != parts[0].count for p in parts):
        raise ValueError(f"assemble: the parts saw different token counts {[p.count for p in parts]}")
    spans = sorted((0, n) if isinstance(p, InputStats) else (p.lo, p.hi) for p in parts)
    if spans[0][0] != 0 or spans[-1][1] != n or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise ValueError(f"assemble: the parts' columns {spans} do not cover 0:{n} exactly once")
    if len(parts) == 1 and isinstance(parts[0], InputStats):
        return parts[0].to(device)
    gram = torch.empty(n, n, dtype=parts[0].gram.dtype, device=device)
    for p in parts:
        gram[:, p.lo:p.hi].copy_(p.gram)
    return InputStats(gram, parts[0].abs_sum.to(device, copy=True), parts[0].count)


# ----------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------


def _identity_key(x: Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device), x._version)


class _Collector:
    """Forward pre-hooks that update each distinct input tensor's statistics exactly once.

    Sharing is detected by tensor identity: the same storage pointer, shape, stride, dtype, device and version, and
    the first tensor with that key still alive (a weak reference, so no activation is kept and a freed pointer that
    is reused is not mistaken for the same input). A module that sees the same tensor as a module seen before joins
    that module's object the first time; afterwards each object is updated once per distinct tensor.
    """

    def __init__(self, names: list[str], modules: dict[str, nn.Module], dtype: torch.dtype = torch.float64,
                 columns: dict[str, tuple[int, int]] | None = None) -> None:
        self.modules = modules
        self.dtype = dtype
        self.columns = columns or {}
        self.owner: dict[str, InputStats | GramColumns] = {}
        self.tokens: dict[str, int] = {name: 0 for name in names}
        # key -> (weakref to the tensor, ids of the stats objects already updated with it)
        self.seen: dict[tuple, tuple[Any, set[int]]] = {}

    def reset(self) -> None:
        self.seen.clear()

    def hook(self, name: str) -> Callable:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
            if not isinstance(x, Tensor):
                raise ValueError(f"calibration: module {name!r} was called without a tensor input")
            with torch.no_grad():
                self._record(name, module, x)
        return pre_hook

    def _record(self, name: str, module: nn.Module, x: Tensor) -> None:
        in_features = linear_in_features(module)
        if x.shape[-1] != in_features:
            raise ValueError(f"calibration: module {name!r} got input of last dimension {x.shape[-1]}, "
                             f"expected {in_features}")
        self.tokens[name] += x.numel() // in_features
        key = _identity_key(x)
        entry = self.seen.get(key)
        if entry is not None and entry[0]() is not x:
            entry = None  # the first tensor with this key died: a reused pointer, not the same input
        if entry is None:
            if len(self.seen) > 4096:  # never grows without bound when the model's own forward is not hooked
                self.seen = {k: v for k, v in self.seen.items() if v[0]() is not None}
            entry = (weakref.ref(x), set())
            self.seen[key] = entry
        stats = self.owner.get(name)
        if stats is None:
            span = self.columns.get(name)
            shared = [s for s in self.owner.values() if id(s) in entry[1] and _span(s) == span]
            if shared:
                stats = shared[0]
            elif span is None:
                stats = InputStats.empty(in_features, x.device, self.dtype)
            else:
                stats = GramColumns.empty(in_features, *span, device=x.device, dtype=self.dtype)
            self.owner[name] = stats
        if id(stats) in entry[1]:
            return  # this distinct input was already added to this (shared) object
        try:
            stats.update(x)
        except ValueError as err:
            raise ValueError(f"calibration: input of module {name!r}: {err}") from None
        entry[1].add(id(stats))

    def check(self) -> None:
        for name, stats in self.owner.items():
            if stats.count != self.tokens[name]:
                sharing = sorted(n for n, s in self.owner.items() if s is stats)
                raise RuntimeError(
                    f"calibration: modules {sharing} shared one input in the first batch but not in a later one "
                    f"({name!r} saw {self.tokens[name]} tokens, its statistics hold {stats.count}); "
                    "collect them in separate calls"
                )


def _span(stats: InputStats | GramColumns) -> tuple[int, int] | None:
    return (stats.lo, stats.hi) if isinstance(stats, GramColumns) else None


def collect_input_stats(model: nn.Module, module_names: list[str], run: Callable[[], None],
                        dtype: torch.dtype = torch.float64,
                        columns: dict[str, tuple[int, int]] | None = None) -> dict[str, InputStats]:
    """Stream input statistics of the named ``nn.Linear`` / ``Conv1D`` modules while ``run()`` feeds batches.

    ``run`` is called once and should push all calibration batches through ``model`` (under ``torch.no_grad()``
    usually). Hooks are removed afterwards, also on error. Returns ``{name: InputStats}``; names whose modules
    received the same input tensor map to the same object (one Gram per distinct input). A module that ``run``
    never called raises a ValueError. ``dtype``: float64 (default) or float32 accumulation. ``columns``: for the
    named modules, only Gram columns lo:hi (a :class:`GramColumns`, see :func:`assemble`).
    """
    if isinstance(module_names, str):
        raise TypeError("collect_input_stats: module_names must be a list of names, not a string")
    names = list(dict.fromkeys(module_names))
    available = dict(model.named_modules())
    modules: dict[str, nn.Module] = {}
    for name in names:
        if name not in available:
            close = [n for n in available if n.endswith(name.split(".")[-1])][:5]
            raise ValueError(f"collect_input_stats: no module named {name!r} in {type(model).__name__}"
                             + (f"; similar: {close}" if close else ""))
        linear_in_features(available[name])  # raises for unsupported module types
        modules[name] = available[name]
    unknown = set(columns or {}) - set(names)
    if unknown:
        raise ValueError(f"collect_input_stats: columns given for modules not collected: {sorted(unknown)}")
    collector = _Collector(names, modules, dtype, columns)
    handles = [model.register_forward_pre_hook(lambda *_: collector.reset())]
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(collector.hook(name), with_kwargs=True))
        run()
    finally:
        for handle in handles:
            handle.remove()
        collector.reset()
    missing = [n for n in names if n not in collector.owner]
    if missing:
        raise ValueError(f"collect_input_stats: modules {missing} were never called by run(); "
                         "check that run() feeds batches through this model")
    collector.check()
    return {name: collector.owner[name] for name in names}


# ----------------------------------------------------------------------------------------------
# Saving (sharing preserved: one tensor set per distinct object)
# ----------------------------------------------------------------------------------------------

STATS_FORMAT = "structmat.input_stats"
STATS_VERSION = 1


def save_stats(path: str | os.PathLike, stats: dict[str, InputStats]) -> None:
    """Write ``{name: InputStats}`` to a safetensors file (atomically); shared objects are stored once."""
    from safetensors.torch import save_file

    groups: list[InputStats] = []
    names: dict[str, int] = {}
    for name, s in stats.items():
        index = next((i for i, g in enumerate(groups) if g is s), None)
        if index is None:
            groups.append(s)
            index = len(groups) - 1
        names[name] = index
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, g in enumerate(groups)
               for k, v in g.state_dict().items()}
    meta = {"format": STATS_FORMAT, "version": str(STATS_VERSION), "names": json.dumps(names)}
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_stats(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, InputStats]:
    """Inverse of :func:`save_stats` (sharing restored)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        if meta.get("format") != STATS_FORMAT:
            raise ValueError(f"load_stats: {path} is not a structmat statistics file")
        if int(meta.get("version", "0")) > STATS_VERSION:
            raise ValueError(f"load_stats: {path} has version {meta['version']}, newer than {STATS_VERSION}; "
                             "upgrade structmat")
        names = json.loads(meta["names"])
        keys = set(f.keys())
        groups: dict[int, InputStats] = {}
        for index in sorted(set(names.values())):
            part = {k: f.get_tensor(f"{index}.{k}") for k in ("gram", "abs_sum", "count") if f"{index}.{k}" in keys}
            groups[index] = InputStats.from_state_dict(part)
    return {name: groups[index] for name, index in names.items()}
