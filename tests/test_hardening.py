"""Fuzz and fault cases (issue 13): crafted spec strings, manifests, configs, weight files, index buffers,
checkpoints and crashes. Every case either works or raises one ValueError/TypeError/OSError whose message names the
problem, quickly and with bounded memory. One or more cases per cause; ``benchmarks/hardening_cases.py`` runs and
times the same list.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from structmat.io import load_pretrained, save_pretrained
from structmat.structures import build, from_dense
from structmat.surgery import structurize
from structmat.validate import divisors

ALLOWED = (ValueError, TypeError, OSError)


@dataclass(frozen=True)
class Case:
    cause: int
    name: str
    run: Callable[[Path], Any]
    error: type[BaseException] | None = None  # None: the case must work
    match: str = ""  # a regex the message must contain


CASES: list[Case] = []


def case(cause: int, name: str, error: type[BaseException] | None = ValueError, match: str = ""):
    def register(fn: Callable[[Path], Any]) -> Callable[[Path], Any]:
        CASES.append(Case(cause, name, fn, error, match))
        return fn
    return register


def run_case(c: Case, tmp: Path) -> None:
    """Run one case; raise AssertionError when it neither works nor fails with the one clear error it should."""
    try:
        c.run(tmp)
    except ALLOWED as err:
        if c.error is None or not isinstance(err, c.error):
            raise AssertionError(f"{c.name}: unexpected {type(err).__name__}: {err}") from err
        import re

        if not re.search(c.match, str(err)):
            raise AssertionError(f"{c.name}: message {str(err)!r} does not match {c.match!r}") from err
        return
    if c.error is not None:
        raise AssertionError(f"{c.name}: expected {c.error.__name__}, but it worked")


# ----------------------------------------------------------------------------------------------
# A small saved model, written once per process; each case corrupts its own copy.
# ----------------------------------------------------------------------------------------------

PLAN = {r".*q_proj": "lowrank:rank=4", r".*v_proj": "nm:n=2,m=4", r".*down_proj": "sparse:density=0.2",
        r".*k_proj": "splr:rank=2,density=0.1"}
_SAVED: dict[str, Path] = {}


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    structurize(model, PLAN)
    return model


def saved_copy(tmp: Path) -> Path:
    if "dir" not in _SAVED:
        _SAVED["dir"] = save_pretrained(tiny_model(), Path(tempfile.mkdtemp(prefix="structmat-hardening-")) / "m")
    target = tmp / "m"
    shutil.copytree(_SAVED["dir"], target)
    return target


def edit_manifest(path: Path, fn: Callable[[dict], Any]) -> Path:
    manifest = json.loads((path / "structmat.json").read_text())
    fn(manifest)
    (path / "structmat.json").write_text(json.dumps(manifest))
    return path


def edit_weights(path: Path, fn: Callable[[dict[str, torch.Tensor]], Any]) -> Path:
    """Change the tensors and re-record size and sha256, so only the deeper checks can catch the change."""
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    data = (path / "model.safetensors").read_bytes()
    return edit_manifest(path, lambda m: m["files"].update(
        {"model.safetensors": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}))


def edit_config(path: Path, **changes: Any) -> Path:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


V_INDEX = "model.layers.0.self_attn.v_proj.index"
V_VALUES = "model.layers.0.self_attn.v_proj.values"
S_INDEX = "model.layers.0.mlp.down_proj.index"
Q_U = "model.layers.0.self_attn.q_proj.U"


# ----------------------------------------------------------------------------------------------
# 1. Hangs from crafted sizes; divisor search O(sqrt n)
# ----------------------------------------------------------------------------------------------

for _spec in ("blockdiag:ratio=0.5", "monarch:ratio=0.5", "kron:ratio=0.5", "lowrank:ratio=0.5", "kron:rank=1",
              "blockdiag:ratio=0.5,pad=True", "monarch:nblocks=4"):
    case(1, f"build {_spec} 2^62 on meta", match="exceeds the limit")(
        lambda tmp, s=_spec: build(s, 2**62, 2**62, device="meta"))

case(1, "build blockdiag 10^12 x 8", match="in_features")(lambda tmp: build("blockdiag:nblocks=2", 10**12, 8))


@case(1, "divisors(10^12) in O(sqrt n)", error=None)
def _divisors_fast(tmp):
    ds = divisors(10**12)
    assert len(ds) == 169 and ds[0] == 1 and ds[-1] == 10**12 and ds == sorted(ds)
    assert divisors(36) == [1, 2, 3, 4, 6, 9, 12, 18, 36] and divisors(1) == [1] and divisors(97) == [1, 97]


@case(1, "kron with a large prime size on meta", error=None)
def _kron_prime(tmp):
    layer = build("kron:rank=1", 16777213, 4, device="meta")  # 2^24 - 3 is prime: a_shape falls back to 1 x n
    assert layer.a_shape[1] in (1, 16777213)


case(1, "manifest: non-linear module with in_features=10^12", match="in_features")(
    lambda tmp: load_pretrained(edit_manifest(saved_copy(tmp), lambda m: m["modules"].update(
        {"model.norm": {"structure": "blockdiag", "nblocks": 2, "pad": False, "bias": False,
                        "in_features": 10**12, "out_features": 10**12}}))))
case(1, "manifest: non-linear module with plausible sizes", match="no linear shape")(
    lambda tmp: load_pretrained(edit_manifest(saved_copy(tmp), lambda m: m["modules"].update(
        {"model.norm": {"structure": "kron", "rank": 1, "a_shape": None, "bias": False,
                        "in_features": 32, "out_features": 32}}))))
case(1, "manifest: linear module with sizes unlike the model", match="in the model but")(
    lambda tmp: load_pretrained(edit_manifest(saved_copy(tmp), lambda m: m["modules"][
        "model.layers.0.self_attn.q_proj"].update(in_features=4096, out_features=4096))))
case(1, "manifest: size given as a string", match="not a layer size")(
    lambda tmp: load_pretrained(edit_manifest(saved_copy(tmp), lambda m: m["modules"][
        "model.layers.0.self_attn.q_proj"].update(in_features="32"))))
case(1, "manifest: module that does not exist", match="does not have")(
    lambda tmp: load_pretrained(edit_manifest(saved_copy(tmp), lambda m: m["modules"].update(
        {"model.nowhere": {"structure": "lowrank", "rank": 1, "bias": False}}))))


# ----------------------------------------------------------------------------------------------
# 2. Bounded N:M padding; counts equal allocations
# ----------------------------------------------------------------------------------------------

for _m in (30_000_000, 10**11, 25):
    case(2, f"nm m={_m} pad on 16x24", match="exceeds (in_features|256)")(
        lambda tmp, m=_m: build(f"nm:n=1,m={m},pad=True", 16, 24))


@case(2, "nm padding counted and allocated alike", error=None)
def _nm_counts(tmp):
    layer = build("nm:n=2,m=8,pad=True", 10, 6)  # 10 inputs padded to 16: two groups
    allocated = sum(t.numel() for t in layer.parameters())
    assert layer.param_count() == allocated == 6 * 2 * 2 + 6
    assert layer.index.shape == (6, 2)  # 4 positions of 4 bits per row (m=8): two bytes
    assert layer.to_dense().shape == (6, 10)


# ----------------------------------------------------------------------------------------------
# 3. Config sizes checked before a model is built
# ----------------------------------------------------------------------------------------------

for _key, _value in (("vocab_size", 10**9), ("hidden_size", 2**40), ("num_hidden_layers", 10**6),
                     ("max_position_embeddings", 10**12), ("intermediate_size", -5), ("vocab_size", "64")):
    case(3, f"config {_key}={_value!r}", match=_key)(
        lambda tmp, k=_key, v=_value: load_pretrained(edit_config(saved_copy(tmp), **{k: v})))


# ----------------------------------------------------------------------------------------------
# 5-8. Loaded state: index buffers, NaN/Inf, shared entries, dtypes
# ----------------------------------------------------------------------------------------------

def _set(key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    return lambda t: t.__setitem__(key, fn(t[key]))


def _positions(t):
    """The v_proj (nm:n=2,m=4) support as one uint8 in-group position per kept value, unpacked from its 2-bit
    storage: the storage before packed positions, which older checkpoints hold (packed and checked on load)."""
    from structmat.structures.sparse import unpack_positions

    return unpack_positions(t, t.shape[1] * 4, 2)


def _columns(t):
    """The v_proj support as absolute int64 columns: the storage before in-group positions (converted on load)."""
    pos = _positions(t)
    return pos.long() + torch.arange(pos.shape[1]).unsqueeze(0) // 2 * 4


def _legacy(fn):
    return lambda t: fn(_columns(t))


def _legacy_uint8(fn):
    return lambda t: fn(_positions(t))


def _packed_duplicate(t):
    t = t.clone()
    t[0, 0] = (t[0, 0] & 0xF0) | 0b0101  # group 0 of row 0 keeps position 1 twice
    return t


def _position_out_of_group(t):
    t = t.clone()
    t[0, 0] = 4  # position 4 in a group of 4
    return t


def _nm_out_of_range(t):
    t = t.clone()
    t[0, 0] = 10**6
    return t


def _nm_duplicate(t):
    t = t.clone()
    t[0, 1] = t[0, 0]
    return t


def _nm_wrong_group(t):
    t = t.clone()
    t[0, 0] = t[0, 0] + 4  # into the next group of 4
    t[0, 1] = t[0, 0] + 1 if t[0, 0] + 1 < 8 else t[0, 0] - 1
    return t


def _nm_negative(t):
    t = t.clone()
    t[3, 2] = -1
    return t


def _sparse_duplicate(t):
    t = t.clone()
    t[5] = t[4]
    return t


def _sparse_out_of_range(t):
    t = t.clone()
    t[-1] = 32 * 64
    return t


for _name, _key, _fn, _match in (
        ("nm legacy index out of range", V_INDEX, _legacy(_nm_out_of_range), "pattern"),
        ("nm legacy index negative", V_INDEX, _legacy(_nm_negative), "pattern"),
        ("nm legacy index duplicate", V_INDEX, _legacy(_nm_duplicate), "repeats"),
        ("nm legacy index breaks the N:M pattern", V_INDEX, _legacy(_nm_wrong_group), "pattern|repeats"),
        ("nm legacy uint8 position outside its group", V_INDEX, _legacy_uint8(_position_out_of_group), "pattern"),
        ("nm legacy uint8 position duplicate", V_INDEX, _legacy_uint8(_nm_duplicate), "repeats"),
        ("nm packed position duplicate", V_INDEX, _packed_duplicate, "repeats"),
        ("nm packed positions of the wrong width", V_INDEX, lambda t: t[:, :-1].contiguous(), "shape"),
        ("sparse index duplicate", S_INDEX, _sparse_duplicate, "repeats"),
        ("sparse index out of range", S_INDEX, _sparse_out_of_range, "outside"),
        ("splr sparse index duplicate", "model.layers.0.self_attn.k_proj.sparse.index", _sparse_duplicate,
         "repeats")):
    case(5, _name, match=_match)(lambda tmp, k=_key, f=_fn: load_pretrained(edit_weights(saved_copy(tmp), _set(k, f))))

def _swap_first_pairs(tensors, form):
    """Each row's first group lists its two positions (and values) the other way round: a checkpoint from before
    positions were kept in order. ``form``: how the positions are stored (packed, or a legacy storage)."""
    from structmat.structures.sparse import pack_positions

    pos, values = _positions(tensors[V_INDEX]).clone(), tensors[V_VALUES].clone()
    pos[:, [0, 1]], values[:, [0, 1]] = pos[:, [1, 0]], values[:, [1, 0]]
    tensors[V_INDEX] = form(pack_positions(pos, 2))
    tensors[V_VALUES] = values


for _name, _form in (("packed", lambda t: t), ("int64 columns", _columns), ("uint8 positions", _positions)):
    @case(5, f"nm positions out of order ({_name}) load as the same model, put in order", error=None)
    def _nm_unordered_loads(tmp, form=_form):
        path = saved_copy(tmp)
        ref = load_pretrained(path).model.layers[0].self_attn.v_proj
        layer = load_pretrained(edit_weights(path, lambda t: _swap_first_pairs(t, form))).model.layers[0].self_attn.v_proj
        assert torch.equal(layer.index, ref.index) and torch.equal(layer.values, ref.values)
        assert torch.equal(layer.to_dense(), ref.to_dense())


@case(5, "nm positions out of order without their values are refused", match="out of increasing order")
def _nm_unordered_alone(tmp):
    from structmat.structures.sparse import pack_positions

    layer = load_pretrained(saved_copy(tmp)).model.layers[0].self_attn.v_proj
    pos = layer.positions()
    pos[:, [0, 1]] = pos[:, [1, 0]]
    layer.load_state_dict({"index": pack_positions(pos, 2)}, strict=False)  # (the values stay as they were)
    layer.check_state_()


for _name, _legacy_form in (("int64 columns", _columns), ("uint8 positions", _positions)):
    @case(5, f"nm legacy {_name} load as the same model", error=None)
    def _nm_legacy_loads(tmp, form=_legacy_form):
        path = saved_copy(tmp)
        ref = load_pretrained(path)
        ref_layer = ref.model.layers[0].self_attn.v_proj
        loaded = load_pretrained(edit_weights(path, _set(V_INDEX, form)))
        layer = loaded.model.layers[0].self_attn.v_proj
        assert layer.index.dtype == torch.uint8 and layer.index.shape == ref_layer.index.shape
        assert torch.equal(layer.index, ref_layer.index)
        assert torch.equal(layer.to_dense(), ref_layer.to_dense())


case(5, "nm index stored as float", match="dtype")(
    lambda tmp: load_pretrained(edit_weights(saved_copy(tmp), _set(V_INDEX, lambda t: t.float()))))


def _poison(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[0] = value
        return t
    return fn


for _key in (Q_U, "model.layers.0.self_attn.v_proj.values", "model.embed_tokens.weight", "model.norm.weight"):
    for _value in (math.nan, math.inf):
        case(6, f"{_value} in {_key}", match="NaN/Inf")(
            lambda tmp, k=_key, v=_value: load_pretrained(edit_weights(saved_copy(tmp), _set(k, _poison(v)))))

case(7, "shared entry replaces a stored tensor", match="may not replace")(
    lambda tmp: load_pretrained(edit_manifest(saved_copy(tmp), lambda m: m["shared"].update(
        {Q_U: "model.layers.0.self_attn.q_proj.V"}))))
case(7, "shared entry names a missing source", match="not in")(
    lambda tmp: load_pretrained(edit_manifest(saved_copy(tmp), lambda m: m["shared"].update(
        {"lm_head.weight": "nowhere.weight"}))))

case(8, "one factor in float16", match="mix dtypes")(
    lambda tmp: load_pretrained(edit_weights(saved_copy(tmp), _set(Q_U, lambda t: t.half()))))
case(8, "index buffer as int32", match="dtype")(
    lambda tmp: load_pretrained(edit_weights(saved_copy(tmp), _set(V_INDEX, lambda t: t.int()))))
case(8, "norm weight in float64 next to float32 model", error=None)(
    lambda tmp: load_pretrained(edit_weights(saved_copy(tmp), _set("model.norm.weight", lambda t: t.double()))))


@case(8, "whole model saved in bfloat16 loads and runs", error=None)
def _bf16_save(tmp):
    path = edit_weights(saved_copy(tmp), lambda t: t.update({k: v.bfloat16() if v.is_floating_point() else v
                                                              for k, v in t.items()}))
    model = load_pretrained(path)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits.float()).all()


# ----------------------------------------------------------------------------------------------
# 11. relative_error is scale-free
# ----------------------------------------------------------------------------------------------

@case(11, "relative_error at 1e-300 and 1e300", error=None)
def _relative_error_scale(tmp):
    w = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    layer = from_dense(w, "lowrank:rank=1")
    reference = layer.relative_error(w)
    assert 0.1 < reference < 1.0
    for scale in (1e-300, 1e300):
        scaled = from_dense(w * scale, "lowrank:rank=1")
        assert abs(scaled.relative_error(w * scale) - reference) < 1e-9


@case(11, "relative_error of zero against zero and nonzero", error=None)
def _relative_error_zero(tmp):
    layer = build("lowrank:rank=1", 4, 4, bias=False)
    assert layer.relative_error(torch.zeros(4, 4)) == math.inf
    with torch.no_grad():
        layer.U.zero_()
    assert layer.relative_error(torch.zeros(4, 4)) == 0.0


case(11, "relative_error of a NaN weight", match="NaN/Inf")(
    lambda tmp: build("lowrank:rank=1", 4, 4).relative_error(torch.full((4, 4), math.nan)))
case(11, "relative_error of a wrong shape", match="shape")(
    lambda tmp: build("lowrank:rank=1", 4, 4).relative_error(torch.ones(3, 4)))


# ----------------------------------------------------------------------------------------------
# 13. One clear error instead of a raw exception
# ----------------------------------------------------------------------------------------------

for _spec in ("lowrank:ratio=0.5", "splr:ratio=0.5", "monarch:ratio=0.5", "kron:ratio=0.5", "kron:rank=1",
              "blockdiag:ratio=0.5", "nm:ratio=0.5", "sparse:ratio=0.5"):
    case(13, f"build {_spec} 0x0", match="in_features")(lambda tmp, s=_spec: build(s, 0, 0))

for _spec, _match in (("sparse:density=-inf", "density"), ("splr:ratio=0.5,density=-inf", "density"),
                      ("splr:ratio=0.5,rank=inf", "rank"), ("lowrank:rank=1e400", "rank"),
                      ("lowrank:ratio=inf", "ratio"), ("lowrank:ratio=nan", "ratio"), ("nm:n=2,m=4,pad=maybe", "pad"),
                      ("kron:rank=1,a_shape=", "a_shape"), ("unknown:x=1", "unknown structure"),
                      ("lowrank:rank", "key=value"), ("lowrank:rank=2,rank2=3", "unknown key"),
                      ("*", "structure"), ("lowrank:rank=2 * ", "structure")):
    case(13, f"spec {_spec!r}", match=_match)(lambda tmp, s=_spec: build(s, 16, 24))

case(13, "spec that is not a string", error=TypeError, match="spec")(lambda tmp: build(42, 16, 24))
case(13, "manifest nested 100000 deep", match="nested")(
    lambda tmp: load_pretrained(_write_text(saved_copy(tmp) / "structmat.json", "[" * 100000 + "]" * 100000)))
case(13, "manifest product nested 40 deep", match="nested|product")(
    lambda tmp: load_pretrained(edit_manifest(saved_copy(tmp), lambda m: m["modules"][
        "model.layers.0.self_attn.q_proj"].update(_nested_product(40)))))
case(13, "model_class PreTrainedModel", match="model_class")(
    lambda tmp: load_pretrained(edit_manifest(saved_copy(tmp), lambda m: m.update(model_class="PreTrainedModel"))))
case(13, "model_class a config class", match="model_class")(
    lambda tmp: load_pretrained(edit_manifest(saved_copy(tmp), lambda m: m.update(model_class="LlamaConfig"))))
case(13, "model_class not a name", match="model_class")(
    lambda tmp: load_pretrained(edit_manifest(saved_copy(tmp), lambda m: m.update(model_class="os.system"))))
case(13, "device that does not exist", match="device")(lambda tmp: load_pretrained(saved_copy(tmp), device="cuda:77"))
case(13, "device that is not a device", match="device")(lambda tmp: load_pretrained(saved_copy(tmp), device="gpu"))
case(13, "dtype that is not floating", error=TypeError, match="dtype")(
    lambda tmp: load_pretrained(saved_copy(tmp), dtype=torch.int8))


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path.parent


def _nested_product(depth: int) -> dict:
    inner: dict = {"structure": "lowrank", "rank": 1}
    for _ in range(depth):
        inner = {"structure": "product", "factors": [inner, {"structure": "lowrank", "rank": 1}]}
    return inner


# ----------------------------------------------------------------------------------------------
# 4. Crash-safe re-saves: nothing saved before is lost by a crash in a later save
# ----------------------------------------------------------------------------------------------

def _crash_at(monkeypatch_target: str, when: Callable[..., bool]):
    """Patch ``os.<name>`` to raise (as a crash would stop the process) when ``when(*args)``."""
    import os

    real = getattr(os, monkeypatch_target)

    def patched(*args, **kwargs):
        if when(*args):
            raise OSError("simulated crash")
        return real(*args, **kwargs)
    return real, patched


def _resave_crashing(tmp: Path, fn_name: str, when: Callable[..., bool], keep_new: bool) -> None:
    """Crash a re-save at one step; then the directory must load the old model (or the new one, if it was complete),
    and the file a user put there must survive."""
    import os

    path = saved_copy(tmp)
    (path / "notes.txt").write_text("kept")
    old = load_pretrained(path)
    new_model = tiny_model()
    with torch.no_grad():
        new_model.model.norm.weight.fill_(2.0)
    real, patched = _crash_at(fn_name, lambda *a: when(path, *a))
    setattr(os, fn_name, patched)
    try:
        with pytest.raises(OSError, match="simulated crash"):
            save_pretrained(new_model, path)
    finally:
        setattr(os, fn_name, real)
    if keep_new:  # a kill -9 would leave the complete new directory behind: simulate it by not cleaning up
        pass
    loaded = load_pretrained(path)
    assert torch.equal(loaded.model.norm.weight, old.model.norm.weight)
    assert (path / "notes.txt").read_text() == "kept"


case(4, "crash before the old directory is set aside", error=None)(
    lambda tmp: _resave_crashing(tmp, "rename", lambda path, src, dst: Path(src) == path, False))
case(4, "crash between the two renames", error=None)(
    lambda tmp: _resave_crashing(tmp, "rename", lambda path, src, dst: Path(dst) == path, False))
case(4, "crash while writing the new manifest", error=None)(
    lambda tmp: _resave_crashing(tmp, "replace", lambda path, src, dst: str(dst).endswith("structmat.json"), False))


@case(4, "kill -9 between the two renames: the complete new save is recovered", error=None)
def _recover_new(tmp):
    import os

    path = saved_copy(tmp)
    new = path.parent / ".m.structmat-new-abc123"
    shutil.copytree(path, new)
    edit_weights(new, _set("model.norm.weight", lambda t: torch.full_like(t, 3.0)))
    os.rename(path, path.parent / ".m.structmat-old-abc123")  # the crash came right after the first rename
    loaded = load_pretrained(path)
    assert bool((loaded.model.norm.weight == 3.0).all())
    save_pretrained(loaded, path)  # the next save cleans the leftovers
    assert sorted(p.name for p in path.parent.iterdir()) == ["m"]


@case(4, "kill -9 between the renames with an incomplete new save: the old one comes back", error=None)
def _recover_old(tmp):
    import os

    path = saved_copy(tmp)
    new = path.parent / ".m.structmat-new-abc123"
    new.mkdir()
    (new / "model.safetensors").write_bytes(b"partial")
    os.rename(path, path.parent / ".m.structmat-old-abc123")
    assert load_pretrained(path).model.norm.weight.shape == (32,)


@case(4, "re-save through a symlink and into '.' keeps the link and the folder", error=None)
def _resave_symlink(tmp):
    import os

    path = saved_copy(tmp)
    link = tmp / "link"
    link.symlink_to(path, target_is_directory=True)
    save_pretrained(tiny_model(), link)
    assert link.is_symlink() and (path / "structmat.json").is_file()
    cwd = os.getcwd()
    os.chdir(path)
    try:
        save_pretrained(tiny_model(), ".")
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in tmp.iterdir()) == ["link", "m"]
    load_pretrained(link)


case(4, "save over a file", match="not a directory")(
    lambda tmp: save_pretrained(tiny_model(), _write_text(tmp / "file", "x") / "file"))


# ----------------------------------------------------------------------------------------------
# 10. Numerics of the projections: rank-deficient, constant, subnormal, near-fp16-max weights
# ----------------------------------------------------------------------------------------------

def _matrix(kind: str, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if kind == "rank-1":
        return (torch.randn(24, 1, generator=g) @ torch.randn(1, 32, generator=g)).to(dtype)
    if kind == "constant":
        return torch.full((24, 32), 0.75, dtype=dtype)
    if kind == "zero":
        return torch.zeros(24, 32, dtype=dtype)
    return torch.randn(24, 32, generator=g).to(dtype)


def _fits(spec: str, w: torch.Tensor, limit: float) -> None:
    layer = from_dense(w, spec)
    assert all(bool(torch.isfinite(p).all()) for p in layer.parameters()), "non-finite parameters"
    err = layer.relative_error(w)
    assert err <= limit, f"relative error {err} > {limit}"


for _kind in ("rank-1", "constant"):
    for _dtype in (torch.float32, torch.float64):
        case(10, f"splr on a {_kind} {_dtype} matrix", error=None)(
            lambda tmp, k=_kind, d=_dtype: _fits("splr:rank=3,density=0.1", _matrix(k, d), 1e-3))
case(10, "splr on a zero matrix", error=None)(lambda tmp: _fits("splr:rank=2,density=0.1", _matrix("zero"), 0.0))

_PRODUCT = "blockdiag:nblocks=8 * nm:n=2,m=4 * blockdiag:nblocks=8"
for _spec in (_PRODUCT, "splr:rank=2,density=0.1", "lowrank:rank=4", "monarch:nblocks=4", "kron:rank=2",
              "nm:n=2,m=4", "blockdiag:nblocks=4", "sparse:density=0.2", "ldu:rank=4", "rows:k=8", "cols:k=8",
              "randbasis:rank=4,bases=4"):
    for _scale, _dtype in ((1e-40, torch.float32), (1e-300, torch.float64), (1e300, torch.float64),
                           (2000.0, torch.float16)):
        @case(10, f"{_spec} at scale {_scale:g} in {_dtype}", error=None)
        def _scale_free(tmp, spec=_spec, scale=_scale, dtype=_dtype):
            from structmat.structures import Product

            Product.adam_steps, saved = 0, Product.adam_steps  # ALS only: deterministic and fast
            try:
                w = _matrix("random", torch.float64)[:, :32]
                w = torch.cat([w, w[:8]], 0)  # 32 x 32
                reference = from_dense(w, spec).relative_error(w)
                scaled = (w * scale).to(dtype)
                layer = from_dense(scaled, spec)
                assert all(bool(torch.isfinite(p).all()) for p in layer.parameters())
                got = layer.relative_error(scaled)
                tol = 0.02 if dtype == torch.float16 or scale == 1e-40 else 1e-6
                assert abs(got - reference) <= tol * max(reference, 1e-3), (got, reference)
            finally:
                Product.adam_steps = saved


@case(10, "fp16 splr whose sparse part leaves the fp16 range", match="range of torch.float16")
def _fp16_overflow(tmp):
    w = _matrix("random")[:, :24]
    w[0, 0] = 65000.0  # the sparse part must hold about 65000 - (U V)_00, beyond fp16 when U V is negative there
    w[1:, :] += 30000.0 * torch.sign(torch.randn(23, 24, generator=torch.Generator().manual_seed(1)))
    from_dense(w.half(), "splr:rank=1,density=0.05")


# ----------------------------------------------------------------------------------------------
# 12. SparseGPT with dead inputs (all-zero Gram rows/columns)
# ----------------------------------------------------------------------------------------------

def _sparsegpt(gram: torch.Tensor, spec: str, damp: float):
    from structmat.calibrate.stats import InputStats
    from structmat.project import project

    w = _matrix("random")[:8, :16]
    stats = InputStats(gram.to(torch.float64), gram.diagonal().clamp_min(0).sqrt().to(torch.float64), 64)
    layer = project(w, spec, "sparsegpt", stats=stats, damp=damp)
    assert all(bool(torch.isfinite(p).all()) for p in layer.parameters())
    return layer


for _spec in ("nm:n=2,m=4", "sparse:density=0.3"):
    for _damp in (0.0, 0.01, 0.1):
        case(12, f"sparsegpt {_spec} on an all-zero Gram, damp={_damp}", error=None)(
            lambda tmp, s=_spec, d=_damp: _sparsegpt(torch.zeros(16, 16), s, d))


@case(12, "sparsegpt with two dead inputs zeroes their columns", error=None)
def _dead_columns(tmp):
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    x[:, 3] = 0.0
    x[:, 10] = 0.0
    layer = _sparsegpt(x.T @ x, "sparse:density=0.3", 0.0)
    dense = layer.to_dense()
    assert bool((dense[:, 3] == 0).all()) and bool((dense[:, 10] == 0).all())
    assert layer.fit_info["used"] in ("sparsegpt", "data-free")


# ----------------------------------------------------------------------------------------------
# Adapter files (the same causes in adapter.json / adapter.safetensors): checked before the model changes
# ----------------------------------------------------------------------------------------------

_ADAPT_PLAN = {r".*q_proj": "lowrank:rank=2", r".*v_proj": "nm:n=2,m=4", r".*down_proj": "sparse:density=0.1"}


def _adapter_dir(tmp: Path) -> Path:
    from structmat.adapters import adapt, save_adapter

    model = tiny_model()
    adapt(model, _ADAPT_PLAN)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".delta." in name:
                p.normal_(generator=torch.Generator().manual_seed(4))
    return save_adapter(model, tmp / "adapter")


def _adapter_fails_untouched(tmp: Path, edit: Callable[[Path], Any]) -> None:
    from structmat.adapters import adapter_modules, load_adapter

    path = _adapter_dir(tmp)
    edit(path)
    model = tiny_model()
    try:
        load_adapter(model, path)
    finally:
        assert not adapter_modules(model), "the model was changed before the error"


def _edit_adapter_json(fn: Callable[[dict], Any]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        manifest = json.loads((path / "adapter.json").read_text())
        fn(manifest)
        (path / "adapter.json").write_text(json.dumps(manifest))
    return edit


def _edit_adapter_weights(fn: Callable[[dict], Any]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        tensors = load_file(str(path / "adapter.safetensors"))
        fn(tensors)
        save_file(tensors, str(path / "adapter.safetensors"), metadata={"format": "pt"})
        data = (path / "adapter.safetensors").read_bytes()
        _edit_adapter_json(lambda m: m["files"].update(
            {"adapter.safetensors": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}))(path)
    return edit


A_Q = "model.layers.0.self_attn.q_proj"
A_V_INDEX = "model.layers.0.self_attn.v_proj.index"
V_VALUES = "model.layers.0.self_attn.v_proj.values"


@case(5, "adapter round trip", error=None)
def _adapter_ok(tmp):
    from structmat.adapters import adapter_modules, load_adapter

    path = _adapter_dir(tmp)
    model = tiny_model()
    load_adapter(model, path)
    assert len(adapter_modules(model)) == 3


for _name, _edit, _match in (
        ("adapter.json nested 100000 deep", lambda p: _write_text(p / "adapter.json", "[" * 100000 + "]" * 100000),
         "nested"),
        ("adapter.json in_features=10^12", _edit_adapter_json(lambda m: m["modules"][A_Q].update(
            in_features=10**12)), "in the adapter"),
        ("adapter.json module the model lacks", _edit_adapter_json(lambda m: m["modules"].update(
            {"model.nowhere": m["modules"][A_Q]})), "no linear layer"),
        ("adapter.json delta that does not fit", _edit_adapter_json(lambda m: m["modules"][A_Q].update(
            delta={"structure": "monarch", "nblocks": 5})), "nblocks"),
        ("adapter.json scale NaN", _edit_adapter_json(lambda m: m["modules"][A_Q].update(scale=math.nan)),
         "scale"),
        ("adapter.json entry not an object", _edit_adapter_json(lambda m: m["modules"].update({A_Q: 3})),
         "delta config"),
        ("adapter.safetensors truncated", lambda p: (p / "adapter.safetensors").write_bytes(
            (p / "adapter.safetensors").read_bytes()[:100]), "does not match"),
        ("adapter.safetensors missing", lambda p: (p / "adapter.safetensors").unlink(), "cannot be read"),
        ("adapter delta NaN", _edit_adapter_weights(_set(A_Q + ".U", _poison(math.nan))), "NaN/Inf"),
        ("adapter delta of the wrong shape", _edit_adapter_weights(_set(A_Q + ".U", lambda t: t[:, :1].contiguous())),
         "do not fit"),
        ("adapter N:M positions out of range", _edit_adapter_weights(_set(A_V_INDEX, lambda t: t + 100)),
         "index|pattern|position|range"),
        ("adapter stray tensor", _edit_adapter_weights(lambda t: t.update({"x.y": torch.ones(2)})), "no module")):
    case(5, _name, match=_match)(lambda tmp, e=_edit: _adapter_fails_untouched(tmp, e))


# ----------------------------------------------------------------------------------------------
# 9. Training checkpoints: checksummed JSON, stray entries, temporary files, one run per folder
# ----------------------------------------------------------------------------------------------

def _checkpoint(tmp: Path, step: int = 10) -> Path:
    from structmat.train.loop import save_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ckpt = tmp / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    save_checkpoint(ckpt, step, model, opt, {"config_key": "k", "data": {"epoch": 0, "index": 16}, "wall_s": 1.0,
                                             "history": [], "val_history": []})
    return ckpt


def _edit_checkpoint(tmp: Path, fn: Callable[[dict], Any], reseal: bool = False) -> None:
    from structmat.train.loop import _body_digest, load_checkpoint

    ckpt = _checkpoint(tmp)
    path = ckpt / "step-0000010.json"
    state = json.loads(path.read_text())
    fn(state)
    if reseal:  # a crafted file with a matching checksum: the field checks must catch it
        state["sha256"] = _body_digest(state)
    path.write_text(json.dumps(state))
    load_checkpoint(ckpt, 10)


@case(9, "checkpoint round trip", error=None)
def _ckpt_ok(tmp):
    from structmat.train.loop import list_checkpoints, load_checkpoint

    ckpt = _checkpoint(tmp)
    state, tensors = load_checkpoint(ckpt, 10)
    assert list_checkpoints(ckpt) == [10] and state["data"]["index"] == 16 and "model.weight" in tensors


for _name, _fn, _reseal, _match in (
        ("checkpoint JSON: data.index edited", lambda s: s["data"].update(index=24), False, "sha256"),
        ("checkpoint JSON: step edited", lambda s: s.update(step=11), False, "sha256"),
        ("checkpoint JSON: field removed", lambda s: s.pop("history"), False, "sha256"),
        ("checkpoint JSON: field removed, resealed", lambda s: s.pop("history"), True, "history"),
        ("checkpoint JSON: step of another file, resealed", lambda s: s.update(step=11), True, "step"),
        ("checkpoint JSON: wall_s a string, resealed", lambda s: s.update(wall_s="1"), True, "wall_s"),
        ("checkpoint JSON: older version", lambda s: s.update(version=2), True, "version")):
    case(9, _name, match=_match)(lambda tmp, f=_fn, r=_reseal: _edit_checkpoint(tmp, f, r))

case(9, "checkpoint JSON nested 100000 deep", match="nested")(
    lambda tmp: (_write_text(_checkpoint(tmp) / "step-0000010.json", "[" * 100000 + "]" * 100000),
                 __import__("structmat.train.loop", fromlist=["x"]).load_checkpoint(tmp / "checkpoints", 10)))


@case(9, "data position beyond the epoch", match="index=")
def _data_index(tmp):
    from structmat.train.data import PackedBatches

    batches = PackedBatches(torch.arange(64 * 8), seq_len=8, batch_size=2)
    state = batches.state_dict()
    batches.load_state_dict({**state, "index": 10**9})


case(9, "data position negative", match="index=")(
    lambda tmp: __import__("structmat.train.data", fromlist=["x"]).PackedBatches(
        torch.arange(64), seq_len=8, batch_size=2).load_state_dict({"epoch": 0, "index": -2, "seed": 0, "seq_len": 8,
                                                                    "batch_size": 2, "num_sequences": 8}))


@case(9, "stray directory named like a checkpoint", error=None)
def _stray_dir(tmp):
    from structmat.train.loop import list_checkpoints, remove_checkpoint

    ckpt = _checkpoint(tmp)
    (ckpt / "step-0000020.json").mkdir()
    (ckpt / "step-0000030.safetensors").mkdir()
    (ckpt / "step-12.json").write_text("{}")  # not a checkpoint name either
    assert list_checkpoints(ckpt) == [10]
    remove_checkpoint(ckpt, 20)
    remove_checkpoint(ckpt, 30)
    remove_checkpoint(ckpt, 10)
    assert list_checkpoints(ckpt) == [] and (ckpt / "step-0000020.json").is_dir()


@case(9, "temporary files of killed writes are removed", error=None)
def _temporary_files(tmp):
    from structmat.train.loop import clean_temporary_files

    ckpt = _checkpoint(tmp)
    junk = [ckpt / ".step-0000020.safetensors.a1b2.tmp", ckpt / ".step-0000020.json.c3d4.tmp"]
    for p in junk:
        p.write_bytes(b"x" * 1000)
    removed = clean_temporary_files(ckpt)
    assert sorted(removed) == sorted(junk) and not any(p.exists() for p in junk)
    assert (ckpt / "step-0000010.json").is_file()


@case(9, "two runs in one output folder", match="in use by another training run")
def _two_runs(tmp):
    from structmat.train.loop import run_lock

    with run_lock(tmp / "out"):
        with run_lock(tmp / "out"):
            pass


@case(9, "the lock is released after a run", error=None)
def _lock_released(tmp):
    from structmat.train.loop import run_lock

    with run_lock(tmp / "out"):
        pass
    with run_lock(tmp / "out"):
        pass


# ----------------------------------------------------------------------------------------------
# 14. Every spec and config checked before any work
# ----------------------------------------------------------------------------------------------

for _kw, _match in (({"mlp": "monarch:nblock=4"}, "nblock"), ({"mlp": "monarch:nblocks=7"}, "does not divide"),
                    ({"attn": "lowrank:rank=999"}, "rank"), ({"preset": "7b"}, "preset"),
                    ({"model_overrides": {"foo_bar": 1}}, "foo_bar"),
                    ({"model_overrides": {"hidden_size": -1}}, "config"),
                    ({"vocab_size": 10**9}, "vocab_size")):
    case(14, f"train config {_kw}", match=_match)(
        lambda tmp, kw=_kw: __import__("structmat.train.loop", fromlist=["x"]).train(
            {"out_dir": str(tmp / "run"), "corpus": str(tmp / "no-such-corpus"), **kw}))


def _cli(argv: list[str]) -> tuple[int, str]:
    """Run the CLI in-process; (exit code, stderr)."""
    import contextlib
    import io

    from structmat.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse errors
            code = exit_.code
    return code, err.getvalue()


def _cli_fails(argv: list[str], match: str) -> None:
    import re

    code, err = _cli(argv)
    assert code not in (0, None), f"exit code {code}"
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert "Traceback" not in err and re.search(match, last), err[-500:]  # one clear line (after argparse's usage)


for _argv, _match in (
        (["compress", "--structure", "lowrank@nonsense", "--out", "{tmp}/c"], "nonsense"),
        (["compress", "--structure", "monarchy@whitened", "--out", "{tmp}/c"], "unknown structure"),
        (["compress", "--allow", "lowrank@whitened,monarch@whitened:nblock=4", "--out", "{tmp}/c"], "nblock"),
        (["compress", "--layers", "(unclosed", "--out", "{tmp}/c"], "regular expression"),
        (["compress", "--calib-samples", "0", "--out", "{tmp}/c"], "calib-samples"),
        (["train", "--mlp", "monarch:nblock=4", "--out-dir", "{tmp}/t", "--corpus", "{tmp}/none"], "nblock"),
        (["train", "--attn", "lowrank:rank=0", "--out-dir", "{tmp}/t", "--corpus", "{tmp}/none"], "rank"),
        (["eval", "--model", "{tmp}/m", "--out", "{tmp}/e"], "no such model folder"),
        (["compress", "--target-params", "1.5", "--out", "{tmp}/c"], "target")):
    case(14, f"cli {' '.join(_argv[:3])}", error=None)(
        lambda tmp, argv=_argv, m=_match: _cli_fails([a.format(tmp=tmp) for a in argv], m))


def _llama4():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=4)).eval()


@case(14, "structurize: a bad entry for the last layer fails before any projection", match="nblocks=5")
def _structurize_early(tmp):
    import structmat.surgery as surgery

    calls = []
    real = surgery._build_layer
    surgery._build_layer = lambda *a, **k: calls.append(a[0]) or real(*a, **k)
    try:
        model = _llama4()
        surgery.structurize(model, {r".*q_proj": "lowrank:rank=4", "model.layers.3.mlp.up_proj": "monarch:nblocks=5"})
    finally:
        surgery._build_layer = real
        assert calls == [], f"projected {calls} before the error"


@case(14, "compress_sequential: a bad entry for the last block fails before block 0", match="nblocks=5")
def _sequential_early(tmp):
    from structmat.compress import compress_sequential

    model = _llama4()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        compress_sequential(model, {r".*q_proj": "lowrank:rank=4", "model.layers.3.mlp.up_proj": "monarch:nblocks=5"},
                            [{"input_ids": torch.randint(0, 64, (2, 8))}])
    finally:
        after = model.state_dict()
        assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


@case(13, "cli: a corrupt model folder is one line, not a traceback", error=None)
def _cli_corrupt(tmp):
    path = saved_copy(tmp)
    (path / "structmat.json").write_text("{")
    _cli_fails(["eval", "--model", str(path), "--out", str(tmp / "e")], "not valid JSON")


@case(13, "cli: resume from an edited checkpoint is one line, not a traceback", error=None)
def _cli_resume(tmp):
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i in range(24):  # a tiny corpus: enough files for a training/validation split
        (corpus / f"f{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 40)
    ckpt = _checkpoint(tmp / "run")
    state = json.loads((ckpt / "step-0000010.json").read_text())
    state["data"]["index"] = 999  # edited by hand: the JSON's own sha256 no longer matches
    (ckpt / "step-0000010.json").write_text(json.dumps(state))
    _cli_fails(["train", "--out-dir", str(tmp / "run"), "--corpus", str(corpus), "--cache-dir", str(tmp / "cache"),
                "--vocab-size", "300", "--seq-len", "16", "--batch-size", "2", "--steps", "20",
                "--no-progress"], "step-0000010.json is corrupt")


@case(15, "no test waits on a wall-clock deadline", error=None)
def _no_deadlines(tmp):
    import re

    for path in Path(__file__).parent.glob("test_*.py"):
        text = path.read_text()
        hits = re.findall(r"time\.(?:monotonic|time|perf_counter)\(\)\s*\+\s*\d", text)
        assert not hits, f"{path.name} waits on a wall-clock deadline: {hits}"


@case(13, "save onto a full disk is one OSError naming the folder and the fix", error=OSError, match="free disk space")
def _disk_full(tmp):
    import errno

    import safetensors.torch as st

    real = st.save_file

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    st.save_file = full
    try:
        save_pretrained(tiny_model(), tmp / "m")
    finally:
        st.save_file = real


# ----------------------------------------------------------------------------------------------
# 16. Help text, output folders, presets, result JSON
# ----------------------------------------------------------------------------------------------

@case(16, "every CLI flag has help, and help shows defaults", error=None)
def _help_text(tmp):
    import argparse

    from structmat.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, subparser in sub.choices.items():
        for action in subparser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"structmat {name} {action.option_strings or action.dest} has no help"
        text = subparser.format_help()
        if name in ("demo", "compress", "eval", "table", "generate"):
            assert "(default:" in text, f"structmat {name} --help shows no defaults"
        if name == "train":
            assert "(default 5m)" in text and "(default 16384)" in text


@case(16, "bench train-compare description is a whole sentence", error=None)
def _bench_description(tmp):
    code, _ = None, None
    import contextlib
    import io

    from structmat.bench import train_compare

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        train_compare.main(["--help"])
    text = " ".join(out.getvalue().split())
    assert "then the equal-wall-time comparison." in text


@case(16, "the 5m preset with the default vocabulary has the documented ~4.9M parameters", error=None)
def _preset_params(tmp):
    from structmat.train.loop import TrainConfig
    from structmat.train.models import count_params, structured_llama

    with torch.device("meta"):
        model = structured_llama("5m", TrainConfig().vocab_size)
    assert count_params(model) == 4_916_928


@case(16, "run_info stores the handler's name, not its repr", error=None)
def _args_record(tmp):
    from structmat.cli import _args_record, build_parser

    args = build_parser().parse_args(["demo", "--out", str(tmp)])
    record = _args_record(args)
    assert record["func"] == "structmat.cli._demo"
    assert "<function" not in json.dumps(record, default=str)


@case(16, "README links stay inside the repository and name the demo's output folder", error=None)
def _readme(tmp):
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "../" not in "".join(re.findall(r"`[^`]*DESIGN\.md[^`]*`|\]\([^)]*\)", readme))
    assert "structmat-out/demo.json" in readme


# ----------------------------------------------------------------------------------------------
# The test
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("c", CASES, ids=[f"{c.cause}-{c.name}" for c in CASES])
def test_case(c: Case, tmp_path: Path) -> None:
    run_case(c, tmp_path)


def test_every_cause_is_covered() -> None:
    covered = {c.cause for c in CASES}
    missing = sorted(set(EXPECTED_CAUSES) - covered)
    assert not missing, f"causes without a case: {missing}"


EXPECTED_CAUSES = tuple(range(1, 17))


def _save_forever(path: Path, model, conn) -> None:  # runs in a forked child until it is killed
    try:
        value = 0
        while True:
            value += 1
            with torch.no_grad():
                model.model.norm.weight.fill_(float(value))
            conn.send(("begin", value))
            save_pretrained(model, path)
            conn.send(("done", value))
    except BaseException as err:  # report, so the test fails with the child's reason
        conn.send(("error", f"{type(err).__name__}: {err}"))
        raise


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_kill_9_during_resaves_never_loses_the_save(tmp_path: Path) -> None:
    """Cause 4 with real kills: a child re-saves one folder in a loop and is killed with SIGKILL at varied moments
    of a save; every time, the folder loads and holds the last completed save or the one in progress."""
    import contextlib
    import multiprocessing
    import os
    import signal
    import time

    model = tiny_model()
    path = tmp_path / "m"
    (tmp_path / "keep").mkdir()
    ctx = multiprocessing.get_context("fork")
    for round_, delay in enumerate((0.0, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.08)):
        with torch.no_grad():
            model.model.norm.weight.fill_(0.0)
        save_pretrained(model, path)
        receive, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_save_forever, args=(path, model, send), daemon=True)
        child.start()
        send.close()
        last_done, started = 0, 0
        while started < 2:  # progress, not a clock: wait for the second save to begin
            try:
                kind, value = receive.recv()
            except EOFError:
                child.join()
                raise AssertionError(f"round {round_}: the saving child died first (exit code {child.exitcode})")
            assert kind != "error", value
            if kind == "begin":
                started = value
            else:
                last_done = value
        time.sleep(delay)  # only picks the moment of the kill inside a save; every moment must be safe
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        with contextlib.suppress(EOFError):  # what the child sent before it died; poll() is also true at EOF
            while receive.poll():
                kind, value = receive.recv()
                assert kind != "error", value
                if kind == "done":
                    last_done = value
        receive.close()
        value = float(load_pretrained(path).model.norm.weight.detach()[0])
        assert last_done >= 1 and value in (float(last_done), float(last_done + 1)), \
            f"round {round_}: loaded {value}, last completed save {last_done}"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("m", "keep"))
    save_pretrained(model, path)  # the next save cleans what the kills left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "m"], leftovers
