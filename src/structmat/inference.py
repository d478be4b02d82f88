"""Serving a structured model: what it holds in memory, and the explicit choice to pre-merge to dense.

By default a structured layer holds only its factors: the memory of a structured model at inference is its
parameters plus activations (the kernels' dispatch never caches a dense copy on its own).

:func:`merge_for_inference` is the opposite trade, made on purpose: each structured layer keeps a dense
``(out_features, in_features)`` copy of its weight beside its factors (a non-persistent buffer, never saved) and
runs one dense GEMM. **Memory cost: + out·in elements per merged layer** (in the factors' dtype) on top of the
factors, i.e. more than the dense model itself. It can pay off only where a dense GEMM beats the structure's own
kernels and memory does not matter. :func:`unmerge_for_inference` drops the copies. A merged copy is a snapshot:
after changing a factor, unmerge (or merge again); a forward that sees a changed factor raises instead of computing
with the old weight, and a forward where a factor needs a gradient runs the factors' own path (same math).
"""

from __future__ import annotations

import copy
import gc
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .structures.base import MERGED_WEIGHT, StructuredLinear


def _structured(model: nn.Module) -> list[StructuredLinear]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    found, inside = [], set()
    for m in model.modules():  # outermost structured layers only (a Product's factors are merged with it)
        if id(m) in inside or not isinstance(m, StructuredLinear):
            continue
        inside.update(id(c) for c in m.modules())
        found.append(m)
    return found


def merge_for_inference(model: nn.Module) -> int:
    """Give every structured layer of ``model`` a dense copy of its weight (see the module docstring for the memory
    cost). Returns the bytes added. The merge runs in >= float32 and is rounded once to the factors' dtype."""
    added = 0
    for layer in _structured(model):
        if layer.name == "dense":  # already one dense weight: a copy would only cost memory
            continue
        factors = [t for n, t in layer.named_parameters() if n != "bias"]
        if not factors or any(f.device.type == "meta" for f in factors):
            raise ValueError(f"{layer._label()}: merge_for_inference needs materialized factors (got meta tensors); "
                             "load the weights first")
        dtype = factors[0].dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        layer._buffers.pop(MERGED_WEIGHT, None)
        with torch.no_grad():  # merge a transient >= fp32 copy of the factors, round once
            merged = copy.deepcopy(layer).to(work).to_dense().to(dtype).contiguous()
        layer.register_buffer(MERGED_WEIGHT, merged, persistent=False)
        if layer._plans:  # (its eager form reads the factors: the merged copy serves the calls now)
            layer._plans.clear()
        layer._merged_versions = tuple(f._version for f in factors)
        added += merged.numel() * merged.element_size()
    return added


def unmerge_for_inference(model: nn.Module) -> int:
    """Drop the dense copies made by :func:`merge_for_inference`. Returns the bytes released."""
    freed = 0
    for layer in _structured(model):
        merged = layer._buffers.pop(MERGED_WEIGHT, None)
        if merged is not None:
            if layer._plans:
                layer._plans.clear()
            freed += merged.numel() * merged.element_size()
    return freed


def is_merged(layer: nn.Module) -> bool:
    return isinstance(layer, StructuredLinear) and layer._buffers.get(MERGED_WEIGHT) is not None


def live_storages(device_type: str | None = None) -> dict[int, tuple[int, Tensor]]:
    """``{storage pointer: (bytes, one tensor on it)}`` for every live tensor the garbage collector can see (on
    ``device_type`` if given). What a forward leaves behind in Python (a cache in a dict, a module attribute, a merged
    copy) shows here; memory held only inside C++ (an allocator's workspace) does not."""
    gc.collect()
    with warnings.catch_warnings():  # (isinstance on some deprecated module attributes warns)
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, Tensor)]
    found: dict[int, tuple[int, Tensor]] = {}
    for t in tensors:
        try:
            if t.is_meta or t.is_sparse or (device_type is not None and t.device.type != device_type):
                continue
            st = t.untyped_storage()
            if st.data_ptr() and st.nbytes():
                found[st.data_ptr()] = (st.nbytes(), t)
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
            continue
    return found


def hidden_tensors(model: nn.Module, before: dict[int, Any] | set[int] = frozenset(),
                   device_type: str | None = None) -> list[dict[str, Any]]:
    """Live tensors that are neither ``model``'s parameters and buffers nor in ``before`` (a
    :func:`live_storages` census taken before the model was built), largest first, each with its bytes, shape, dtype
    and, where one is found, its owner (a module attribute, the dispatch's dense-merge cache, the decode kernels'
    kept eager scratch or counters). A structured model
    in inference should have none of size: its memory is its parameters plus activations."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()] if not t.is_meta}
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if isinstance(value, Tensor) and not value.is_meta:
                owners.setdefault(value.untyped_storage().data_ptr(), f"{name}.{key}" if name else key)
    from .kernels import dispatch

    for _, _, merged in list(dispatch._dense_cache.values()):
        owners.setdefault(merged.untyped_storage().data_ptr(), "structmat.kernels dense-merge cache")
    if dispatch.decode is not None:  # (the decode kernels' own small state: kept per plan, stream and device)
        kernels = dispatch.decode._triton_decode
        for kept in list(dispatch.decode.KEPT_SCRATCH):
            owners.setdefault(kept.untyped_storage().data_ptr(), "structmat decode plans' eager scratch (per thread)")
        for kept in [*kernels._SYNC.values(), *kernels._COUNTERS.values()]:
            owners.setdefault(kept.untyped_storage().data_ptr(), "structmat decode kernels' counters")
    rows = [dict(bytes=nbytes, shape=list(t.shape), dtype=str(t.dtype).replace("torch.", ""),
                 owner=owners.get(ptr, "unknown (not referenced by the model)"))
            for ptr, (nbytes, t) in live_storages(device_type).items() if ptr not in own and ptr not in before]
    return sorted(rows, key=lambda r: -r["bytes"])
