"""Adapter files, on their own (next to a base model directory, which they do not copy).

structmat's format: ``adapter.safetensors`` (each delta's state dict under ``<module>.<key>``) and ``adapter.json``
(``{"format": "structmat-adapter", "version": 1, "modules": {name: {"delta": config dict, "in_features",
"out_features", "scale", "alpha", "rslora", "init", "base"}}, "base_model": ..., "files": {name: {bytes, sha256}}}``),
the JSON written last so a directory with one is complete. Structures are resolved through the registry only.

peft's LoRA format, for LoRA on dense layers: ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``,
``target_modules``, ``use_rslora``, ``rank_pattern`` / ``alpha_pattern`` when layers differ) and
``adapter_model.safetensors`` with peft's key names ``base_model.model.<module>.lora_A.weight`` (r x in, our V) and
``...lora_B.weight`` (out x r, our U); peft scales by lora_alpha / r (rsLoRA: / sqrt(r)), as structmat does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import write_atomic
from ..structures import LowRank, config_from_dict
from .core import AdaptedLinear, adapt, adapter_modules

FORMAT = "structmat-adapter"
VERSION = 1
MANIFEST = "adapter.json"
WEIGHTS = "adapter.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _adapters_or_raise(model: nn.Module, what: str) -> dict[str, AdaptedLinear]:
    found = adapter_modules(model)
    if not found:
        raise ValueError(f"{what}: the model has no adapters; call structmat.adapters.adapt(model, plan) first")
    return found


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write the model's adapters (deltas + scales, not the bases) to ``directory`` atomically."""
    from safetensors.torch import save

    found = _adapters_or_raise(model, "save_adapter")
    tensors, modules = {}, {}
    for name, a in found.items():
        for key, t in a.delta.state_dict().items():
            tensors[f"{name}.{key}"] = t.detach().cpu().contiguous()
        modules[name] = {"delta": a.delta.config.to_dict(), "in_features": a.in_features,
                         "out_features": a.out_features, "scale": a.scale, "alpha": a.alpha, "rslora": a.rslora,
                         "init": a.init, "base": "dense" if not hasattr(a.base, "spec") else a.base.spec}
    directory = Path(directory)
    data = save(tensors, metadata={"format": "pt"})
    write_atomic(directory / WEIGHTS, data)
    manifest = {"format": FORMAT, "version": VERSION, "base_model": base_model, "modules": modules,
                "files": {WEIGHTS: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}}
    write_atomic(directory / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return directory


def load_adapter(model: nn.Module, directory: str | os.PathLike, freeze: bool = True) -> dict[str, Any]:
    """Wrap the named layers of ``model`` with the saved deltas (exact weights and scales); return the manifest."""
    from safetensors.torch import load

    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"load_adapter: {directory / MANIFEST} cannot be read ({err}); is this a structmat adapter "
                         "directory (save_adapter)?") from None
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("modules"), dict):
        raise ValueError(f"load_adapter: {directory / MANIFEST} is not a structmat adapter manifest")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        raise ValueError(f"load_adapter: adapter version {manifest.get('version')!r} is newer than this structmat "
                         f"understands ({VERSION}); upgrade structmat")
    data = (directory / WEIGHTS).read_bytes()
    expect = manifest.get("files", {}).get(WEIGHTS, {})
    if len(data) != expect.get("bytes") or hashlib.sha256(data).hexdigest() != expect.get("sha256"):
        raise ValueError(f"load_adapter: {directory / WEIGHTS} does not match its manifest (damaged or replaced)")
    tensors = load(data)
    configs = {name: config_from_dict(entry["delta"]) for name, entry in manifest["modules"].items()}
    _adapt_exact(model, configs, freeze)
    found = adapter_modules(model)
    for name, entry in manifest["modules"].items():
        a = found[name]
        if (a.in_features, a.out_features) != (entry["in_features"], entry["out_features"]):
            raise ValueError(f"load_adapter: {name!r} is {a.in_features}->{a.out_features} in this model but "
                             f"{entry['in_features']}->{entry['out_features']} in the adapter")
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        a.delta.load_state_dict(state, strict=True)
        a.scale, a.alpha, a.rslora, a.init = float(entry["scale"]), entry.get("alpha"), bool(entry.get("rslora")), \
            entry.get("init", "zero")
    return manifest


def _adapt_exact(model: nn.Module, configs: dict[str, Any], freeze: bool) -> None:
    from ..surgery import Plan

    plan = Plan.exact(configs)
    names = {n for n in configs}
    from .core import adaptable_modules

    present = set(adaptable_modules(model))
    missing = sorted(names - present)
    if missing:
        raise ValueError(f"the model has no linear layer(s) {missing[:3]}; load the adapter into the base model it "
                         "was trained on")
    adapt(model, plan, init="zero", freeze=freeze)


# ----------------------------------------------------------------------------------------------
# peft LoRA
# ----------------------------------------------------------------------------------------------


def save_peft_lora(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None,
                   task_type: str | None = None) -> Path:
    """Write LoRA adapters on dense layers in peft's format (loadable with ``peft.PeftModel.from_pretrained``)."""
    from safetensors.torch import save

    found = _adapters_or_raise(model, "save_peft_lora")
    tensors, ranks, alphas = {}, {}, {}
    rslora = {a.rslora for a in found.values()}
    if len(rslora) > 1:
        raise ValueError("save_peft_lora: peft has one use_rslora flag per adapter; these layers mix both")
    use_rslora = rslora.pop()
    for name, a in found.items():
        if not isinstance(a.delta, LowRank) or not isinstance(a.base, nn.Linear):
            raise ValueError(f"save_peft_lora: {name!r} is {type(a.base).__name__} + {a.delta.spec}; peft's LoRA "
                             "format holds low-rank deltas on dense nn.Linear layers only (use save_adapter)")
        r = a.delta.rank
        ranks[name] = r
        alphas[name] = a.scale * (math.sqrt(r) if use_rslora else r)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.delta.V.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = a.delta.U.detach().cpu().contiguous()
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a0 = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": r0, "lora_alpha": a0, "use_rslora": use_rslora, "target_modules": sorted(found),
        "rank_pattern": {f"^{re.escape(n)}$": r for n, r in ranks.items() if r != r0},
        "alpha_pattern": {f"^{re.escape(n)}$": a for n, a in alphas.items() if a != a0},
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": None, "inference_mode": True, "use_dora": False,
    }
    directory = Path(directory)
    write_atomic(directory / PEFT_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    write_atomic(directory / PEFT_CONFIG, (json.dumps(config, indent=1) + "\n").encode())
    return directory


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: the first key whose regex matches the end of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name) or re.fullmatch(key, name):
            return value
    return default


def load_peft_lora(model: nn.Module, directory: str | os.PathLike, freeze: bool = True) -> dict[str, Any]:
    """Read a peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) into structmat adapters
    on ``model`` (the same base model peft wrapped); return peft's config."""
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        config = json.loads((directory / PEFT_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"load_peft_lora: {directory / PEFT_CONFIG} cannot be read ({err})") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"load_peft_lora: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out") if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']}")
    if config.get("modules_to_save"):
        unsupported.append("modules_to_save")
    if unsupported:
        raise ValueError(f"load_peft_lora: this adapter uses {unsupported}, which structmat does not read")
    path = directory / PEFT_WEIGHTS
    if not path.is_file():
        raise ValueError(f"load_peft_lora: {path} is missing (only safetensors adapters are read, never pickles)")
    tensors = load_file(str(path))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ValueError(f"load_peft_lora: unexpected tensor {key!r} in {path}")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    configs = {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"load_peft_lora: {name!r} lacks lora_A or lora_B")
        configs[name] = f"lowrank:rank={ab['A'].shape[0]}"
    _adapt_exact(model, configs, freeze)
    found = adapter_modules(model)
    use_rslora = bool(config.get("use_rslora"))
    for name, ab in pairs.items():
        a = found[name]
        r = ab["A"].shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", r)))
        if ab["A"].shape != a.delta.V.shape or ab["B"].shape != a.delta.U.shape:
            raise ValueError(f"load_peft_lora: {name!r}: lora_A {tuple(ab['A'].shape)} / lora_B "
                             f"{tuple(ab['B'].shape)} do not fit the layer {a.in_features}->{a.out_features}")
        with torch.no_grad():
            a.delta.V.copy_(ab["A"])
            a.delta.U.copy_(ab["B"])
        a.alpha, a.rslora, a.init = alpha, use_rslora, "peft"
        a.scale = alpha / (math.sqrt(r) if use_rslora else r)
    return config


__all__ = ["save_adapter", "load_adapter", "save_peft_lora", "load_peft_lora"]
