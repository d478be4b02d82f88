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
from .project import lowrank_error_curve, output_error, project
from .project.budget_solver import Candidate, solve_budget
from .structures import structure_class
from .structures.base import divisors, parse_spec
from .structures.lowrank import max_rank
from .structures.monarch import monarch_block_rank
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
    """A structure family the budget solver may use for a layer, and the projection method to use for it."""

    structure: str  # lowrank | monarch | nm | blockdiag | sparse | dense
    method: str = "data-free"
    nblocks: int | None = None  # monarch/blockdiag: fix the block count (None: try the usual ones)

    @classmethod
    def parse(cls, text: str) -> "Allowed":
        """``lowrank``, ``lowrank@whitened``, ``monarch@whitened:nblocks=4``, ``nm@sparsegpt``."""
        head, _, args = text.partition(":")
        structure, _, method = head.partition("@")
        nblocks = None
        if args:
            key, _, value = args.partition("=")
            if key.strip() != "nblocks":
                raise ValueError(f"allowed structure {text!r}: only nblocks= may be fixed")
            nblocks = int(value)
        structure_class(structure.strip())
        return cls(structure.strip(), method.strip() or "data-free", nblocks)


def _dense_candidate(name: str, weight: Tensor) -> Candidate:
    out_f, in_f = weight.shape
    return Candidate(name, parse_spec("dense"), "none", in_f * out_f, 2 * in_f * out_f, 0.0, in_f * out_f)


# Pricing is an estimate: whitened Monarch runs fewer block-coordinate sweeps than the final projection (each
# sweep only lowers the error, so the price is an upper bound of what the final projection reaches).
_PRICING_OPTIONS = {("monarch", "whitened"): {"sweeps": 2}}


def _priced(name: str, weight: Tensor, spec, method: str, stats: InputStats | None) -> Candidate | None:
    out_f, in_f = weight.shape
    structure = spec.name if hasattr(spec, "name") else str(spec).partition(":")[0]
    try:
        layer = project(weight, spec, method=method, stats=stats,
                        **_PRICING_OPTIONS.get((structure, method), {}))
    except ValueError:
        return None  # this size does not fit this layer
    params = layer.param_count()
    if params >= in_f * out_f:
        return None
    approx = layer.to_dense().detach()
    err = output_error(weight, approx, stats) ** 2 if stats is not None else \
        float((torch.linalg.norm(weight - approx) / torch.linalg.norm(weight)) ** 2)
    return Candidate(name, layer.config, method, params, layer.flops(1), err, in_f * out_f)


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
    """Every candidate (structure, size, method) for one layer with its predicted error. Sizes are multiples
    of 8 where the shape allows."""
    out_f, in_f = weight.shape
    found = [_dense_candidate(name, weight)]
    for a in allowed:
        if a.structure == "dense":
            continue
        if a.structure == "lowrank":
            curve = lowrank_error_curve(weight, stats, method=a.method if stats is not None else "data-free")
            top = max_rank(in_f, out_f)
            ranks = list(range(8, top + 1, 8)) or list(range(1, top + 1))
            for r in ranks:
                spec = parse_spec(f"lowrank:rank={r}")
                found.append(Candidate(name, spec, a.method, r * (in_f + out_f), 2 * r * (in_f + out_f),
                                       float(curve[r]) ** 2, in_f * out_f))
        elif a.structure == "monarch":
            common = [b for b in divisors(math.gcd(in_f, out_f)) if 2 <= b <= 16]
            for b in [a.nblocks] if a.nblocks else common:
                cmax = min(in_f, out_f) // b
                for frac in [(k + 1) / sizes for k in range(sizes)]:
                    c = max(1, int(frac * monarch_block_rank(in_f, out_f, b) * 2))
                    c = min(cmax, c - c % 8 if c >= 16 else c)
                    cand = _priced(name, weight, parse_spec(f"monarch:nblocks={b},block_rank={c}"), a.method, stats)
                    if cand is not None:
                        found.append(cand)
        elif a.structure == "nm":
            for n, m in [(1, 4), (2, 4), (3, 4)]:
                cand = _priced(name, weight, parse_spec(f"nm:n={n},m={m}"), a.method, stats)
                if cand is not None:
                    found.append(cand)
        elif a.structure in ("blockdiag", "sparse"):
            for ratio in [(k + 1) / (sizes + 1) for k in range(sizes)]:
                cand = _priced(name, weight, f"{a.structure}:ratio={ratio:.3f}", a.method, stats)
                if cand is not None:
                    found.append(cand)
        else:
            raise ValueError(f"the budget solver cannot size {a.structure!r}; allowed: lowrank, monarch, nm, "
                             "blockdiag, sparse, dense")
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

