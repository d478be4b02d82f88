"""structmat finetune / heal: adapters-only training on a tiny causal LM, exact resume, distillation, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from structmat.adapters import load_adapter
from structmat.train.loop import list_checkpoints
from structmat.train.tune import TuneConfig, tune

from corpora import stdlib_corpus, tiny_llama_folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama (MiniLM's word-piece tokenizer, saved next to it) and a small stdlib corpus."""
    root = tmp_path_factory.mktemp("tune")
    tiny_llama_folder(root / "llama")
    return root, stdlib_corpus(root)


def _cfg(setup, out, **kw):
    root, corpus = setup
    base = dict(out_dir=str(root / out), model=str(root / "llama"), corpus=str(corpus), val_fraction=0.25,
                adapter="lowrank:rank=4", seq_len=32, batch_size=4, steps=6, lr=1e-2, warmup=2, eval_every=3,
                ckpt_every=2, eval_files=2, eval_window=32, max_files=8, progress=False, seed=1, threads=1)
    base.update(kw)
    return base


def test_finetune_trains_only_adapters_and_resumes_exactly(setup):
    full = tune(_cfg(setup, "full_run"))
    assert full["params"]["trainable"] == full["params"]["adapter"] > 0
    assert full["history"][-1]["loss"] < full["history"][0]["loss"]
    assert [v["step"] for v in full["validation"]] == [0, 3, 6]
    stopped = tune(_cfg(setup, "resumed", stop_after=4))
    assert stopped == {"stopped_at": 4}
    assert list_checkpoints(Path(setup[0] / "resumed" / "checkpoints"))[-1] == 4
    resumed = tune(_cfg(setup, "resumed"))
    assert resumed["resumed_from"] == 4
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    a = load_adapter_tensors(setup[0] / "full_run" / "adapter")
    b = load_adapter_tensors(setup[0] / "resumed" / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (setup[0] / "full_run" / "curves.png").stat().st_size > 0


def load_adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter.safetensors"))


def test_heal_distils_the_teacher_into_adapters_on_a_compressed_student(setup):
    import structmat
    from structmat.io import save_pretrained
    from transformers import AutoModelForCausalLM

    root, _ = setup
    student = AutoModelForCausalLM.from_pretrained(root / "llama")
    structmat.structurize(student, {r".*mlp\..*": "lowrank:rank=4"})
    save_pretrained(student, root / "student")
    res = tune(_cfg(setup, "heal", task="heal", model=str(root / "student"), teacher=str(root / "llama"),
                    tokenizer=str(root / "llama"), init="eora", calib_samples=8, steps=8, ckpt_every=0,
                    eval_every=4, merge=True))
    assert res["objective"] == "kl"
    losses = [h["loss"] for h in res["history"]]
    assert losses[-1] < losses[0]
    kl = [v["kl"] for v in res["validation"]]
    assert kl[-1] < kl[0]
    rows = res["merge"]["layers"]
    assert {r["base"] for r in rows if ".mlp." in r["name"]} == {"lowrank:rank=4"}
    assert {r["method"] for r in rows if ".mlp." not in r["name"]} == {"exact"}
    merged = structmat.load_pretrained(root / "heal" / "model")
    assert all(isinstance(m, structmat.LowRank) for n, m in structmat.surgery.structured_modules(merged).items())
    # the healed model's folder holds its tokenizer: it runs alone (structmat generate, no --tokenizer)
    from structmat.cli import main

    assert main(["generate", "--model", str(root / "heal" / "model"), "--max-new-tokens", "2", "--rounds", "1"]) == 0


def test_budget_places_ranks_where_the_error_is(setup):
    import structmat
    from structmat.io import save_pretrained
    from transformers import AutoModelForCausalLM

    root, _ = setup
    student = AutoModelForCausalLM.from_pretrained(root / "llama")
    structmat.structurize(student, {r".*layers\.0\.mlp\.down_proj": "lowrank:rank=2"})  # one layer damaged
    save_pretrained(student, root / "student1")
    res = tune(_cfg(setup, "budget", task="heal", model=str(root / "student1"), teacher=str(root / "llama"),
                    tokenizer=str(root / "llama"), init="eora", adapter_budget=0.05, calib_samples=8, steps=1,
                    ckpt_every=0, eval_every=0, extra_trainable=r".*norm\.weight"))
    assert res["params"]["trainable"] == res["params"]["adapter"] + 5 * 32  # + the 5 RMSNorm weights
    ranks = res["setup"]["ranks"]
    assert set(ranks) == {"model.layers.0.mlp.down_proj"}
    assert 0 < res["params"]["adapter"] <= 0.05 * res["params"]["linear"]


def test_cli_finetune_and_bad_flags(setup, capsys):
    from structmat.cli import main

    root, corpus = setup
    code = main(["finetune", "--model", str(root / "llama"), "--adapter", "kron:rank=2", "--corpus", str(corpus),
                 "--val-fraction", "0.25", "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-every",
                 "0", "--ckpt-every", "0", "--eval-files", "2", "--eval-window", "32", "--max-files", "4",
                 "--no-progress", "--out-dir", str(root / "cli")])
    assert code == 0
    assert "trainable params" in capsys.readouterr().out
    res = json.loads((root / "cli" / "results.json").read_text())
    assert res["setup"]["adapt"]["layers"][0]["delta"].startswith("kron")
    assert main(["heal", "--student", str(root / "llama"), "--teacher", str(root / "llama"), "--init", "lora",
                 "--out-dir", str(root / "bad")]) == 2
    with pytest.raises(ValueError, match="heal needs teacher"):
        TuneConfig(task="heal", model="x")
    with pytest.raises(ValueError, match="adapter_budget places adapters where the model differs most from teacher"):
        TuneConfig(model="x", adapter_budget=0.02)
    with pytest.raises(ValueError, match="adapter=full trains every weight"):
        TuneConfig(model="x", adapter="full", init="pissa")
    with pytest.raises(ValueError, match="adapter_budget places low-rank adapters"):
        TuneConfig(model="x", teacher="y", adapter="kron:rank=2", adapter_budget=0.02)


def test_adapter_table_plans_build_at_about_equal_params(setup):
    import copy

    from transformers import AutoModelForCausalLM

    from structmat.adapters import adapt
    from structmat.bench.adapter_table import _sizes, method_plans

    model = AutoModelForCausalLM.from_pretrained(setup[0] / "llama")
    sizes = _sizes(model, r".*layers\.\d+\..*")
    assert len(sizes) == 14
    counts = {}
    for name, (plan, opts) in method_plans(sizes, 4).items():
        if name == "full":
            continue
        m = copy.deepcopy(model)
        counts[name] = adapt(m, plan, init=opts["init"], alpha=opts.get("alpha"),
                             rslora=opts.get("rslora", False)).adapter_params
    lora = counts["lora"]
    assert counts["pissa"] == counts["rslora"] == lora
    for name in ("kron", "ldu", "rows", "splr"):
        assert 0.7 * lora <= counts[name] <= 1.3 * lora, (name, counts[name], lora)
    assert 0.7 * lora <= counts["randbasis"] <= 1.3 * lora  # r(in+out)/2 bases: 2 coefficients each


def test_hidden_weight_adds_the_per_block_error_of_every_layer():
    import copy

    from transformers import BertConfig, BertModel

    from structmat.train.tune import _Objective

    torch.manual_seed(0)
    teacher = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32), add_pooling_layer=False).eval()
    student = copy.deepcopy(teacher)
    batch = torch.randint(1, 50, (3, 7))
    batch[0, 5:] = 0  # padding
    cfg = TuneConfig(task="heal", model="x", teacher="t", loss="cosine", hidden_weight=2.0)
    plain = _Objective(TuneConfig(task="heal", model="x", teacher="t", loss="cosine"), "encoder", teacher, 0)
    both = _Objective(cfg, "encoder", teacher, 0)
    def value(objective):
        return float(objective(student, batch).detach())

    assert value(both) == pytest.approx(0.0, abs=1e-6)  # identical models: no error anywhere
    with torch.no_grad():
        student.encoder.layer[0].intermediate.dense.weight.mul_(1.5)  # only an early block differs
    extra = value(both) - value(plain)
    assert extra > 0
    with torch.no_grad():
        s = student(input_ids=batch, attention_mask=(batch != 0).long(), output_hidden_states=True).hidden_states
        t = teacher(input_ids=batch, attention_mask=(batch != 0).long(), output_hidden_states=True).hidden_states
    m = (batch != 0).unsqueeze(-1).float()
    expected = sum(float((((a - b) ** 2) * m).sum() / ((b ** 2) * m).sum()) for a, b in zip(s[1:], t[1:])) / 2
    assert extra == pytest.approx(2.0 * expected, rel=1e-4)
    with pytest.raises(ValueError, match="hidden_weight"):
        TuneConfig(task="heal", model="x", teacher="t", hidden_weight=-1.0)
    with pytest.raises(ValueError, match="needs task=heal"):
        TuneConfig(task="finetune", model="x", hidden_weight=1.0)


def test_time_cap_stops_training_and_ends_the_schedule(setup):
    res = tune(_cfg(setup, "capped", steps=50, max_seconds=1e-9, ckpt_every=0, eval_every=0, device="cpu"))
    # the first step always outlasts the cap: training stops after it, says so, and still evaluates the end point
    assert len(res["history"]) == 1 and "time cap" in res["stopped"]
    assert [v["step"] for v in res["validation"]] == [0, 1]
    lines = (setup[0] / "capped" / "validation.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1]
    from structmat.train.tune import _schedule_step

    cfg = TuneConfig(model="m", steps=100, max_seconds=10.0)
    assert _schedule_step(5, 6.0, cfg) == 60 and _schedule_step(80, 6.0, cfg) == 80  # the further of the two
    assert _schedule_step(5, 60.0, cfg) == 100
    with pytest.raises(ValueError, match="max_seconds"):
        TuneConfig(model="m", max_seconds=-1)
    with pytest.raises(ValueError, match="device"):
        TuneConfig(model="m", device="nodevice")


def test_coalesced_groups_give_the_same_adamw_updates_in_one_group_per_lr_mult_and_decay():
    from structmat.train.loop import coalesce_groups

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(5)]
    groups = [{"params": [p], "lr_mult": 1.0 if i < 4 else 2.0, "weight_decay": 0.1 if i % 2 else 0.0, "name": str(i)}
              for i, p in enumerate(params)]
    merged = coalesce_groups(groups)
    assert sorted((g["lr_mult"], g["weight_decay"], len(g["params"])) for g in merged) == [
        (1.0, 0.0, 2), (1.0, 0.1, 2), (2.0, 0.0, 1)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    by_id = {id(p): t for p, t in zip(params, twins)}
    per_param = torch.optim.AdamW([{**g, "params": [by_id[id(p)] for p in g["params"]]} for g in groups], lr=1e-2)
    coalesced = torch.optim.AdamW(merged, lr=1e-2)
    for opt, ps in ((per_param, twins), (coalesced, params)):
        for g in opt.param_groups:
            g["lr"] = 1e-2 * g["lr_mult"]
        for _ in range(3):
            sum((p * (i + 1)).square().sum() for i, p in enumerate(ps)).backward()
            opt.step()
            opt.zero_grad()
    for p, t in zip(params, twins):
        torch.testing.assert_close(p, t, rtol=0, atol=0)


def test_eval_tokens_bounds_the_causal_evaluation(setup, monkeypatch):
    """eval_tokens: every evaluation reads only the held-out stream's first N tokens (a CPU's bound on it); fewer
    than one window is refused; another count is another run (its resume key)."""
    import structmat.eval.perplexity as P
    from structmat.train.tune import TuneConfig, _resume_key

    seen, real = [], P.perplexity
    monkeypatch.setattr(P, "perplexity", lambda model, tokens, **kw: seen.append(tokens.numel()) or real(
        model, tokens, **kw))
    res = tune(_cfg(setup, "eval_tokens", steps=2, eval_every=1, ckpt_every=0, eval_tokens=64))
    assert len(res["validation"]) == 3 and seen == [64, 64, 64]
    with pytest.raises(ValueError, match="eval_tokens=16 is less than one eval_window of 32"):
        tune(_cfg(setup, "eval_tokens_short", eval_tokens=16))
    with pytest.raises(ValueError, match="eval_tokens must be an int >= 0"):
        TuneConfig(model="x", eval_tokens=-1)
    assert _resume_key(TuneConfig(model="x")) != _resume_key(TuneConfig(model="x", eval_tokens=64))
