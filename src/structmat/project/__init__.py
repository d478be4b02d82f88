"""Data-aware projection of a dense weight onto a structure, on the calibration objective.

The objective of every data-aware method is the output error on the calibration inputs X (rows = tokens),
``||(W - W_hat) X^T||_F^2 = tr(E H E^T)`` with E = W - W_hat and H = the Gram matrix sum_t x_t x_t^T collected by
:mod:`structmat.calibrate`. :func:`project` is the single entry point; :data:`METHODS` says which method applies
to which structure (each algorithm is documented at the top of its module):

==============  =====================================  ==============================================
method          structures                             algorithm
==============  =====================================  ==============================================
``data-free``   every structure                        the structure's own ``from_dense``
``whitened``    lowrank, monarch, splr                 SVD-LLM whitened SVD (``lowrank.py``); whitened
                                                       Monarch by exact block-coordinate descent
                                                       (``monarch.py``); alternating whitened SVD /
                                                       SparseGPT for sparse + low-rank (``splr.py``)
``asvd``        lowrank                                ASVD channel scaling by mean|x|^alpha
``fisher``      lowrank                                FWSVD, rows weighted by Fisher row sums
``magnitude``   nm, sparse                             = data-free (largest magnitudes)
``wanda``       nm, sparse                             |W_ij| * ||X_j||_2 per group / output row
``sparsegpt``   nm, sparse                             SparseGPT with its OBS weight update (blocked)
==============  =====================================  ==============================================

Guard: heuristics (asvd, fisher, wanda, sparsegpt) are not guaranteed to beat the data-free projection on the
calibration objective, and the exact methods optimize a slightly damped objective. With ``guard=True`` (the
default) :func:`project` also evaluates the data-free projection and returns it when its (undamped) calibration
error is strictly lower; ``layer.fit_info`` records both errors and which one was used. Whitened Monarch and
whitened sparse+low-rank start from the data-free projection and only ever improve on it.

Everything is computed in float64 on the weight's device; the layer is returned in the weight's dtype/device with
the bias copied.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ..calibrate import InputStats
from ..structures import from_dense as _data_free
from ..structures import REGISTRY, RatioSpec, StructuredLinear, StructureConfig, resolve_spec, structure_class
from ..structures.base import check_dense_weight
from .lowrank import apply_basis, error_curve, lowrank_basis
from .monarch import whitened_monarch
from .sparse import sparsegpt, wanda_nm, wanda_unstructured
from .splr import whitened_splr

METHODS: dict[str, tuple[str, ...]] = {
    "data-free": tuple(sorted(REGISTRY)),
    "whitened": ("lowrank", "monarch", "splr"),
    "asvd": ("lowrank",),
    "fisher": ("lowrank",),
    "magnitude": ("nm", "sparse"),
    "wanda": ("nm", "sparse"),
    "sparsegpt": ("nm", "sparse"),
}

# Options each (method, structure) accepts, with defaults.
_OPTIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("whitened", "lowrank"): {"damp": 1e-6, "guard": True},
    ("asvd", "lowrank"): {"alpha": 0.5, "guard": True},
    ("fisher", "lowrank"): {"guard": True},
    ("wanda", "nm"): {"guard": True},
    ("wanda", "sparse"): {"guard": True},
    ("sparsegpt", "nm"): {"damp": 0.01, "blocksize": 128, "guard": True},
    ("sparsegpt", "sparse"): {"damp": 0.01, "blocksize": 128, "guard": True},
    ("whitened", "monarch"): {"damp": 1e-6, "sweeps": 10, "tol": 1e-4, "guard": True},
    ("whitened", "splr"): {"damp": 1e-6, "sparse_damp": 0.01, "blocksize": 128, "rounds": 4, "tol": 1e-4},
}
_NEEDS_STATS = {"whitened", "asvd", "wanda", "sparsegpt"}


def _sparse_layer(cls: type[StructuredLinear], args: dict[str, Any], what: Tensor, keep: Tensor, weight: Tensor,
                  bias: Tensor | None) -> StructuredLinear:
    """Build an NMSparse / FixedSparse layer with exactly the support ``keep`` (padded columns for N:M)."""
    out_features, in_features = weight.shape
    layer = cls(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype, **args)
    if cls.name == "nm":
        index = keep.nonzero()[:, 1].reshape(out_features, -1)
    else:
        index = keep.reshape(-1).nonzero().squeeze(1)
    if index.shape != layer.index.shape:  # cannot happen for valid masks; the structure's own selection is exact
        return cls.from_dense(what[:, :in_features].to(weight.dtype), bias, **args)
    with torch.no_grad():
        layer.index.copy_(index)
        layer.values.copy_(what.reshape(-1)[index] if cls.name == "sparse" else what.gather(1, index))
    return layer


def methods_for(structure: str) -> list[str]:
    """The projection methods that apply to a structure name."""
    return [m for m, names in METHODS.items() if structure in names]


def _check_stats(stats: Any, in_features: int, owner: str) -> InputStats:
    if not isinstance(stats, InputStats):
        raise TypeError(f"{owner}: stats must be an InputStats (from structmat.calibrate), got {type(stats).__name__}")
    if stats.in_features != in_features:
        raise ValueError(f"{owner}: the statistics are for in_features={stats.in_features} but the weight has "
                         f"in_features={in_features}; pass the stats of this layer's input (weights are (out, in): "
                         "transpose an HF Conv1D weight first)")
    if stats.count <= 0:
        raise ValueError(f"{owner}: the statistics saw no tokens; run calibration batches through the model first")
    stats.check_finite(owner)
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


def _as_dense(approx: Tensor | StructuredLinear) -> Tensor:
    if isinstance(approx, StructuredLinear):
        return approx.to_dense().detach()
    if isinstance(approx, Tensor):
        return approx.detach()
    raise TypeError(f"output_error: approx must be a tensor or a StructuredLinear, got {type(approx).__name__}")


def output_error(weight: Tensor, approx: Tensor | StructuredLinear, stats: InputStats) -> float:
    """Relative calibration output error sqrt(tr(E H E^T) / tr(W H W^T)), E = W - approx, H = stats.gram."""
    w = weight.detach().to(torch.float64)
    a = _as_dense(approx).to(device=w.device, dtype=torch.float64)
    if a.shape != w.shape:
        raise ValueError(f"output_error: approx has shape {tuple(a.shape)}, the weight {tuple(w.shape)}")
    stats = _check_stats(stats, w.shape[1], "output_error")
    h = stats.gram.to(w.device)
    e = w - a
    num = ((e @ h) * e).sum().clamp_min(0.0)
    den = ((w @ h) * w).sum().clamp_min(0.0)
    if float(den) == 0.0:
        return 0.0 if float(num) == 0.0 else float("inf")
    return float((num / den).sqrt())


def lowrank_error_curve(weight: Tensor, stats: InputStats | None = None, method: str = "whitened", *,
                        fisher: Tensor | None = None, guard: bool = True, damp: float = 1e-6,
                        alpha: float = 0.5) -> Tensor:
    """Relative output error of the rank-r projection for every r = 0..min(out, in), from one decomposition.

    ``method`` is one of data-free, whitened, asvd, fisher (as in :func:`project`; same defaults). With
    ``guard=True`` it is the elementwise minimum with the data-free curve, matching what the guarded
    :func:`project` returns at each rank (costs a second SVD). With ``stats=None`` it is the data-free relative
    Frobenius error ||W - W_r||_F / ||W||_F (methods data-free and whitened only). Float64, on the weight's device.
    Entry r is the error at rank r, whether or not that rank is smaller than dense.
    """
    w = check_dense_weight(weight, "lowrank_error_curve").to(torch.float64)
    if method not in ("data-free", "whitened", "asvd", "fisher"):
        raise ValueError(f"lowrank_error_curve: unknown method {method!r}; valid: data-free, whitened, asvd, fisher")
    if stats is None:
        if method not in ("data-free", "whitened"):
            raise ValueError(f"lowrank_error_curve: method {method!r} needs stats=")
        s = torch.linalg.svdvals(w).square()
        total = s.sum()
        tail = total - torch.cat([s.new_zeros(1), s.cumsum(0)])
        return (tail.clamp_min(0.0) / total.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()
    stats = _check_stats(stats, w.shape[1], "lowrank_error_curve")
    if method == "fisher":
        fisher = _check_fisher(fisher, w, "lowrank_error_curve")
    h = stats.gram.to(w.device)
    side, basis, _ = lowrank_basis(w, method, stats, fisher, damp=damp, alpha=alpha)
    curve = error_curve(w, side, basis, h)
    if guard and method != "data-free":
        side0, basis0, _ = lowrank_basis(w, "data-free", None, None)
        curve = torch.minimum(curve, error_curve(w, side0, basis0, h))
    return curve


def _options(method: str, structure: str, given: dict[str, Any]) -> dict[str, Any]:
    allowed = _OPTIONS.get((method, structure), {})
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"project: method {method!r} on {structure!r} takes no option(s) {unknown}; "
                         f"valid options: {sorted(allowed) or 'none'}")
    return {**allowed, **given}


def project(weight: Tensor, spec: str | StructureConfig | RatioSpec, method: str = "data-free",
            stats: InputStats | None = None, fisher: Tensor | None = None, bias: Tensor | None = None,
            **options: Any) -> StructuredLinear:
    """Project a dense ``(out, in)`` weight onto ``spec`` with ``method`` (see :data:`METHODS`).

    ``stats`` (the layer's :class:`InputStats`) is required by whitened, asvd, wanda and sparsegpt; ``fisher``
    (squared gradients shaped like the weight) by fisher. Options (``damp``, ``alpha``, ``blocksize``, ``sweeps``,
    ``rounds``, ``tol``, ``guard``, ...) depend on the method; unknown ones raise. The returned layer carries
    ``fit_info`` with the method used and, when stats are given, its relative calibration ``output_error``.
    """
    weight = check_dense_weight(weight, "project", bias)
    out_features, in_features = weight.shape
    config = resolve_spec(spec, in_features, out_features)
    structure = config.name
    if method not in METHODS:
        raise ValueError(f"project: unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if structure not in METHODS[method]:
        raise ValueError(f"project: method {method!r} does not apply to structure {structure!r}; valid methods for "
                         f"{structure}: {', '.join(methods_for(structure))}")
    opts = _options(method, structure, options)
    if method in _NEEDS_STATS and stats is None:
        raise ValueError(f"project: method {method!r} needs calibration statistics; pass stats= from "
                         "structmat.calibrate.collect_input_stats (or use method='data-free')")
    if stats is not None:
        stats = _check_stats(stats, in_features, "project")
    if method == "fisher":
        fisher = _check_fisher(fisher, weight, "project")
    args = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    cls = structure_class(structure)

    guard = opts.pop("guard", False)
    need_baseline = method in ("data-free", "magnitude") or structure != "lowrank" or (guard and stats is not None)
    baseline = _data_free(weight, config, bias) if need_baseline else None
    if method in ("data-free", "magnitude"):
        info: dict[str, Any] = {"method": method}
        if stats is not None:
            info["output_error"] = output_error(weight, baseline, stats)
        baseline.fit_info = {**getattr(baseline, "fit_info", {}), **info}
        return baseline

    w = weight.to(torch.float64)
    h = stats.gram.to(w.device) if stats is not None else None
    extra: dict[str, Any] = {}
    if structure == "lowrank":
        side, basis, _ = lowrank_basis(w, method, stats, fisher, damp=opts.get("damp", 1e-6),
                                       alpha=opts.get("alpha", 0.5))
        u, v = apply_basis(w, side, basis, config.rank)
        layer = cls(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype,
                    **args)
        with torch.no_grad():
            layer.U.copy_(u)
            layer.V.copy_(v)
    elif structure in ("nm", "sparse"):
        if structure == "nm":
            pad = baseline.in_padded - in_features
            if method == "wanda":
                what, keep = wanda_nm(w, h, config.n, config.m, baseline.in_padded)
            else:
                wp = torch.nn.functional.pad(w, (0, pad))
                hp = torch.nn.functional.pad(h, (0, pad, 0, pad))
                what, keep = sparsegpt(wp, hp, nm=(config.n, config.m), blocksize=opts["blocksize"],
                                       damp=opts["damp"])
        else:
            nnz = baseline.values.numel()
            if method == "wanda":
                what, keep = wanda_unstructured(w, h, nnz)
            else:
                what, keep = sparsegpt(w, h, nnz=nnz, blocksize=opts["blocksize"], damp=opts["damp"])
        layer = _sparse_layer(cls, args, what, keep, weight, bias)
    elif structure == "monarch":
        what, extra = whitened_monarch(w, h, baseline.to_dense().detach().to(torch.float64), nblocks=baseline.nblocks,
                                       c=baseline.c, out_padded=baseline.out_padded, in_padded=baseline.in_padded,
                                       damp=opts["damp"], sweeps=opts["sweeps"], tol=opts["tol"])
        layer = cls.from_dense(what, None if bias is None else bias.to(torch.float64), **args).to(dtype=weight.dtype)
    elif structure == "splr":
        s0 = baseline.sparse.to_dense().detach().to(torch.float64)
        low0 = (baseline.lowrank.U.detach().to(torch.float64), baseline.lowrank.V.detach().to(torch.float64))
        nnz = baseline.sparse.values.numel()
        sparse_part, (u, v), extra = whitened_splr(w, h, s0, low0, rank=config.rank, nnz=nnz, **opts)
        layer = cls(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype,
                    **args)
        index = sparse_part.reshape(-1).abs().topk(nnz).indices.sort().values
        with torch.no_grad():
            layer.lowrank.U.copy_(u)
            layer.lowrank.V.copy_(v)
            layer.sparse.index.copy_(index)
            layer.sparse.values.copy_(sparse_part.reshape(-1)[index])
    else:  # pragma: no cover - METHODS and this dispatch are kept in step
        raise ValueError(f"project: no implementation of {method!r} for {structure!r}")

    if bias is not None:
        with torch.no_grad():
            layer.bias.copy_(bias)
    info = {"method": method, **extra}
    if stats is not None:
        err = output_error(weight, layer, stats)
        info.update(output_error=err, used=method)
        err0 = output_error(weight, baseline, stats) if baseline is not None else None
        if err0 is not None:
            info["data_free_output_error"] = err0
        if guard and err0 is not None and err0 < err:
            info.update(output_error=err0, used="data-free")
            layer = baseline
    layer.fit_info = {**getattr(layer, "fit_info", {}), **info}
    return layer


__all__ = ["METHODS", "methods_for", "project", "output_error", "lowrank_error_curve"]
