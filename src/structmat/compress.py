"""One-shot compression of a pretrained model: calibrate, choose (plan or budget solver), project, swap.

Two ways to calibrate:
- one-shot: statistics of every matched layer's input are collected in one pass over the ORIGINAL model;
- layer-sequential (``sequential=True``): blocks are processed in order; the inputs of block l are the outputs of
  the already-compressed blocks < l, so later layers are fitted to what they will really see. Memory is one block
  plus the calibration activations. It works for any model whose repeated blocks sit in an ``nn.ModuleList``
  (found automatically: the ModuleList holding the most linear layers).

Budget mode prices candidates on one-shot statistics of the original model (the solver needs every layer's
options before it chooses), then applies its choice (sequentially if asked).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .calibrate import InputStats, collect_input_stats
from .project import check_method, output_error, price
from .project.budget_solver import Candidate, solve_budget
from .structures import structure_class
from .structures.base import parse_spec
from .surgery import Plan, Report, Target, dense_weight, linear_modules, structurize


# ------------------------------------------------------------------------------------------------
# Running calibration batches
# ------------------------------------------------------------------------------------------------

def _call_model(model: nn.Module, batch: dict[str, Tensor]) -> Any:
    kwargs = dict(batch)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False  # a KV cache would grow across calibration batches
    return model(**kwargs)


def run_batches(model: nn.Module, batches: Sequence[dict[str, Tensor]], progress: bool = False) -> Callable[[], None]:
    def run() -> None:
        from tqdm.auto import tqdm

        with torch.no_grad():
            for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
                _call_model(model, batch)
    return run


def matched_layers(model: nn.Module, plan: Plan) -> dict[str, Target]:
    """Module name -> target for every linear layer the plan structures (skips and unmatched dropped)."""
    out = {}
    for name in linear_modules(model):
        target = plan.match(name)
        if target is not None:
            out[name] = target
    return out


def calibrate(model: nn.Module, names: Iterable[str], batches: Sequence[dict[str, Tensor]],
              progress: bool = False) -> dict[str, InputStats]:
    """One-shot statistics of the inputs of ``names`` over ``batches``."""
    return collect_input_stats(model, list(names), run_batches(model, batches, progress))


# ------------------------------------------------------------------------------------------------
# Layer-sequential compression
# ------------------------------------------------------------------------------------------------

class _StopForward(Exception):
    pass


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList whose children hold the most linear layers (a transformer's blocks)."""
    linears = list(linear_modules(model))
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            count = sum(1 for n in linears if n.startswith(name + "."))
            if count and (best is None or count > best[0]):
                best = (count, name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no nn.ModuleList of blocks with linear layers was found; "
                         "use one-shot calibration (sequential=False)")
    return best[1], best[2]


def _capture_block_inputs(model: nn.Module, block: nn.Module, batches) -> list[tuple[tuple, dict]]:
    captured: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    _call_model(model, batch)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise ValueError("the first block did not run once per calibration batch; cannot compress sequentially")
    return captured


def _hidden_of(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = hidden
    return args, kwargs


def compress_sequential(model: nn.Module, plan: Plan, batches: Sequence[dict[str, Tensor]],
                        progress: bool = False) -> Report:
    """Compress block by block; each block is calibrated on the outputs of the compressed blocks before it."""
    prefix, blocks = find_blocks(model)
    targets = matched_layers(model, plan)
    inputs = _capture_block_inputs(model, blocks[0], batches)
    reports = []
    # Layers outside the blocks (e.g. a pooler) are compressed one-shot on the original model first.
    outside = {n: t for n, t in targets.items() if not n.startswith(prefix + ".")}
    if outside:
        stats = calibrate(model, outside, batches)
        reports.append(structurize(model, Plan.exact(outside), calibration=stats, progress=progress))
    for index, block in enumerate(blocks):
        block_prefix = f"{prefix}.{index}."
        here = {n: t for n, t in targets.items() if n.startswith(block_prefix)}
        if here:
            run = lambda: [block(*a, **kw) for a, kw in inputs]  # noqa: E731 - the hooks see these calls
            with torch.no_grad():
                stats = collect_input_stats(model, list(here), run)
            reports.append(structurize(model, Plan.exact(here), calibration=stats, progress=progress))
        with torch.no_grad():
            inputs = [_with_hidden(a, kw, _hidden_of(block(*a, **kw))) for a, kw in inputs]
    return Report.concat(reports)


# ------------------------------------------------------------------------------------------------
# Budget mode
# ------------------------------------------------------------------------------------------------

def output_sensitivity(model: nn.Module, names: Iterable[str], batches: Sequence[dict[str, Tensor]],
                       seed: int = 0) -> dict[str, float]:
    """How much a unit of squared error in each layer's output moves the model's final output, to first order:
    the mean over tokens and features of (d (u . y) / d out_l)^2, with y the model's first output tensor
    (hidden states or logits) and u a fresh standard-normal probe per batch (so E[g g^T] = J J^T)."""
    names = list(names)
    modules = linear_modules(model)
    sums = {n: 0.0 for n in names}
    counts = {n: 0 for n in names}
    handles = []

    def make_hook(name):
        def forward_hook(_module, _inputs, output):
            def grad_hook(grad):
                sums[name] += float(grad.detach().double().square().sum())
                counts[name] += grad.numel()
            if output.requires_grad:
                output.register_hook(grad_hook)
        return forward_hook

    flags = {p: p.requires_grad for p in model.parameters()}
    generator = torch.Generator().manual_seed(seed)
    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        for p in flags:
            p.requires_grad_(True)
        for batch in batches:
            out = _call_model(model, batch)
            y = out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))
            probe = torch.randn(y.shape, generator=generator).to(y.device, y.dtype)
            loss = (y * probe).sum()
            if not torch.isfinite(loss):
                raise ValueError("output_sensitivity: the model produced a non-finite output on a calibration batch")
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)
    missing = [n for n in names if counts[n] == 0]
    if missing:
        raise ValueError(f"output_sensitivity: layers {missing[:3]} never ran on the calibration batches")
    return {n: sums[n] / counts[n] for n in names}


@dataclass(frozen=True)
class Allowed:
    """A structure family the budget solver may use for a layer, the projection method to use for it, and any
    arguments of its size ladder held fixed (e.g. Monarch's ``nblocks``)."""

    structure: str
    method: str = "data-free"
    nblocks: int | None = None  # kept for the common case; equivalent to fixed=(("nblocks", b),)
    fixed: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        cls = structure_class(self.structure)
        check_method(self.method, cls.name)
        names = {f.name for f in dataclasses.fields(cls.Config)} if hasattr(cls, "Config") else set()
        unknown = sorted({k for k, _ in self.fixed_args.items()} - names)
        if unknown:
            raise ValueError(f"allowed structure {self.text!r}: {cls.name} has no argument(s) {unknown}; "
                             f"valid: {', '.join(sorted(names)) or 'none'}")
        try:
            cls.size_ladder(64, 64, 1, **self.fixed_args)
        except TypeError as err:
            raise ValueError(f"allowed structure {self.text!r}: {err}") from None

    @property
    def fixed_args(self) -> dict[str, Any]:
        return {**dict(self.fixed), **({"nblocks": self.nblocks} if self.nblocks is not None else {})}

    @property
    def text(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.fixed_args.items())
        return f"{self.structure}@{self.method}" + (f":{args}" if args else "")

    @classmethod
    def parse(cls, text: str) -> "Allowed":
        """``lowrank``, ``lowrank@whitened``, ``monarch@whitened:nblocks=4``, ``nm@sparsegpt:m=8``."""
        head, _, args = text.strip().partition(":")
        structure, _, method = head.partition("@")
        fixed = []
        for part in filter(None, (p.strip() for p in args.split(","))):
            key, eq, value = part.partition("=")
            if not eq:
                raise ValueError(f"allowed structure {text!r}: write key=value after ':', got {part!r}")
            try:
                parsed: Any = int(value)
            except ValueError:
                parsed = {"true": True, "false": False}.get(value.strip().lower(), value.strip())
            fixed.append((key.strip(), parsed))
        nblocks = dict(fixed).pop("nblocks", None)
        return cls(structure.strip(), method.strip() or "data-free", nblocks,
                   tuple((k, v) for k, v in fixed if k != "nblocks"))


def _dense_candidate(name: str, weight: Tensor) -> Candidate:
    out_f, in_f = weight.shape
    return Candidate(name, parse_spec("dense"), "none", in_f * out_f, 2 * in_f * out_f, 0.0, in_f * out_f)


# Pricing is an estimate: whitened Monarch runs fewer block-coordinate sweeps than the final projection (each
# sweep only lowers the error, so the price is an upper bound of what the final projection reaches).
_PRICING_OPTIONS = {("monarch", "whitened"): {"sweeps": 2}}


def price_layers(model: nn.Module, allowed: dict[str, Sequence[Allowed]] | Sequence[Allowed],
                 stats: dict[str, InputStats] | None, names: Iterable[str] | None = None) -> dict[str, list[Candidate]]:
    """Every in-scope layer's candidates with their relative squared output errors."""
    modules = linear_modules(model)
    per_layer = {}
    for name in (list(names) if names is not None else list(modules)):
        options = allowed if not isinstance(allowed, dict) else next(
            (v for pattern, v in allowed.items() if Plan.from_dict({pattern: "dense"}).match(name) is not None), None)
        if options is not None:
            weight = dense_weight(modules[name])
            per_layer[name] = candidates_for(name, weight, options, None if stats is None else stats[name])
    return per_layer


def _weighted(model: nn.Module, name: str, options: list[Candidate], stats: dict[str, InputStats] | None,
              sensitivity: float) -> list[Candidate]:
    if stats is None:
        raise ValueError("sensitivity weighting needs calibration statistics")
    w = dense_weight(linear_modules(model)[name]).to(torch.float64)
    energy = float(((w @ stats[name].gram.to(w.device)) * w).sum())
    return [dataclasses.replace(c, error=c.error * energy * sensitivity) for c in options]


def candidates_for(name: str, weight: Tensor, allowed: Sequence[Allowed], stats: InputStats | None,
                   sizes: int = 4) -> list[Candidate]:
    """Every candidate (structure, size, method) for one layer with its predicted error: each allowed structure
    offers its own size ladder, priced by the projection registry (one decomposition for every size where the
    method registered a pricer)."""
    out_f, in_f = weight.shape
    found = [_dense_candidate(name, weight)]
    for a in allowed:
        cls = structure_class(a.structure)
        if cls.name == "dense":
            continue
        configs = [c for c in cls.size_ladder(in_f, out_f, sizes, **a.fixed_args)]
        costs = []
        for config in configs:
            try:
                layer = cls.from_config(config, in_f, out_f, bias=False, device="meta")
            except ValueError:
                costs.append(None)  # this size does not fit this layer
                continue
            costs.append((layer.param_count(), layer.flops(1)))
        fits = [(c, cost) for c, cost in zip(configs, costs) if cost is not None and cost[0] < in_f * out_f]
        if not fits:
            continue
        method = a.method if stats is not None else "data-free"
        errors = price(weight, [c for c, _ in fits], method, stats,
                       options=_PRICING_OPTIONS.get((cls.name, method)))
        for (config, (params, flops)), err in zip(fits, errors):
            if err is not None:
                found.append(Candidate(name, config, a.method, params, flops, float(err), in_f * out_f))
    unique = {}
    for c in found:
        unique.setdefault((str(c.spec), c.method), c)
    return list(unique.values())


def budget_plan(model: nn.Module, allowed: dict[str, Sequence[Allowed]] | Sequence[Allowed],
                stats: dict[str, InputStats] | None, target: float, key: str = "params",
                names: Iterable[str] | None = None, sensitivity: dict[str, float] | None = None,
                candidates: dict[str, list[Candidate]] | None = None) -> tuple[Plan, dict[str, Candidate]]:
    """Choose every layer's structure and size so the chosen layers hold ``target`` of their dense params
    (or FLOPs), minimizing the summed predicted output error.

    Without ``sensitivity`` a layer's predicted error is its relative squared output error on the calibration
    inputs (every layer counts alike). With it (see :func:`output_sensitivity`), the error is in units of the
    model's final output: relative error x the layer's output energy tr(W H W^T) x its sensitivity — a
    first-order estimate of how much the final output moves, which lets the solver spend parameters where they
    matter. ``candidates`` (from :func:`price_layers`) avoids re-pricing when several targets are solved."""
    if not 0 < target <= 1:
        raise ValueError(f"target must lie in (0, 1], got {target}")
    per_layer = candidates if candidates is not None else price_layers(model, allowed, stats, names)
    if sensitivity is not None:
        per_layer = {n: _weighted(model, n, c, stats, sensitivity[n]) for n, c in per_layer.items()}
    dense_total = sum(c[0].cost(key) for c in per_layer.values())
    chosen = solve_budget(per_layer, target * dense_total, key=key)
    targets = {n: (None if c.method == "none" else Target(c.spec, c.method)) for n, c in chosen.items()}
    return Plan.exact({n: t for n, t in targets.items() if t is not None}), chosen

