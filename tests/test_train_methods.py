"""structmat.train: self-guided training, reverse sparsification, distributed (DDP/FSDP2 on gloo), the loss plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from structmat import LowRank, load_pretrained
from structmat.surgery import linear_modules, structured_modules
from structmat.train.loop import TrainConfig, checkpoint_paths, list_checkpoints, train
from structmat.train.methods import (SelfGuided, attach_guides, detach_guides, guide_alpha, guides, set_guide_alpha)
from structmat.train.models import make_plan, structured_llama

from corpora import stdlib_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return stdlib_corpus(tmp_path_factory.mktemp("train_methods"))


def _config(corpus: Path, tmp: Path, out: str, **kw) -> dict:
    base = dict(out_dir=str(tmp / out), corpus=str(corpus), val_fraction=0.25, vocab_size=512, seq_len=64,
                batch_size=8, steps=20, lr=3e-3, warmup=3, eval_every=10, eval_batches=2, ckpt_every=0,
                cache_dir=str(corpus.parent / "cache"), mlp="lowrank:ratio=0.5", threads=1, progress=False,
                model_overrides={"num_hidden_layers": 2}, seed=5)
    base.update(kw)
    return base


def _resume_from(cfg: dict, step: int) -> dict:
    """Drop every checkpoint after ``step`` and the outputs, then resume: the run continues from ``step``."""
    ckpt_dir = Path(cfg["out_dir"]) / "checkpoints"
    for s in list_checkpoints(ckpt_dir):
        if s > step:
            for p in checkpoint_paths(ckpt_dir, s):
                p.unlink()
    res = train(cfg)
    assert res["resumed_from"] == step
    return res


def _losses(res: dict) -> list[float]:
    return [h["loss"] for h in res["history"]]


def test_self_guided_layer_interpolates_between_guide_and_structured():
    torch.manual_seed(0)
    layer = LowRank(24, 16, rank=4)
    w = SelfGuided(layer, init_std=0.05)
    x = torch.randn(3, 5, 24)
    w.alpha.fill_(1.0)
    torch.testing.assert_close(w(x), w.guide(x))
    w.alpha.fill_(0.0)
    torch.testing.assert_close(w(x), layer(x))
    w.alpha.fill_(0.25)
    torch.testing.assert_close(w(x), 0.75 * layer(x) + 0.25 * w.guide(x))
    assert guide_alpha(0, 10) == 1.0 and guide_alpha(5, 10) == pytest.approx(0.5) and guide_alpha(10, 10) == 0.0
    alphas = [guide_alpha(t, 10) for t in range(12)]
    assert all(a >= b for a, b in zip(alphas, alphas[1:]))


def test_attach_and_detach_guides_round_trip():
    model = structured_llama("5m", 256, make_plan("lowrank:ratio=0.5"), num_hidden_layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = attach_guides(model, 0.02)
    assert len(found) == 3 and len(guides(model)) == 3
    # structured layers are still found (inside the wrappers), guides are dense linears
    assert len(structured_modules(model)) == 3
    assert sum(name.endswith(".guide") for name in linear_modules(model)) == 3
    set_guide_alpha(model, 0.3)
    assert all(float(g.alpha) == pytest.approx(0.3) for g in guides(model))
    assert detach_guides(model) == 3 and not guides(model)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="structured layers"):
        attach_guides(structured_llama("5m", 256, None, num_hidden_layers=1), 0.02)


def test_self_guided_training_resumes_exactly_and_ends_structured(corpus, tmp_path):
    cfg = _config(corpus, tmp_path, "guided", guide_steps=10, ckpt_every=5, keep_checkpoints=10)
    ref = train(cfg)
    alphas = [h["guide_alpha"] for h in ref["history"]]
    assert alphas[0] == 1.0 and 0 < alphas[9] < 0.05 and alphas[10:] == [0.0] * 10
    # the guide's dense cost is counted while it is attached
    per_step = [b["flops"] - a["flops"] for a, b in zip(ref["history"], ref["history"][1:])]
    assert per_step[0] > per_step[-1] * 1.2
    # the saved model is purely structured, with the plain structured run's parameter count
    plain = train(_config(corpus, tmp_path, "plain", steps=2, eval_every=0))
    assert ref["model"]["params"] == plain["model"]["params"]
    saved = load_pretrained(tmp_path / "guided" / "model")
    assert len(structured_modules(saved)) == 6 and not any(isinstance(m, SelfGuided) for m in saved.modules())
    # resuming inside the guided phase and exactly at the switch reproduces the loss curve
    for k in (10, 5):
        res = _resume_from(cfg, k)
        assert _losses(res) == pytest.approx(_losses(ref), abs=1e-6, rel=0)


def test_reverse_sparsification_switches_to_dense_and_resumes(corpus, tmp_path):
    cfg = _config(corpus, tmp_path, "rev", densify_step=10, ckpt_every=5, keep_checkpoints=10)
    ref = train(cfg)
    saved = load_pretrained(tmp_path / "rev" / "model")
    assert not structured_modules(saved)
    dense = train(_config(corpus, tmp_path, "dense", steps=2, eval_every=0, mlp=None))
    assert ref["model"]["params"] == dense["model"]["params"]
    per_step = [b["flops"] - a["flops"] for a, b in zip(ref["history"], ref["history"][1:])]
    assert per_step[-1] > per_step[0] * 1.1  # dense after the switch costs more
    # no jump at the switch: the dense layer equals the structured one it replaced
    losses = _losses(ref)
    assert abs(losses[10] - losses[9]) < 0.5
    res = _resume_from(cfg, 10)
    assert _losses(res) == pytest.approx(losses, abs=1e-6, rel=0)


def test_method_settings_are_validated():
    with pytest.raises(ValueError, match="densify_step"):
        TrainConfig(mlp="lowrank:ratio=0.5", guide_steps=10, densify_step=5, steps=20)
    with pytest.raises(ValueError, match="structured layers"):
        TrainConfig(guide_steps=10, steps=20)
    with pytest.raises(ValueError, match="guide_steps <= steps"):
        TrainConfig(mlp="lowrank:ratio=0.5", guide_steps=30, steps=20)
    with pytest.raises(ValueError, match="parallel"):
        TrainConfig(parallel="zero3")


def _torchrun(cfg: dict, tmp: Path, nproc: int) -> dict:
    path = tmp / f"{Path(cfg['out_dir']).name}.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "structmat.train.cli", "--config", str(path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((Path(cfg["out_dir"]) / "results.json").read_text())


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_with_the_doubled_batch(corpus, tmp_path, parallel):
    steps = 8
    single = train(_config(corpus, tmp_path, "single", steps=steps, batch_size=8, eval_every=4))
    cfg = _config(corpus, tmp_path, f"two-{parallel}", steps=steps, batch_size=4, eval_every=4, parallel=parallel,
                  ckpt_every=4)
    both = _torchrun(cfg, tmp_path, 2)
    assert both["distributed"] == {"world_size": 2, "mode": parallel}
    assert both["history"][-1]["tokens"] == single["history"][-1]["tokens"]
    assert _losses(both) == pytest.approx(_losses(single), rel=2e-4, abs=0)
    assert [v["loss"] for v in both["validation"]] == pytest.approx(
        [v["loss"] for v in single["validation"]], rel=2e-4, abs=0)
    a = load_pretrained(tmp_path / "single" / "model").state_dict()
    b = load_pretrained(tmp_path / f"two-{parallel}" / "model").state_dict()
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=2e-4, rtol=2e-3)
    assert (tmp_path / f"two-{parallel}" / "loss.png").stat().st_size > 10_000
    # resuming the distributed run from its step-4 checkpoint (full tensors, re-sharded on load) is exact
    for p in checkpoint_paths(Path(cfg["out_dir"]) / "checkpoints", steps):
        p.unlink()
    again = _torchrun(cfg, tmp_path, 2)
    assert again["resumed_from"] == 4
    assert _losses(again) == pytest.approx(_losses(both), abs=1e-6, rel=0)


def test_train_compare_smoke(corpus, tmp_path):
    from structmat.bench import train_compare

    common = ["--preset", "5m", "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--warmup", "1",
              "--vocab-size", "400", "--corpus", str(corpus), "--eval-every", "2", "--eval-batches", "1",
              "--no-progress", "--work-dir", str(tmp_path / "runs"), "--cache-dir", str(corpus.parent / "cache")]
    assert train_compare.main([*common, "--only", "dense,lowrank,blockdiag-dense", "--out", str(tmp_path / "a")]) == 0
    (first,) = (tmp_path / "a").glob("train-compare-5m-*.json")
    # a second call adds a variant and the equal-wall runs, comparing against the first call's dense run
    assert train_compare.main([*common, "--only", "lowrank-sg", "--merge", str(first), "--equal-wall",
                               "--out", str(tmp_path / "b")]) == 0
    (report,) = (tmp_path / "b").glob("train-compare-5m-*.json")
    data = json.loads(report.read_text())
    runs = data["runs"]
    assert set(runs) == {"dense", "lowrank", "lowrank-sg", "blockdiag-dense"}
    assert runs["dense"]["from"] == first.name and "from" not in runs["lowrank-sg"]
    assert 0.45 < runs["lowrank"]["mlp_params"] / runs["dense"]["mlp_params"] < 0.55
    assert runs["blockdiag-dense"]["mlp_params"] == runs["dense"]["mlp_params"]  # dense after the switch
    assert runs["lowrank-sg"]["config"]["guide_steps"] == 1
    assert set(data["equal_wall"]) == {"lowrank", "blockdiag-dense"}
    assert all(r["steps"] >= 2 for r in data["equal_wall"].values())
    assert "val ppl" in data["table"] and "Equal wall time" in data["table"]
    assert report.with_suffix(".png").stat().st_size > 10_000
    assert train_compare.main(["--only", "nope"]) == 2
    # the mixer variants: a DeltaNet hybrid (layer 3 of the 5m preset keeps attention), with decode speed
    assert train_compare.main([*common, "--only", "deltanet-hybrid4", "--decode-prompt", "16",
                               "--out", str(tmp_path / "c")]) == 0
    (report,) = (tmp_path / "c").glob("train-compare-5m-*.json")
    run = json.loads(report.read_text())["runs"]["deltanet-hybrid4"]
    assert run["config"]["mixer"] == "deltanet" and run["config"]["attn_every"] == 4
    assert run["decode"]["decode_tokens_per_s"] > 0
