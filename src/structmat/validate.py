"""Shared checks for input that may be crafted or corrupt: sizes, numbers, tensors, JSON documents.

Every check runs before any expensive work and raises one ``ValueError``/``TypeError`` that names the owner (layer,
file, argument), the bad value and the fix. This module imports nothing from structmat, so every part of the house
(structures first) may use it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import Tensor

# A linear layer wider than this is not a real model (the largest vocabularies are ~10^6): sizes from a manifest,
# a config or a spec beyond it are refused before any work, so crafted sizes cannot hang or exhaust memory.
MAX_FEATURES = 1 << 24
# Depth of a JSON document (manifest, plan, checkpoint state); real ones are < 10 deep.
MAX_JSON_DEPTH = 32
# Config fields that size a model built from a config.json, and their caps.
MAX_LAYERS = 1024
MAX_POSITIONS = 1 << 22


def check_int(owner: str, key: str, value: Any, minimum: int = 1, maximum: int | None = None) -> None:
    """``value`` is an int (not a bool) in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {key} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{owner}: {key} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{owner}: {key}={value} exceeds the limit {maximum}; use a smaller {key}")


def check_features(owner: str, key: str, value: Any) -> None:
    """A layer size: an int in ``[1, MAX_FEATURES]``."""
    check_int(owner, key, value, minimum=1, maximum=MAX_FEATURES)


def check_number(owner: str, key: str, value: Any, low: float, high: float, *, open_low: bool = True,
                 open_high: bool = True) -> float:
    """A finite real number inside ``(low, high)`` (closed ends where asked); returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {key} must be a number, got {value!r} ({type(value).__name__})")
    x = float(value)
    inside = math.isfinite(x) and (x > low if open_low else x >= low) and (x < high if open_high else x <= high)
    if not inside:
        left, right = "(" if open_low else "[", ")" if open_high else "]"
        raise ValueError(f"{owner}: {key} must be a finite number in {left}{low}, {high}{right}, got {value!r}")
    return x


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` in ascending order, in O(sqrt(n)) steps."""
    check_int("divisors", "n", n)
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry of a floating tensor is finite, from ONE reduction: max |x| (the inf-norm, which
    propagates NaN) is finite exactly when every entry is. ``torch.isfinite(t).all()`` builds |t| and three masks
    as large as ``t`` first: 0.47 GB for the float32 Gram of an 8192-wide input, more than its projection."""
    if tensor.numel() == 0:
        return True
    return bool(torch.isfinite(torch.linalg.vector_norm(tensor, ord=float("inf"))))


def check_finite(owner: str, name: str, tensor: Tensor, fix: str = "clean the weights first") -> None:
    """Refuse NaN/Inf in a floating tensor (meta tensors hold no values and pass)."""
    if tensor.device.type == "meta" or not (tensor.is_floating_point() or tensor.is_complex()):
        return
    if not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{owner}: {name} has {bad} NaN/Inf entries; {fix}")


def check_device(device: Any, owner: str = "device") -> torch.device | None:
    """Parse ``device`` and make sure it exists here, so a bad device is reported as such (not as a corrupt file)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{owner}: {device!r} is not a device ({err}); use e.g. 'cpu' or 'cuda:0'") from None
    if dev.type == "meta":
        return dev
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, ValueError) as err:
        raise ValueError(f"{owner}: device {str(dev)!r} is not available on this machine "
                         f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); use 'cpu' or an "
                         "available accelerator") from None
    return dev


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a parsed JSON value, iterative (never a RecursionError); stops counting past ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def loads_json(text: str | bytes, owner: str, fix: str = "write it again", limit: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with a depth limit: a deeply nested document is a ``ValueError``, never a RecursionError."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"{owner} is nested too deeply (JSON depth limit {limit}); the file is corrupt or crafted: "
                         f"{fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{owner} is not valid JSON ({err}); the file is corrupt: {fix}") from None
    if json_depth(value, limit) > limit:
        raise ValueError(f"{owner} is nested more than {limit} levels deep; the file is corrupt or crafted: {fix}")
    return value


_CONFIG_SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "n_embd", "n_inner", "d_model", "d_ff", "ffn_dim", "embed_dim", "type_vocab_size")
_CONFIG_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_head")
_CONFIG_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


def check_model_config(config: Any, owner: str) -> None:
    """Sanity caps on the sizes in a transformers config before a model is built from it (building allocates)."""
    for keys, limit in ((_CONFIG_SIZE_KEYS, MAX_FEATURES), (_CONFIG_LAYER_KEYS, MAX_LAYERS),
                        (_CONFIG_POSITION_KEYS, MAX_POSITIONS)):
        for key in keys:
            value = getattr(config, key, None)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
                raise ValueError(f"{owner}: config {key}={value!r} is not a size this library builds (an int in "
                                 f"[0, {limit}]); the config is corrupt or crafted, fix it or save the model again")


__all__ = ["MAX_FEATURES", "MAX_JSON_DEPTH", "check_int", "check_features", "check_number", "divisors",
           "all_finite", "check_finite", "check_device", "json_depth", "loads_json", "check_model_config"]
