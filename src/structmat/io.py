"""Save and load HF models whose linear layers were structured: safetensors weights + a versioned JSON plan.

A saved directory holds

* ``config.json`` (and ``generation_config.json`` for generative models): the base transformers config;
* ``model.safetensors``: every tensor of the state dict once (tied/shared tensors are stored under one name and
  listed in ``structmat.json["shared"]``), with ``{"format": "pt"}`` metadata;
* ``structmat.json``: ``{"format": "structmat", "version": 1, "model_class": "LlamaForCausalLM",
  "modules": {qualified_name: config.to_dict() + {"bias", "in_features", "out_features"}}, "shared": {...},
  "files": {"model.safetensors": {"bytes": ..., "sha256": ...}}}``.

Re-saves are crash-safe: everything is written into a temporary sibling directory (``structmat.json`` last), the
other files of an existing directory are hard-linked over, and the two directories are swapped by two renames (old
aside, new in); the old one is removed after. A crash at any point leaves either the old or the new save loadable:
a loader (or the next save) that finds the directory missing and a sibling set aside moves the complete one back. Loading resolves the model class only among transformers'
``PreTrainedModel`` classes and the structures only through the structure registry (allow-lists), builds the model
with its parameters on the meta device, and reads the weights with safetensors (never pickle).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from .atomic import fsync_dir, write_atomic
from .structures.base import StructuredLinear, config_from_dict, structure_class
from .modules import _conv1d_class, dense_weight, locations as _locations, structured_modules
from .validate import MAX_FEATURES, check_device, check_finite, check_model_config, loads_json

FORMAT = "structmat"
VERSION = 1
MANIFEST = "structmat.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
OWNED = (CONFIG, "generation_config.json", WEIGHTS, MANIFEST)  # what a save writes; other files are carried over
_NEW, _OLD = ".structmat-new-", ".structmat-old-"  # sibling directories of a save in progress / set aside
_LEGACY_STAGING = ".structmat-staging-"  # staging folders inside the directory (older versions)


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _file_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------


def _module_entry(layer: StructuredLinear) -> dict[str, Any]:
    entry = layer.config.to_dict()
    entry.update({"bias": layer.bias is not None, "in_features": layer.in_features,
                  "out_features": layer.out_features})
    return entry


def _dedupe(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Store every tensor once: identical views of one storage (tied weights) become aliases of the first name;
    other tensors sharing a storage are copied (safetensors refuses shared storage)."""
    tensors: dict[str, Tensor] = {}
    shared: dict[str, str] = {}
    first: dict[tuple, str] = {}
    storages: dict[tuple, int] = {}
    for name, t in state.items():
        t = t.detach()
        if t.numel() and t.device.type != "meta":
            skey = (t.device.type, t.device.index, t.untyped_storage().data_ptr())
            vkey = (*skey, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if vkey in first:
                shared[name] = first[vkey]
                continue
            first[vkey] = name
            storages[skey] = storages.get(skey, 0) + 1
        tensors[name] = t
    for name, t in tensors.items():
        skey = (t.device.type, t.device.index, t.untyped_storage().data_ptr()) if t.numel() else None
        full = t.untyped_storage().nbytes() == t.numel() * t.element_size() if t.numel() else True
        if (skey is not None and storages.get(skey, 0) > 1) or not full or not t.is_contiguous():
            tensors[name] = t.contiguous().clone()
    return tensors, shared


def _model_class_name(model: nn.Module) -> str:
    import transformers

    if not isinstance(model, transformers.PreTrainedModel):
        raise ValueError(f"save_pretrained needs a transformers PreTrainedModel (with a .config), got "
                         f"{type(model).__name__}")
    name = type(model).__name__
    if getattr(transformers, name, None) is not type(model):
        raise ValueError(f"{name} is not a class exported by transformers, so load_pretrained could not rebuild it; "
                         "save a model whose class is transformers.<ModelClass>")
    return name


def _siblings(directory: Path, kind: str) -> list[Path]:
    return sorted(p for p in directory.parent.glob(f".{directory.name}{kind}*") if p.is_dir())


def _recover(directory: Path) -> None:
    """Finish a swap that a crash interrupted between its two renames (the directory is missing and a sibling was
    set aside): move the new save in if it was complete, the old one back otherwise."""
    if directory.exists() or directory.is_symlink():
        return
    aside = _siblings(directory, _OLD)
    if not aside:
        return
    complete = [p for p in _siblings(directory, _NEW) if (p / MANIFEST).is_file()]
    os.rename(complete[-1] if complete else aside[-1], directory)
    fsync_dir(directory.parent)


def _clean_leftovers(directory: Path) -> None:
    """Remove what crashed saves left behind (one writer per directory is assumed)."""
    for leftover in _siblings(directory, _NEW) + _siblings(directory, _OLD):
        shutil.rmtree(leftover, ignore_errors=True)
    if directory.is_dir():
        for old in directory.glob(_LEGACY_STAGING + "*"):
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no data copied; the old directory's entry is removed after the swap
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path) -> None:
    """Files of an existing directory that a save does not own (a tokenizer, a README) stay in the new one."""
    for entry in old.iterdir():
        if entry.name in OWNED or entry.name.startswith(_LEGACY_STAGING) or entry.name.startswith(f".{MANIFEST}."):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def _swap_in(new: Path, directory: Path) -> None:
    """Make ``new`` the directory: old aside, new in, old removed. Each rename is atomic; between the two, a crash
    leaves the directory missing, which :func:`_recover` repairs."""
    if directory.exists():
        aside = directory.parent / f".{directory.name}{_OLD}{new.name.rsplit('-', 1)[-1]}"
        os.rename(directory, aside)
        os.rename(new, directory)
        fsync_dir(directory.parent)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(new, directory)
        fsync_dir(directory.parent)


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``structmat.json`` into ``directory``; a crash at any moment
    leaves the previous save (or the new one) loadable. Other files in the directory are kept."""
    from safetensors.torch import save_file

    class_name = _model_class_name(model)
    directory = Path(os.path.abspath(directory))  # "." and "x/.." have no name to build siblings from
    if directory.is_symlink():  # swap the folder the link points to, keep the link
        directory = directory.resolve()
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"cannot save to {directory}: it exists and is not a directory; choose another path")
    state = model.state_dict()
    meta = sorted(k for k, v in state.items() if v.device.type == "meta")
    if meta:
        raise ValueError(f"cannot save: {len(meta)} tensors are on the meta device (e.g. {meta[0]}); load or "
                         "materialize the weights first")
    modules = {name: _module_entry(layer) for name, layer in structured_modules(model).items()}
    tensors, shared = _dedupe(state)

    new = None
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        _recover(directory)
        _clean_leftovers(directory)
        new = Path(tempfile.mkdtemp(prefix=f".{directory.name}{_NEW}", dir=directory.parent))
        if directory.is_dir():
            _carry_over(directory, new)
        config = copy.deepcopy(model.config)
        config.architectures = [class_name]
        config.save_pretrained(new)
        files = [CONFIG]
        generation = getattr(model, "generation_config", None)
        can_generate = getattr(model, "can_generate", None)
        if generation is not None and callable(can_generate) and can_generate():
            generation.save_pretrained(new)
            files.append("generation_config.json")
        save_file(tensors, str(new / WEIGHTS), metadata={"format": "pt"})
        files.append(WEIGHTS)
        for name in files:
            _fsync_file(new / name)
        size, digest = _file_digest(new / WEIGHTS)
        import transformers

        from . import __version__

        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "model_class": class_name,
            "modules": modules,
            "shared": shared,
            "files": {WEIGHTS: {"bytes": size, "sha256": digest}},
            "structmat_version": __version__,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
        }
        write_atomic(new / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())  # last
        _swap_in(new, directory)
        new = None
    except OSError as err:
        message = (f"cannot save to {directory}: {err.strerror or err} (the previous save, if any, is kept); free disk "
                   "space or check permissions, then save again")
        raise (OSError(err.errno, message) if err.errno else OSError(message)) from err
    finally:
        if new is not None:
            shutil.rmtree(new, ignore_errors=True)
    return directory


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------

# Build hooks: a config attribute -> fn(model, config) that rebuilds, on the freshly constructed model, the
# architecture the attribute records (registered by the module that writes it: structmat.mixers.hf registers
# "structmat_mixer"). load_pretrained runs them before it swaps in the structured layers and loads the weights.
_BUILD_HOOKS: dict[str, Callable[[nn.Module, Any], Any]] = {}


def register_build_hook(config_key: str, fn: Callable[[nn.Module, Any], Any]) -> None:
    """Have :func:`load_pretrained` call ``fn(model, config)`` when the saved config has ``config_key``."""
    if not isinstance(config_key, str) or not callable(fn):
        raise TypeError("register_build_hook(config_key: str, fn: callable)")
    _BUILD_HOOKS[config_key] = fn



@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters are created on the meta device (no memory, no init cost) while buffers are built for real, so the
    non-persistent ones (rotary ``inv_freq``, ``position_ids``, ...) get exactly the values the model's own
    constructor computes."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _fail(directory: Path, what: str, fix: str) -> ValueError:
    return ValueError(f"cannot load {directory}: {what}; {fix}")


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise _fail(directory, f"{MANIFEST} is missing (not a structmat save, or the save did not finish)",
                    "save the model again with structmat.io.save_pretrained")
    try:
        manifest = loads_json(path.read_bytes(), MANIFEST, "save the model again")
    except ValueError as err:
        raise ValueError(f"cannot load {directory}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise _fail(directory, f"{MANIFEST} has format {fmt!r}, expected {FORMAT!r}",
                    "point load_pretrained at a directory written by structmat.io.save_pretrained")
    version = manifest.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _fail(directory, f"{MANIFEST} has an invalid version {version!r}", "save the model again")
    if version > VERSION:
        raise _fail(directory, f"{MANIFEST} has version {version}, newer than this structmat reads (version "
                    f"{VERSION})", "upgrade structmat (pip install -U structmat)")
    missing = [k for k in ("model_class", "modules") if k not in manifest]
    if missing:
        raise _fail(directory, f"{MANIFEST} lacks the key(s) {', '.join(missing)}", "save the model again")
    if not isinstance(manifest["model_class"], str) or not manifest["model_class"].isidentifier():
        raise _fail(directory, f"{MANIFEST} has an invalid model_class {manifest['model_class']!r}",
                    "save the model again")
    if not isinstance(manifest["modules"], dict):
        raise _fail(directory, f"{MANIFEST}: 'modules' must be an object", "save the model again")
    shared = manifest.get("shared", {})
    if not isinstance(shared, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in shared.items()):
        raise _fail(directory, f"{MANIFEST}: 'shared' must map tensor names to tensor names", "save the model again")
    return manifest


def _resolve_class(directory: Path, name: str) -> type:
    import transformers

    try:
        cls = getattr(transformers, name, None)
    except Exception:  # transformers' lazy module may fail to import an optional backend
        cls = None
    config_class = getattr(cls, "config_class", None) if isinstance(cls, type) else None
    concrete = isinstance(config_class, type) and issubclass(config_class, transformers.PretrainedConfig) and \
        config_class is not transformers.PretrainedConfig
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel) or not concrete:
        raise _fail(directory, f"model_class {name!r} is not a concrete transformers model class (one with its own "
                    "config class, e.g. LlamaForCausalLM)",
                    f"use a transformers version that provides transformers.{name}, or fix model_class in "
                    f"{MANIFEST}")
    return cls


def _read_config(directory: Path, cls: type, name: str) -> Any:
    if not (directory / CONFIG).is_file():
        raise _fail(directory, f"{CONFIG} is missing", "save the model again (save_pretrained writes it)")
    try:
        config = cls.config_class.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:
        raise _fail(directory, f"{CONFIG} cannot be read as a {cls.config_class.__name__} ({err})",
                    "the file is corrupt: save the model again") from None
    try:
        check_model_config(config, f"cannot load {directory}: {CONFIG}")
    except ValueError as err:
        raise ValueError(str(err)) from None
    architectures = getattr(config, "architectures", None)
    if architectures and name not in architectures:
        raise _fail(directory, f"model_class {name!r} is not among the config's architectures {architectures}",
                    f"make {MANIFEST} and {CONFIG} agree")
    return config


def _declared_size(directory: Path, name: str, key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_FEATURES:
        raise _fail(directory, f"{MANIFEST}: module {name!r} has {key}={value!r}, not a layer size (an int in "
                    f"[1, {MAX_FEATURES}])", "the manifest is corrupt or crafted: save the model again")
    return value


def _real_shape(module: nn.Module, conv1d: Any) -> tuple[int, int] | None:
    """(in, out) of the module the manifest replaces, as the model built from the config has it."""
    if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
        shape_out, shape_in = dense_weight(module).shape
        return shape_in, shape_out
    sizes = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in sizes):
        return sizes  # type: ignore[return-value]
    return None


def _swap_in_structured(directory: Path, model: nn.Module, modules: dict[str, Any]) -> None:
    """Replace the listed modules by structured layers on the meta device. Every size is checked against the real
    module of the model built from the config before anything is built."""
    conv1d = _conv1d_class()
    where = _locations(model)
    for name, entry in modules.items():
        if not isinstance(entry, dict):
            raise _fail(directory, f"{MANIFEST}: module {name!r} has no structure config", "save the model again")
        entry = dict(entry)
        bias = entry.pop("bias", None)
        in_f = _declared_size(directory, name, "in_features", entry.pop("in_features", None))
        out_f = _declared_size(directory, name, "out_features", entry.pop("out_features", None))
        if not isinstance(bias, bool):
            raise _fail(directory, f"{MANIFEST}: module {name!r} lacks 'bias': true/false", "save the model again")
        try:
            old = model.get_submodule(name) if name else None
        except AttributeError:
            old = None
        if old is None:
            raise _fail(directory, f"{MANIFEST} lists module {name!r}, which {type(model).__name__} does not have",
                        f"check that {CONFIG} is the config the model was saved with")
        real = _real_shape(old, conv1d)
        if real is None:
            raise _fail(directory, f"module {name!r} is a {type(old).__name__}, which has no linear shape to check "
                        f"{MANIFEST}'s sizes against", "structure only linear layers, then save the model again")
        in_f = real[0] if in_f is None else in_f
        out_f = real[1] if out_f is None else out_f
        if (in_f, out_f) != real:
            raise _fail(directory, f"module {name!r} is {real[0]}->{real[1]} in the model but {in_f}->{out_f} in "
                        f"{MANIFEST}", f"check that {CONFIG} matches the saved model")
        try:
            config = config_from_dict(entry)
            layer = structure_class(config.name).from_config(config, in_f, out_f, bias=bias, device="meta")
        except (TypeError, ValueError, RecursionError) as err:
            raise _fail(directory, f"{MANIFEST}: module {name!r}: {err}", "save the model again") from None
        for parent, key in where.get(id(old), []):
            setattr(parent, key, layer)


def _load_tensors(directory: Path, manifest: dict[str, Any], device: Any, verify: bool) -> dict[str, Tensor]:
    from safetensors import safe_open

    path = directory / WEIGHTS
    if not path.is_file():
        raise _fail(directory, f"{WEIGHTS} is missing", "save the model again")
    record = manifest.get("files", {}).get(WEIGHTS) if isinstance(manifest.get("files"), dict) else None
    if isinstance(record, dict):
        size = path.stat().st_size
        if isinstance(record.get("bytes"), int) and size != record["bytes"]:
            raise _fail(directory, f"{WEIGHTS} has {size} bytes but {MANIFEST} records {record['bytes']} "
                        "(truncated or replaced)", "save the model again or restore the file")
        if verify and isinstance(record.get("sha256"), str):
            _, digest = _file_digest(path)
            if digest != record["sha256"]:
                raise _fail(directory, f"{WEIGHTS} does not match the sha256 recorded in {MANIFEST} (corrupt)",
                            "save the model again or restore the file")
    target = "cpu" if device is None else str(torch.device(device))
    tensors: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=target) as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as err:
        raise _fail(directory, f"{WEIGHTS} is truncated or corrupt ({type(err).__name__}: {err})",
                    "save the model again or restore the file") from None
    return tensors


def _check_keys(directory: Path, model: nn.Module, tensors: dict[str, Tensor]) -> None:
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        raise _fail(directory, f"{WEIGHTS} lacks {len(missing)} tensor(s) the model needs, e.g. "
                    f"{', '.join(missing[:5])}", "the file does not belong to this config/plan: save the model again")
    if unexpected:
        raise _fail(directory, f"{WEIGHTS} has {len(unexpected)} tensor(s) the model does not have, e.g. "
                    f"{', '.join(unexpected[:5])}", f"the file does not belong to this {CONFIG}/{MANIFEST}: save the "
                    "model again")
    for key, want in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(want.shape):
            raise _fail(directory, f"tensor {key!r} in {WEIGHTS} has shape {tuple(got.shape)} but the model expects "
                        f"{tuple(want.shape)}", f"the file does not match {CONFIG}/{MANIFEST}: save the model again")
        # Floating tensors may come in any floating dtype (a bf16 save); integer ones (indices) must match exactly.
        if got.is_floating_point() != want.is_floating_point() or (not got.is_floating_point() and
                                                                   got.dtype != want.dtype):
            raise _fail(directory, f"tensor {key!r} in {WEIGHTS} has dtype {got.dtype}, the model expects "
                        f"{want.dtype}", "save the model again")
        check_finite(f"cannot load {directory}", f"tensor {key!r} in {WEIGHTS}", got,
                     "the weights are corrupt: save the model again or restore the file")


def _check_loaded_state(directory: Path, model: nn.Module) -> None:
    """Each structured layer checks its own invariants (sparse indices, one dtype per layer); any other module's
    parameters must share one dtype too, or its first forward would fail."""
    for name, module in model.named_modules():
        try:
            if isinstance(module, StructuredLinear):
                module.check_state_()
                continue
            dtypes = {p.dtype for p in module._parameters.values() if p is not None and p.is_floating_point()}
            if len(dtypes) > 1:
                raise ValueError(f"its parameters mix dtypes {sorted(map(str, dtypes))}")
        except ValueError as err:
            raise _fail(directory, f"module {name!r}: {err}", "save the model again") from None


def _reshare(model: nn.Module, shared: dict[str, str]) -> None:
    """Make every alias the same Parameter/buffer object as its source, as it was when saved."""
    for alias, source in shared.items():
        src = model.get_parameter(source) if _is_param(model, source) else model.get_buffer(source)
        parent_name, _, attr = alias.rpartition(".")
        parent = model.get_submodule(parent_name)
        if attr in parent._parameters and isinstance(src, nn.Parameter):
            parent._parameters[attr] = src
        elif attr in parent._buffers:
            parent._buffers[attr] = src


def _is_param(model: nn.Module, name: str) -> bool:
    parent_name, _, attr = name.rpartition(".")
    return attr in model.get_submodule(parent_name)._parameters


def _materialize_meta_buffers(directory: Path, model: nn.Module, cls: type, config: Any) -> None:
    """Fallback for a buffer the constructor derived from a (meta) parameter: rebuild the model on the CPU once and
    copy those buffers (slow but exact). A parameter left on meta is an error."""
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise _fail(directory, f"parameters {left[:5]} were not loaded", "save the model again")
    todo = [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if not todo:
        return
    with torch.no_grad():
        reference = cls(config)
    for name in todo:
        parent_name, _, attr = name.rpartition(".")
        try:
            value = reference.get_buffer(name)
        except AttributeError:
            raise _fail(directory, f"buffer {name!r} could not be materialized", "report this model class") from None
        model.get_submodule(parent_name)._buffers[attr] = value
    del reference


def load_pretrained(directory: str | os.PathLike, device: Any = None, dtype: torch.dtype | None = None, *,
                    verify: bool = True) -> nn.Module:
    """Rebuild a model saved by :func:`save_pretrained`: same class, same structured layers, same weights (the
    outputs are bit-identical on the same device and dtype). ``dtype`` casts the floating-point weights;
    ``verify`` checks the weights file against the sha256 recorded when it was saved. Returns it in eval mode."""
    check_device(device, "load_pretrained: device")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"load_pretrained: dtype must be a floating torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    directory = Path(directory)
    _recover(directory)
    if not directory.is_dir():
        raise ValueError(f"cannot load {directory}: no such directory")
    manifest = _read_manifest(directory)
    name = manifest["model_class"]
    cls = _resolve_class(directory, name)
    config = _read_config(directory, cls, name)
    with _parameters_on_meta():
        model = cls(config)
        for key, hook in _BUILD_HOOKS.items():
            if getattr(config, key, None) is not None:
                hook(model, config)
    _swap_in_structured(directory, model, manifest["modules"])

    tensors = _load_tensors(directory, manifest, device, verify)
    shared = manifest.get("shared", {})
    for alias, source in shared.items():
        if alias in tensors:
            raise _fail(directory, f"{MANIFEST} says {alias!r} shares {source!r}, but {alias!r} is stored in "
                        f"{WEIGHTS} itself (a 'shared' entry may not replace a stored tensor)", "save the model again")
        if source not in tensors:
            raise _fail(directory, f"{MANIFEST} says {alias!r} shares {source!r}, which is not in {WEIGHTS}",
                        "save the model again")
        tensors[alias] = tensors[source]
    for name, module in model.named_modules():  # older storage formats (N:M int64 columns, one uint8 per position)
        if isinstance(module, StructuredLinear):
            try:
                module.upgrade_state(tensors, f"{name}." if name else "")
            except ValueError as err:
                raise _fail(directory, f"module {name!r}: {err}", "save the model again") from None
    _check_keys(directory, model, tensors)
    if dtype is not None:
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
        for alias, source in shared.items():
            tensors[alias] = tensors[source]
    model.load_state_dict(tensors, strict=True, assign=True)
    _check_loaded_state(directory, model)
    _reshare(model, shared)
    _tie_checked(directory, model)
    _materialize_meta_buffers(directory, model, cls, config)
    if device is not None:
        model.to(device)
    return model.eval()


def _tie_checked(directory: Path, model: nn.Module) -> None:
    """Call transformers' ``tie_weights`` (it re-ties what the config ties) and make sure it changed no values:
    a config that ties two tensors saved with different values is an error, never a silent change."""
    tie = getattr(model, "tie_weights", None)
    if not callable(tie):
        return
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    tie()
    after = model.state_dict(keep_vars=True)
    added = sorted(set(after) - set(before))
    if added:
        raise _fail(directory, f"transformers' tie_weights added tensors {added[:5]} (a tied layer was structured)",
                    "set tie_word_embeddings=false in config.json")
    for key, tensor in after.items():
        old = before.get(key)
        if old is None or tensor is old:
            continue
        if tensor.shape != old.shape or not torch.equal(tensor.detach(), old.detach()):
            raise _fail(directory, f"{CONFIG} ties {key!r} to another weight, but the saved values differ",
                        "set tie_word_embeddings=false in config.json (structmat.surgery.structurize does this when "
                        "it structures a tied layer)")


__all__ = ["save_pretrained", "load_pretrained", "register_build_hook", "FORMAT", "VERSION"]
