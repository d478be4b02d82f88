"""Data-aware projection of a dense weight onto a structure, on the calibration objective.

The objective of every data-aware method is the output error on the calibration inputs X (rows = tokens),
``||(W - W_hat) X^T||_F^2 = tr(E H E^T)`` with E = W - W_hat and H = the Gram matrix sum_t x_t x_t^T collected by
:mod:`structmat.calibrate`. :func:`project` is the single entry point. Each method registers itself, with its
options, where it is defined (:mod:`structmat.project.registry`); :data:`METHODS` is the live view of the registry:

==============  =====================================  ==============================================
method          structures                             algorithm
==============  =====================================  ==============================================
``data-free``   every structure                        the structure's own ``from_dense``
``whitened``    lowrank, monarch, splr                 SVD-LLM whitened SVD (``lowrank.py``); whitened
                                                       Monarch by exact block-coordinate descent
                                                       (``monarch.py``); alternating whitened SVD /
                                                       SparseGPT for sparse + low-rank (``splr.py``)
``asvd``        lowrank                                ASVD channel scaling by mean|x|^alpha
``fisher``      lowrank, monarch                       FWSVD, rows weighted by Fisher row sums
``magnitude``   nm, sparse                             = data-free (largest magnitudes)
``wanda``       nm, sparse                             |W_ij| * ||X_j||_2 per group / output row
``sparsegpt``   nm, sparse                             SparseGPT with its OBS weight update (blocked)
==============  =====================================  ==============================================

Guard: heuristics (asvd, fisher, wanda, sparsegpt) are not guaranteed to beat the data-free projection on the
calibration objective. With ``guard=True`` (their default) :func:`project` also evaluates the data-free projection
and returns it when its calibration error is strictly lower; ``layer.fit_info`` records both errors and which one
was used. Methods registered ``optimal`` (whitened low-rank is the exact minimizer; whitened Monarch and sparse +
low-rank descend from the data-free projection) skip the guard unless ``guard=True`` is passed.

Precision: the statistics' dtype (float32 or float64) unless ``dtype=`` asks otherwise; the layer is returned in
the weight's dtype/device with the bias copied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator

import torch
from torch import Tensor

from ..calibrate import InputStats
from ..structures import RatioSpec, StructuredLinear, StructureConfig, resolve_spec
from ..structures import from_dense as _data_free
from ..structures.base import check_dense_weight
from . import lowrank as _lowrank, monarch as _monarch, sparse as _sparse, splr as _splr  # noqa: F401  (register)
from .lowrank import error_curve, lowrank_basis
from .registry import (DATA_FREE, PROJECTIONS, Problem, all_methods, check_method, compute_dtype, default_allow,
                       get_projection, methods_for, register_projection)


class _MethodsView(Mapping):
    """method -> structures, read live from the registry (a method registered later appears too)."""

    def __getitem__(self, method: str) -> tuple[str, ...]:
        return all_methods()[method]

    def __iter__(self) -> Iterator[str]:
        return iter(all_methods())

    def __len__(self) -> int:
        return len(all_methods())

    def __repr__(self) -> str:
        return repr(all_methods())


METHODS: Mapping[str, tuple[str, ...]] = _MethodsView()


def _check_stats(stats: Any, in_features: int, owner: str) -> InputStats:
    if not isinstance(stats, InputStats):
        raise TypeError(f"{owner}: stats must be an InputStats (from structmat.calibrate), got {type(stats).__name__}")
    if stats.in_features != in_features:
        raise ValueError(f"{owner}: the statistics are for in_features={stats.in_features} but the weight has "
                         f"in_features={in_features}; pass the stats of this layer's input (weights are (out, in): "
                         "transpose an HF Conv1D weight first)")
    if stats.count <= 0:
        raise ValueError(f"{owner}: the statistics saw no tokens; run calibration batches through the model first")
    # once per statistics object and version (layers sharing an input share the check), not once per layer
    stats.cached(("finite", stats.gram._version, stats.abs_sum._version, stats.count),
                 lambda: stats.check_finite(owner) or True)
    return stats


def _check_fisher(fisher: Any, weight: Tensor, owner: str) -> Tensor:
    if not isinstance(fisher, Tensor):
        raise ValueError(f"{owner}: method 'fisher' needs fisher= (squared gradients from "
                         "structmat.calibrate.collect_fisher)")
    if fisher.shape != weight.shape:
        raise ValueError(f"{owner}: fisher has shape {tuple(fisher.shape)} but the weight has {tuple(weight.shape)}; "
                         "transpose the Fisher of an HF Conv1D weight together with the weight")
    if not bool(torch.isfinite(fisher).all()) or bool((fisher < 0).any()):
        raise ValueError(f"{owner}: fisher must be finite and non-negative; recollect it")
    return fisher


# entries per row chunk of output_error (16 MB in float32): E, E H and W H never as large as the weight
OUTPUT_ERROR_CHUNK = 1 << 22


def _as_dense(approx: Tensor | StructuredLinear) -> Tensor:
    if isinstance(approx, StructuredLinear):
        return approx.to_dense().detach()
    if isinstance(approx, Tensor):
        return approx.detach()
    raise TypeError(f"output_error: approx must be a tensor or a StructuredLinear, got {type(approx).__name__}")


def output_error(weight: Tensor, approx: Tensor | StructuredLinear, stats: InputStats,
                 dtype: torch.dtype | None = None) -> float:
    """Relative calibration output error sqrt(tr(E H E^T) / tr(W H W^T)), E = W - approx, H = stats.gram, in
    ``dtype`` (default: the statistics' dtype)."""
    stats = _check_stats(stats, weight.shape[-1], "output_error")
    dtype = compute_dtype(stats, dtype)
    w = weight.detach().to(dtype)  # no copy where the caller passes the weight in ``dtype`` already
    a = _as_dense(approx).to(device=w.device)  # in its own dtype: converted chunk by chunk below
    if a.shape != w.shape:
        raise ValueError(f"output_error: approx has shape {tuple(a.shape)}, the weight {tuple(w.shape)}")
    h = stats.gram.to(w.device, dtype)
    # by row chunks of ~4M entries: the temporaries (E, E H, W H) stay small beside the largest layer's Gram
    rows = max(1, OUTPUT_ERROR_CHUNK // max(1, w.shape[1]))
    num, den = w.new_zeros(()), w.new_zeros(())
    for r0 in range(0, w.shape[0], rows):
        wr = w[r0:r0 + rows]
        er = wr - a[r0:r0 + rows].to(dtype)
        num += ((er @ h) * er).sum()
        den += ((wr @ h) * wr).sum()
    num, den = num.clamp_min(0.0), den.clamp_min(0.0)
    if float(den) == 0.0:
        return 0.0 if float(num) == 0.0 else float("inf")
    return float((num / den).sqrt())


def lowrank_error_curve(weight: Tensor, stats: InputStats | None = None, method: str = "whitened", *,
                        fisher: Tensor | None = None, guard: bool = True, damp: float = 1e-6,
                        alpha: float = 0.5) -> Tensor:
    """Relative output error of the rank-r projection for every r = 0..min(out, in), from one decomposition.

    ``method`` is one of data-free, whitened, asvd, fisher (as in :func:`project`; same defaults). With
    ``guard=True`` it is the elementwise minimum with the data-free curve, matching what a guarded
    :func:`project` returns at each rank (costs a second SVD). With ``stats=None`` it is the data-free relative
    Frobenius error ||W - W_r||_F / ||W||_F (methods data-free and whitened only). In the statistics' dtype
    (float64 without statistics), on the weight's device. Entry r is the error at rank r.
    """
    w = check_dense_weight(weight, "lowrank_error_curve")
    if method not in ("data-free", "whitened", "asvd", "fisher"):
        raise ValueError(f"lowrank_error_curve: unknown method {method!r}; valid: data-free, whitened, asvd, fisher")
    if stats is None:
        if method not in ("data-free", "whitened"):
            raise ValueError(f"lowrank_error_curve: method {method!r} needs stats=")
        s = torch.linalg.svdvals(w.to(torch.float64)).square()
        total = s.sum()
        tail = total - torch.cat([s.new_zeros(1), s.cumsum(0)])
        return (tail.clamp_min(0.0) / total.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()
    stats = _check_stats(stats, w.shape[1], "lowrank_error_curve")
    w = w.to(compute_dtype(stats, None))
    if method == "fisher":
        fisher = _check_fisher(fisher, w, "lowrank_error_curve")
    h = stats.gram.to(w.device, w.dtype)
    side, basis, _ = lowrank_basis(w, method, stats, fisher, damp=damp, alpha=alpha)
    curve = error_curve(w, side, basis, h)
    if guard and method != "data-free":
        side0, basis0, _ = lowrank_basis(w, "data-free", None, None)
        curve = torch.minimum(curve, error_curve(w, side0, basis0, h))
    return curve


def _prepare(weight: Tensor, spec: Any, method: str, stats: Any, fisher: Any, bias: Tensor | None,
             options: dict[str, Any], dtype: torch.dtype | None, owner: str) -> tuple[Problem, Any, dict[str, Any]]:
    """Check everything about one projection call; return the problem, the registered projection and options."""
    weight = check_dense_weight(weight, owner, bias)
    out_features, in_features = weight.shape
    config = resolve_spec(spec, in_features, out_features)
    found = get_projection(method, config.name)
    if found is None:
        if options:
            raise ValueError(f"{owner}: method 'data-free' takes no options, got {sorted(options)}")
        opts: dict[str, Any] = {}
    else:
        opts = found.resolve_options(options)
        if found.needs_stats and stats is None:
            raise ValueError(f"{owner}: method {method!r} needs calibration statistics; pass stats= from "
                             "structmat.calibrate.collect_input_stats (or use method='data-free')")
        if found.needs_fisher:
            fisher = _check_fisher(fisher, weight, owner)
    if stats is not None:
        stats = _check_stats(stats, in_features, owner)
    w = weight.detach().to(compute_dtype(stats, dtype))
    return Problem(weight, w, config, stats, fisher, bias), found, opts


def project(weight: Tensor, spec: str | StructureConfig | RatioSpec, method: str = "data-free",
            stats: InputStats | None = None, fisher: Tensor | None = None, bias: Tensor | None = None,
            dtype: torch.dtype | None = None, measure: bool = True, **options: Any) -> StructuredLinear:
    """Project a dense ``(out, in)`` weight onto ``spec`` with ``method`` (see :data:`METHODS`).

    ``stats`` (the layer's :class:`InputStats`) is required by the methods registered with ``needs_stats``
    (whitened, asvd, wanda, sparsegpt); ``fisher`` (squared gradients shaped like the weight) by fisher. Options
    (``damp``, ``alpha``, ``blocksize``, ``sweeps``, ``rounds``, ``tol``, ``guard``, ...) depend on the method;
    unknown ones raise. ``dtype`` (float32/float64) overrides the working precision (default: the statistics').
    The returned layer carries ``fit_info`` with the method used and, when stats are given and ``measure`` is
    true, its relative calibration ``output_error`` (``measure=False`` skips the measurement and with it the
    guard: the projection alone).
    """
    problem, found, opts = _prepare(weight, spec, method, stats, fisher, bias, options, dtype, "project")
    if found is None:
        layer, extra = _data_free(problem.weight, problem.config, bias), {}
        guard = False
    else:
        guard = opts.pop("guard")
        result = found.fn(problem, **opts)
        layer, extra = result if isinstance(result, tuple) else (result, {})
        if not isinstance(layer, StructuredLinear) or layer.config != problem.config and layer is not problem.baseline:
            raise ValueError(f"project: {method!r} for {problem.config.name!r} returned {type(layer).__name__}, "
                             f"not a {problem.config.name} layer")
    if bias is not None and layer is not problem.__dict__.get("baseline"):
        with torch.no_grad():
            layer.bias.copy_(bias)
    info: dict[str, Any] = {"method": method, **extra}
    stats = problem.stats
    if stats is not None and measure:
        err = output_error(problem.w, layer, stats, problem.w.dtype)  # w: the weight in the compute dtype
        info.update(output_error=err, used=method)
        if guard:
            err0 = output_error(problem.w, problem.baseline, stats, problem.w.dtype)
            info["data_free_output_error"] = err0
            if err0 < err:
                info.update(output_error=err0, used=DATA_FREE)
                layer = problem.baseline
    layer.fit_info = {**getattr(layer, "fit_info", {}), **info}
    return layer


def stacks_rows(method: str, structure: str) -> bool:
    """Whether ``method``'s pricer for ``structure`` prices several layers with one input in one call, their
    weights stacked as rows (:func:`price` with ``row_splits``)."""
    found = get_projection(method, structure)
    return found is not None and getattr(found.pricer, "stacks_rows", False)


def _pricing_options(method: str, structure: str, given: dict[str, Any] | None) -> dict[str, Any]:
    """The registration's pricing options (e.g. fewer sweeps), overridden by those given."""
    found = get_projection(method, structure)
    return {**(found.pricing_options if found is not None else {}), **(given or {})}


def batches_inputs(method: str, structure: str) -> bool:
    """Whether ``method``'s pricer for ``structure`` prices several layers with different inputs in one batched
    call (:func:`price_many`)."""
    found = get_projection(method, structure)
    return found is not None and getattr(found.pricer, "many", None) is not None


def price(weight: Tensor, configs: list[StructureConfig], method: str = "data-free",
          stats: InputStats | None = None, dtype: torch.dtype | None = None,
          options: dict[str, Any] | None = None, row_splits: list[int] | None = None) -> list:
    """The squared relative calibration output error (relative Frobenius error without statistics) of each
    config's projection with ``method``: the budget solver's price list. A method with a registered pricer
    prices every size from one decomposition; otherwise each size is projected. None where a size does not fit.
    ``row_splits`` (only where :func:`stacks_rows`): ``weight`` is several layers' weights stacked as rows, of
    these row counts; returns one price list per layer."""
    if not configs:
        return [] if row_splits is None else [[] for _ in row_splits]
    options = _pricing_options(method, configs[0].name, options)
    if row_splits is not None:
        if not stacks_rows(method, configs[0].name) or stats is None or sum(row_splits) != weight.shape[0]:
            raise ValueError(f"price: row_splits needs statistics, a pricer of {method!r} for "
                             f"{configs[0].name!r} that stacks rows, and splits summing to the weight's rows")
        problem, found, opts = _prepare(weight, configs[0], method, stats, None, None, options, dtype, "price")
        return found.pricer(problem, configs, row_splits=list(row_splits), **opts)
    found = get_projection(method, configs[0].name)
    if found is not None and found.pricer is not None and stats is not None:
        problem, found, opts = _prepare(weight, configs[0], method, stats, None, None, options, dtype, "price")
        return found.pricer(problem, configs, **opts)
    out: list[float | None] = []
    for config in configs:
        try:
            layer = project(weight, config, method, stats=stats, dtype=dtype, **options)
        except ValueError:
            out.append(None)
            continue
        if stats is not None:
            out.append(layer.fit_info["output_error"] ** 2)
        else:
            w = weight.detach().to(torch.float64)
            out.append(float((torch.linalg.norm(w - layer.to_dense().detach().to(w.dtype)) / torch.linalg.norm(w))
                             ** 2))
    return out


def prefit(jobs: list[tuple[Tensor, Any, str, InputStats | None]], max_elements: int = 1 << 26) -> int:
    """Fit ahead, in batched calls, the projections of ``jobs`` ((weight, spec, method, stats) each) whose method
    registered a ``prefit`` (e.g. SparseGPT N:M): jobs of one method, size and weight shape are fitted together
    (at most ``max_elements`` weight entries per call) and each fit waits in its statistics' cache until
    :func:`project` of that weight takes it. Worth it where a projection's loop is launch-bound (a GPU); the
    results are the same as fitting each alone. Returns the number of jobs fitted ahead."""
    groups: dict[tuple, list[Problem]] = {}
    opts_of: dict[tuple, dict[str, Any]] = {}
    for weight, spec, method, stats in jobs:
        if stats is None or method == DATA_FREE:
            continue
        found = get_projection(method, resolve_spec(spec, weight.shape[1], weight.shape[0]).name)
        if found is None or getattr(found.fn, "prefit", None) is None:
            continue
        problem, found, opts = _prepare(weight, spec, method, stats, None, None, {}, None, "prefit")
        opts.pop("guard", None)
        key = (method, str(problem.config), tuple(weight.shape), weight.dtype, str(weight.device))
        groups.setdefault(key, []).append(problem)
        opts_of[key] = opts
    done = 0
    for key, problems in groups.items():
        fn = get_projection(key[0], problems[0].config.name).fn
        per_call = max(1, max_elements // problems[0].w.numel())
        for c0 in range(0, len(problems), per_call):
            chunk = problems[c0:c0 + per_call]
            if len(chunk) > 1:
                fn.prefit(chunk, **opts_of[key])
                done += len(chunk)
    return done


def price_many(weights: list[Tensor], configs: list[StructureConfig], method: str, stats: list[InputStats],
               dtype: torch.dtype | None = None, options: dict[str, Any] | None = None,
               row_splits: list[int] | None = None) -> list:
    """:func:`price` for several weights of one shape, each with its own statistics (e.g. the same layer of every
    block): one result per weight. Where the method's pricer takes many problems at once (``pricer.many``), they
    are priced in ONE batched pass (a GPU runs a launch-bound loop once instead of once per block); otherwise one
    :func:`price` call each."""
    if len(weights) != len(stats) or not weights:
        raise ValueError(f"price_many: give one statistics object per weight (got {len(weights)} weights and "
                         f"{len(stats)} statistics)")
    if len({tuple(w.shape) for w in weights}) != 1:
        raise ValueError(f"price_many: the weights must share one shape, got {sorted({tuple(w.shape) for w in weights})}")
    found = get_projection(method, configs[0].name) if configs else None
    many = getattr(getattr(found, "pricer", None), "many", None)
    if configs:
        options = _pricing_options(method, configs[0].name, options)
    if many is None or len(weights) == 1 or any(s is None for s in stats) or (
            row_splits is not None and not stacks_rows(method, configs[0].name)):
        return [price(w, configs, method, s, dtype, options, row_splits) for w, s in zip(weights, stats)]
    problems = []
    for w, s in zip(weights, stats):
        problem, _, opts = _prepare(w, configs[0], method, s, None, None, dict(options or {}), dtype, "price")
        problems.append(problem)
    if row_splits is not None:
        return many(problems, configs, row_splits=list(row_splits), **opts)
    return many(problems, configs, **opts)


__all__ = ["METHODS", "default_allow", "methods_for", "project", "prefit", "price", "price_many", "stacks_rows", "batches_inputs", "output_error", "lowrank_error_curve",
           "register_projection", "check_method", "PROJECTIONS", "Problem"]
