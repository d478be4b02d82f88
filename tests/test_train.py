"""structmat.train: presets structured at init, the cached tokenizer, packed data, and exact kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from structmat import LowRank, load_pretrained, structurize
from structmat.structures.base import mup_std
from structmat.surgery import structured_modules
from structmat.train.data import PackedBatches
from structmat.train.loop import TrainConfig, list_checkpoints, load_checkpoint, param_groups, train
from structmat.train.models import PRESETS, count_params, make_plan, structured_llama
from structmat.train.tokenizer import bpe_tokenizer

from corpora import stdlib_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return stdlib_corpus(tmp_path_factory.mktemp("train"))


def _config(corpus: Path, tmp: Path, out: str, **kw) -> dict:
    base = dict(out_dir=str(tmp / out), corpus=str(corpus), val_fraction=0.25, vocab_size=512, seq_len=64,
                batch_size=8, steps=30, lr=3e-3, warmup=5, eval_every=10, eval_batches=4, ckpt_every=10,
                cache_dir=str(corpus.parent / "cache"), mlp="lowrank:ratio=0.5", threads=1, progress=False,
                model_overrides={"num_hidden_layers": 2}, seed=3)
    base.update(kw)
    return base


def test_preset_builds_with_fresh_structured_init():
    plan = make_plan(mlp="lowrank:ratio=0.5")
    model = structured_llama("5m", 512, plan, seed=0)
    layers = structured_modules(model)
    assert len(layers) == 3 * PRESETS["5m"].num_hidden_layers
    assert all(name.split(".")[-1] in ("gate_proj", "up_proj", "down_proj") for name in layers)
    dense = structured_llama("5m", 512, None, seed=0)
    assert count_params(model) < count_params(dense)
    # Fresh muP init per factor, not the projection of the random dense weight the same seed gives.
    projected = structured_llama("5m", 512, None, seed=0)
    structurize(projected, plan)
    for name, layer in layers.items():
        assert isinstance(layer, LowRank)
        for pname, (fan_in, fan_out) in layer._factors().items():
            std = layer.get_parameter(pname).std().item()
            assert abs(std / mup_std(fan_in, fan_out) - 1) < 0.1, (name, pname)
        other = structured_modules(projected)[name].to_dense()
        assert (torch.linalg.norm(layer.to_dense() - other) / torch.linalg.norm(other)).item() > 0.5
    # per-factor lr multipliers reach the optimizer groups; no decay on 1-D parameters
    groups = param_groups(model, 0.1)
    layer = layers["model.layers.0.mlp.up_proj"]
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(layer.U)]["lr_mult"] == pytest.approx(layer.in_features / layer.rank)
    assert by_param[id(model.model.norm.weight)]["weight_decay"] == 0.0
    assert sum(p.numel() for g in groups for p in g["params"]) == count_params(model)


def test_tokenizer_is_cached(corpus, tmp_path):
    files = sorted(corpus.iterdir())[:4]
    t0 = time.perf_counter()
    tok = bpe_tokenizer(files, 300, cache_dir=tmp_path)
    assert tok.get_vocab_size() == 300 and len(list(tmp_path.glob("bpe-*.json"))) == 1
    again = bpe_tokenizer(files, 300, cache_dir=tmp_path)
    assert again.to_str() == tok.to_str()
    bpe_tokenizer(files, 320, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("bpe-*.json"))) == 2
    assert time.perf_counter() - t0 < 30


def test_packed_batches_resume_exactly():
    stream = torch.arange(1000)
    a = PackedBatches(stream, 10, 7, seed=1)
    seen = [a.next() for _ in range(30)]  # crosses epoch boundaries (100 sequences, 14 batches per epoch)
    b = PackedBatches(stream, 10, 7, seed=1)
    for _ in range(17):
        b.next()
    c = PackedBatches(stream, 10, 7, seed=1)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert all(torch.equal(c.next(), s) for s in seen[17:])
    with pytest.raises(ValueError, match="batch_size"):
        PackedBatches(stream, 10, 5, seed=1).load_state_dict(b.state_dict())


def test_tiny_training_lowers_loss_and_saves(corpus, tmp_path):
    res = train(_config(corpus, tmp_path, "run", steps=40, ckpt_every=0))
    losses = [h["loss"] for h in res["history"]]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    assert res["validation"][-1]["loss"] < res["validation"][0]["loss"] + 1e-6
    assert res["final"]["flops"] > 0 and res["history"][-1]["tokens"] == 40 * 8 * 64
    model = load_pretrained(tmp_path / "run" / "model")
    assert len(structured_modules(model)) == 6
    assert json.loads((tmp_path / "run" / "results.json").read_text())["final"]["step"] == 40


def test_kill_and_resume_gives_the_same_loss_curve(corpus, tmp_path, capsys):
    n, k = 30, 10
    reference = train(_config(corpus, tmp_path, "ref", steps=n, ckpt_every=k))
    cfg = _config(corpus, tmp_path, "crash", steps=n, ckpt_every=k, throttle_s=0.25)
    (tmp_path / "crash.json").write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "structmat.train.cli", "--config", str(tmp_path / "crash.json")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt_dir = tmp_path / "crash" / "checkpoints"
    # Wait on progress, not on the clock: as long as the run is alive it is making its way to a checkpoint (a loaded
    # machine only makes that slower); the run ending without one is the failure.
    while not list_checkpoints(ckpt_dir):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended without a checkpoint: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stderr.close()
    done = list_checkpoints(ckpt_dir)
    assert k in done and max(done) < n  # killed mid-run
    resumed = train({**cfg, "throttle_s": 0.0})
    assert resumed["resumed_from"] == max(done)
    assert f"resumed from step {max(done)}" in capsys.readouterr().err
    ref_losses = [h["loss"] for h in reference["history"]]
    got = [h["loss"] for h in resumed["history"]]
    assert len(got) == n
    assert got == pytest.approx(ref_losses, abs=1e-6, rel=0)
    assert [v["loss"] for v in resumed["validation"]] == pytest.approx(
        [v["loss"] for v in reference["validation"]], abs=1e-6, rel=0)
    # the final weights agree too
    a = load_pretrained(tmp_path / "ref" / "model").state_dict()
    b = load_pretrained(tmp_path / "crash" / "model").state_dict()
    assert all(torch.allclose(a[key], b[key], atol=1e-6, rtol=0) for key in a)


def test_corrupt_checkpoint_is_a_clear_error(corpus, tmp_path):
    cfg = _config(corpus, tmp_path, "c", steps=4, ckpt_every=2, eval_every=0)
    train(cfg)
    ckpt_dir = tmp_path / "c" / "checkpoints"
    step = list_checkpoints(ckpt_dir)[-1]
    tensors = ckpt_dir / f"step-{step:07d}.safetensors"
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(ckpt_dir, step)
    with pytest.raises(ValueError, match="corrupt"):
        train({**cfg, "steps": 4})
    (ckpt_dir / f"step-{step:07d}.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        train(cfg)


def test_config_is_validated():
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig.coerce({"stepz": 3})
    with pytest.raises(ValueError, match="seq_len"):
        TrainConfig(seq_len=0)
    with pytest.raises(ValueError, match="preset"):
        structured_llama("7b", 512)


def test_mixer_hybrid_training_saves_loads_and_generates(corpus, tmp_path):
    """structmat train --mixer deltaproduct:n_h=2 --neg-eigval --attn-every 2: a hybrid (layer 1 keeps attention)
    that learns, saves, loads back as the same hybrid, and decodes with its recurrent state through HF generate."""
    from structmat.mixers import LlamaMixerAttention

    cfg = _config(corpus, tmp_path, "mix", steps=15, ckpt_every=0, eval_every=15, mlp=None,
                  mixer="deltaproduct:n_h=2,chunk=16", neg_eigval=True, attn_every=2, mixer_backend="auto",
                  decode_prompt=24, decode_tokens=4)
    res = train(cfg)
    losses = [h["loss"] for h in res["history"]]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5
    assert res["model"]["mixer"]["layers"] == [0] and res["model"]["mixer"]["n_householder"] == 2
    assert res["final"]["tokens_per_s"] > 0 and res["final"]["decode"]["decode_tokens_per_s"] > 0
    model = load_pretrained(tmp_path / "mix" / "model")
    kinds = [type(l.self_attn) for l in model.model.layers]
    assert kinds[0] is LlamaMixerAttention and kinds[1] is not LlamaMixerAttention
    mixer = model.model.layers[0].self_attn.mixer
    assert mixer.allow_neg_eigval and mixer.nh == 2 and mixer.backend == "auto"
    x = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(model.generate(x, use_cache=True, **kw), model.generate(x, use_cache=False, **kw))
    for bad, match in (({"mixer": "mamba"}, "unknown name"), ({"mixer": "deltanet:n_h=2"}, "deltaproduct only"),
                       ({"mixer": "deltanet", "attn_every": 1}, "attn_every"), ({"attn_every": 4}, "give mixer"),
                       ({"mixer": "deltanet", "mixer_backend": "cuda"}, "mixer_backend")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad)
