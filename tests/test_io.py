"""save_pretrained / load_pretrained: identical outputs after a round trip, clear errors, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from structmat.io import load_pretrained, save_pretrained
from structmat.structures import Product, StructuredLinear
from structmat.surgery import structured_modules, structurize


@pytest.fixture(autouse=True)
def _fast_product(monkeypatch):
    monkeypatch.setattr(Product, "adam_steps", 5)  # the fit's quality is not under test here
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # multi-threaded LAPACK stalls on shared 2-core machines
    yield
    torch.set_num_threads(before)


PLAN = {
    r".*q_proj": "lowrank:rank=8",
    r".*k_proj": "splr:rank=4,density=0.1",
    r".*v_proj": "nm:n=2,m=4",
    r".*o_proj": "blockdiag:nblocks=8 * nm:n=2,m=4 * blockdiag:nblocks=8",
    r".*up_proj": "monarch:nblocks=4",
    r".*gate_proj": "kron:rank=2",
    r".*down_proj": "sparse:density=0.2",
}


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tokens(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def saved_llama(tmp_path):
    model = tiny_llama()
    structurize(model, PLAN)
    save_pretrained(model, tmp_path / "m")
    return model, tmp_path / "m"


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


# ----------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------


def test_llama_round_trip_identical(saved_llama):
    model, path = saved_llama
    assert {p.name for p in path.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                                "structmat.json"}
    manifest = json.loads((path / "structmat.json").read_text())
    assert manifest["format"] == "structmat" and manifest["version"] == 1
    assert manifest["model_class"] == "LlamaForCausalLM"
    assert set(manifest["modules"]) == set(structured_modules(model))
    assert manifest["modules"]["model.layers.0.self_attn.o_proj"]["structure"] == "product"
    assert manifest["modules"]["model.layers.0.self_attn.q_proj"]["bias"] is False
    assert manifest["shared"] == {"lm_head.weight": "model.embed_tokens.weight"}

    loaded = load_pretrained(path)
    assert type(loaded) is LlamaForCausalLM and not loaded.training
    x = tokens()
    assert torch.equal(logits(model, x), logits(loaded, x))
    for name, layer in structured_modules(model).items():
        other = loaded.get_submodule(name)
        assert type(other) is type(layer) and other.config == layer.config
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again
    assert not any(t.device.type == "meta" for t in [*loaded.parameters(), *loaded.buffers()])
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)


def test_gpt2_round_trip_identical(tmp_path):
    model = tiny_gpt2()
    structurize(model, {r".*attn\.c_attn": "lowrank:rank=16", r".*mlp\.c_fc": "monarch:nblocks=4",
                        r".*mlp\.c_proj": "nm:n=2,m=4", r"transformer\.h\.0\.attn\.c_proj": "dense"})
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    x = tokens()
    assert torch.equal(logits(model, x), logits(loaded, x))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert type(loaded.transformer.h[1].attn.c_proj).__name__ == "Conv1D"  # untouched layers stay as they were


def test_gpt2_structured_tied_head_round_trip(tmp_path):
    model = tiny_gpt2()
    structurize(model, {"lm_head": "lowrank:rank=16"})
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    assert isinstance(loaded.lm_head, StructuredLinear)
    x = tokens()
    assert torch.equal(logits(model, x), logits(loaded, x))


def test_minilm_round_trip_identical(tmp_path):
    from structmat.data.pretrained import load_minilm

    model = load_minilm()
    structurize(model, {r".*attention\.self\.query": "lowrank:ratio=0.5", r".*intermediate\.dense": "nm:n=2,m=4",
                        r".*attention\.output\.dense": "monarch:nblocks=4"})
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    x = tokens(2, 16)
    mask = torch.ones_like(x)
    with torch.no_grad():
        a = model(input_ids=x, attention_mask=mask).last_hidden_state
        b = loaded(input_ids=x, attention_mask=mask).last_hidden_state
    assert torch.equal(a, b)
    assert len(structured_modules(loaded)) == 18


def test_load_with_dtype(saved_llama):
    _, path = saved_llama
    loaded = load_pretrained(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert loaded.model.layers[0].mlp.down_proj.index.dtype == torch.int64
    out = logits(loaded, tokens())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_save_twice_overwrites(saved_llama, tmp_path):
    model, path = saved_llama
    other = tiny_llama()
    save_pretrained(other, path)  # a plain model over a structured save
    loaded = load_pretrained(path)
    assert structured_modules(loaded) == {}
    x = tokens()
    assert torch.equal(logits(other, x), logits(loaded, x))
    assert not any(p.name.startswith(".") for p in path.iterdir())


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def edit_manifest(path: Path, **changes) -> None:
    manifest = json.loads((path / "structmat.json").read_text())
    manifest.update(changes)
    (path / "structmat.json").write_text(json.dumps(manifest))


def test_newer_version(saved_llama):
    _, path = saved_llama
    edit_manifest(path, version=2)
    with pytest.raises(ValueError, match="version 2.*upgrade structmat"):
        load_pretrained(path)


def test_unknown_format_and_missing_keys(saved_llama):
    _, path = saved_llama
    edit_manifest(path, format="other")
    with pytest.raises(ValueError, match="format 'other'"):
        load_pretrained(path)
    edit_manifest(path, format="structmat")
    manifest = json.loads((path / "structmat.json").read_text())
    del manifest["modules"]
    (path / "structmat.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="lacks the key.*modules"):
        load_pretrained(path)


@pytest.mark.parametrize("name", ["NotARealModelClass", "LlamaConfig", "PreTrainedModel.__init__", "os"])
def test_class_not_in_transformers(saved_llama, name):
    _, path = saved_llama
    edit_manifest(path, model_class=name)
    with pytest.raises(ValueError, match="model_class"):
        load_pretrained(path)


def test_class_not_in_config_architectures(saved_llama):
    _, path = saved_llama
    edit_manifest(path, model_class="LlamaModel")
    with pytest.raises(ValueError, match="architectures"):
        load_pretrained(path)


def rewrite_weights(path: Path, change) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    manifest = json.loads((path / "structmat.json").read_text())
    del manifest["files"]  # reach the tensor checks, not the file checks
    (path / "structmat.json").write_text(json.dumps(manifest))


def test_missing_tensor(saved_llama):
    _, path = saved_llama
    rewrite_weights(path, lambda t: t.pop("model.layers.1.self_attn.q_proj.V"))
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*model\.layers\.1\.self_attn\.q_proj\.V"):
        load_pretrained(path)


def test_unexpected_tensor(saved_llama):
    _, path = saved_llama
    rewrite_weights(path, lambda t: t.update({"extra.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match="extra.weight"):
        load_pretrained(path)


def test_shape_mismatch(saved_llama):
    _, path = saved_llama
    rewrite_weights(path, lambda t: t.update({"model.layers.0.self_attn.q_proj.U": torch.ones(64, 9)}))
    with pytest.raises(ValueError, match=r"q_proj\.U.*shape \(64, 9\).*expects \(64, 8\)"):
        load_pretrained(path)


def test_truncated_file(saved_llama):
    _, path = saved_llama
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors has .* bytes.*truncated"):
        load_pretrained(path)
    manifest = json.loads((path / "structmat.json").read_text())
    del manifest["files"]  # without the recorded size, safetensors itself must notice
    (path / "structmat.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="model.safetensors is truncated or corrupt"):
        load_pretrained(path)


def test_corrupt_bytes(saved_llama):
    _, path = saved_llama
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_pretrained(path)


def test_corrupt_json(saved_llama):
    _, path = saved_llama
    (path / "structmat.json").write_text('{"format": "structmat", "version": 1,')
    with pytest.raises(ValueError, match="structmat.json is not valid JSON"):
        load_pretrained(path)


def test_missing_files(saved_llama, tmp_path):
    _, path = saved_llama
    (path / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json is missing"):
        load_pretrained(path)
    with pytest.raises(ValueError, match="structmat.json is missing"):
        load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no such directory"):
        load_pretrained(tmp_path / "nope")


def test_save_rejects_non_transformers_models(tmp_path):
    with pytest.raises(ValueError, match="PreTrainedModel"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path)


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_llama()
    structurize(model, {r".*q_proj": "lowrank:rank=8"})

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save_file)
    target = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, target)
    assert list(tmp_path.iterdir()) == []  # neither the directory nor a temporary sibling


def test_failed_save_keeps_previous_save(saved_llama, monkeypatch):
    model, path = saved_llama
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    other = tiny_llama()

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save_file)
    with pytest.raises(OSError):
        save_pretrained(other, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    monkeypatch.undo()
    x = tokens()
    assert torch.equal(logits(model, x), logits(load_pretrained(path), x))


def test_crash_while_committing_keeps_a_loadable_save(saved_llama, monkeypatch):
    model, path = saved_llama
    real_rename = os.rename

    def rename(src, dst):
        if Path(dst) == path:  # the old save is set aside, the new one never comes in
            raise OSError("power cut")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="power cut"):
        save_pretrained(tiny_llama(), path)
    monkeypatch.undo()
    x = tokens()
    assert torch.equal(logits(model, x), logits(load_pretrained(path), x))  # the old save comes back
