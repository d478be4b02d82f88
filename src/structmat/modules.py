"""Module discovery: which modules count as linear layers, how to read their weight, where they sit.

Every ``nn.Linear`` and every HF GPT-2 style ``Conv1D`` (weight stored ``(in, out)``) is a linear layer; the walk
never descends into a StructuredLinear (its factors are internal) nor into torch's MultiheadAttention.
"""

from __future__ import annotations

from typing import Iterator

from torch import Tensor, nn

from .structures.base import StructuredLinear



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


def locations(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
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


def dense_cost(out_f: int, in_f: int, bias: bool) -> tuple[int, int]:
    """(params, FLOPs per token) of a dense layer, counted as StructuredLinear counts them."""
    return in_f * out_f + (out_f if bias else 0), 2 * in_f * out_f + (out_f if bias else 0)


_locations = locations  # the old private name, still imported by some modules

__all__ = ["linear_modules", "structured_modules", "dense_weight", "dense_cost", "locations"]
