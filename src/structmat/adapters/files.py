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
from ..structures import LowRank, build, config_from_dict
from ..validate import check_finite, check_number, loads_json
from .core import AdaptedLinear, _shape, adaptable_modules, adapt, adapter_modules

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
    """Wrap the named layers of ``model`` with the saved deltas (exact weights and scales); return the manifest.
    Everything (manifest, sizes against the model's layers, weights, index buffers) is checked before the model is
    changed; a bad file raises one ``ValueError``."""
    from safetensors.torch import load

    directory = Path(directory)
    try:
        manifest = loads_json((directory / MANIFEST).read_bytes(), f"load_adapter: {directory / MANIFEST}",
                              "save the adapter again")
    except OSError as err:
        raise ValueError(f"load_adapter: {directory / MANIFEST} cannot be read ({err}); is this a structmat adapter "
                         "directory (save_adapter)?") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or \
            not isinstance(manifest.get("modules"), dict):
        raise ValueError(f"load_adapter: {directory / MANIFEST} is not a structmat adapter manifest")
    version = manifest.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"load_adapter: {directory / MANIFEST} has an invalid version {version!r}; save the adapter "
                         "again")
    if version > VERSION:
        raise ValueError(f"load_adapter: adapter version {version!r} is newer than this structmat "
                         f"understands ({VERSION}); upgrade structmat")
    configs = _checked_configs(model, manifest["modules"])
    try:
        data = (directory / WEIGHTS).read_bytes()
    except OSError as err:
        raise ValueError(f"load_adapter: {directory / WEIGHTS} cannot be read ({err}); save the adapter again") \
            from None
    files = manifest.get("files")
    expect = files.get(WEIGHTS) if isinstance(files, dict) else None
    expect = expect if isinstance(expect, dict) else {}
    if len(data) != expect.get("bytes") or hashlib.sha256(data).hexdigest() != expect.get("sha256"):
        raise ValueError(f"load_adapter: {directory / WEIGHTS} does not match its manifest (damaged or replaced)")
    try:
        tensors = load(data)
    except Exception as err:  # safetensors raises its own error types on a malformed file
        raise ValueError(f"load_adapter: {directory / WEIGHTS} cannot be read as safetensors ({err})") from None
    states = _checked_states(model, configs, tensors)
    _adapt_exact(model, configs, freeze)
    found = adapter_modules(model)
    for name, entry in manifest["modules"].items():
        a = found[name]
        a.delta.load_state_dict(states[name], strict=True)
        a.scale, a.alpha, a.rslora, a.init = float(entry["scale"]), entry.get("alpha"), bool(entry.get("rslora")), \
            entry.get("init", "zero")
    return manifest


def _checked_configs(model: nn.Module, modules: dict[str, Any]) -> dict[str, Any]:
    """Each manifest entry: a structure config that fits the model's layer of that name (sizes checked against the
    layer, the delta built on the meta device) and a finite scale."""
    present = adaptable_modules(model)
    configs = {}
    for name, entry in modules.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("delta"), dict):
            raise ValueError(f"load_adapter: module {name!r} has no delta config; save the adapter again")
        if name not in present:
            raise ValueError(f"load_adapter: the model has no linear layer {name!r}; load the adapter into the base "
                             "model it was trained on")
        in_f, out_f = _shape(present[name])
        if (entry.get("in_features"), entry.get("out_features")) != (in_f, out_f):
            raise ValueError(f"load_adapter: {name!r} is {in_f}->{out_f} in this model but "
                             f"{entry.get('in_features')!r}->{entry.get('out_features')!r} in the adapter")
        try:
            check_number(f"load_adapter: {name!r}", "scale", entry.get("scale"), -math.inf, math.inf)
            configs[name] = config_from_dict(entry["delta"])
            build(configs[name], in_f, out_f, bias=False, device="meta")
        except (TypeError, ValueError) as err:
            raise ValueError(f"load_adapter: module {name!r}: {err}") from None
    return configs


def _checked_states(model: nn.Module, configs: dict[str, Any], tensors: dict[str, torch.Tensor]
                    ) -> dict[str, dict[str, torch.Tensor]]:
    """Each delta's tensors: the right keys and shapes, finite, and a valid state of its structure (index buffers),
    checked on a stand-alone copy of the delta so the model is not touched yet."""
    present = adaptable_modules(model)
    states, used = {}, set()
    for name, config in configs.items():
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        used.update(f"{name}.{k}" for k in state)
        in_f, out_f = _shape(present[name])
        delta = build(config, in_f, out_f, bias=False)
        try:
            for key, value in state.items():
                check_finite(f"load_adapter: {name!r}", key, value, "the adapter is corrupt; save it again")
            delta.load_state_dict(state, strict=True)
            delta.check_state_()
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"load_adapter: module {name!r}: its tensors do not fit {config.spec} "
                             f"({str(err).strip().splitlines()[0]}); save the adapter again") from None
        states[name] = state
    stray = sorted(set(tensors) - used)
    if stray:
        raise ValueError(f"load_adapter: the weights file has tensors no module of the manifest owns, e.g. {stray[:3]}")
    return states


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
        config = loads_json((directory / PEFT_CONFIG).read_bytes(), f"load_peft_lora: {directory / PEFT_CONFIG}",
                            "save the adapter again")
    except OSError as err:
        raise ValueError(f"load_peft_lora: {directory / PEFT_CONFIG} cannot be read ({err})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
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
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types on a malformed file
        raise ValueError(f"load_peft_lora: {path} cannot be read as safetensors ({err})") from None
    for key, t in tensors.items():
        if t.dim() != 2:
            raise ValueError(f"load_peft_lora: tensor {key!r} in {path} has shape {tuple(t.shape)}, not a matrix")
        check_finite("load_peft_lora", f"tensor {key!r}", t, "the adapter is corrupt; save it again")
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
    present = adaptable_modules(model)
    for name, ab in pairs.items():  # every shape against the model's layer before the model is changed
        if name not in present:
            continue  # _adapt_exact names the missing layers
        (in_f, out_f), r = _shape(present[name]), ab["A"].shape[0]
        if ab["A"].shape != (r, in_f) or ab["B"].shape != (out_f, r):
            raise ValueError(f"load_peft_lora: {name!r}: lora_A {tuple(ab['A'].shape)} / lora_B "
                             f"{tuple(ab['B'].shape)} do not fit the layer {in_f}->{out_f}")
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
