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

import torch
from torch import nn

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
        layer._merged_versions = tuple(f._version for f in factors)
        added += merged.numel() * merged.element_size()
    return added


def unmerge_for_inference(model: nn.Module) -> int:
    """Drop the dense copies made by :func:`merge_for_inference`. Returns the bytes released."""
    freed = 0
    for layer in _structured(model):
        merged = layer._buffers.pop(MERGED_WEIGHT, None)
        if merged is not None:
            freed += merged.numel() * merged.element_size()
    return freed


def is_merged(layer: nn.Module) -> bool:
    return isinstance(layer, StructuredLinear) and layer._buffers.get(MERGED_WEIGHT) is not None
