"""Compressor: one call for uniform plans and budgets, caches across targets, sequential and offloaded modes
agree with the step-by-step pipeline; the projection registry; early validation of flags and plans."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from structmat.calibrate import InputStats
from structmat.compress import Allowed, Compressor, calibrate, check_plan, compress_sequential, parse_allow
from structmat.plan import Plan, Target
from structmat.project import METHODS, methods_for, price, project, register_projection
from structmat.project.registry import PROJECTIONS
from structmat.modules import linear_modules
from structmat.structures import LowRank
from tolerances import F32_AGREE_REL, F32_LOCAL_DESCENT_REL
from structmat.surgery import structurize

SCOPE = r".*layers\.\d+\..*"


def tiny_llama(layers=2):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def batches(n=2, batch=2, seq=16):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 128, (batch, seq), generator=g)} for _ in range(n)]


def logits(model, data):
    with torch.no_grad():
        return model(**data[0]).logits


def test_uniform_matches_structurize_on_one_shot_statistics_and_leaves_the_model_alone():
    model, data = tiny_llama(), batches()
    before = logits(model, data)
    plan = {SCOPE: Target("nm:n=2,m=4", "sparsegpt")}
    done = Compressor(model, data, SCOPE, stats_dtype=torch.float64).uniform(plan)
    assert torch.equal(logits(model, data), before)  # a copy was compressed
    ref = tiny_llama()
    names = [n for n in linear_modules(ref) if Plan.coerce(plan).match(n) is not None]
    structurize(ref, plan, calibration=calibrate(ref, names, data))
    torch.testing.assert_close(logits(done.model, data), logits(ref, data), rtol=1e-5, atol=1e-6)
    assert len(done.report.rows) == 14 and done.report.params_fraction == pytest.approx(0.5, abs=0.01)


def test_budget_reuses_statistics_and_prices_across_targets():
    model, data = tiny_llama(), batches()
    comp = Compressor(model, data, SCOPE)
    calls = {"n": 0}
    original = comp.statistics

    def counting():
        calls["n"] += 1
        return original()
    comp.statistics = counting
    fractions = [comp.budget(t, allow="lowrank@whitened,nm@sparsegpt").report.params_fraction for t in (0.3, 0.6)]
    assert fractions[0] < fractions[1] <= 0.6 + 1e-9 and fractions[0] <= 0.3 + 1e-9
    assert len(comp._prices) == 1  # priced once for both targets
    assert all(s.gram.dtype == torch.float32 for s in original().values())  # float32 statistics by default


def test_sequential_and_offloaded_modes_match_the_reference_pipeline():
    data = batches()
    plan = {SCOPE: Target("lowrank:ratio=0.5", "whitened")}
    ref = tiny_llama()
    compress_sequential(ref, Plan.coerce(plan), data)
    for kwargs in ({"sequential": True}, {"sequential": True, "offload": True, "device": "cpu"}):
        done = Compressor(tiny_llama(), data, SCOPE, stats_dtype=torch.float64, **kwargs).uniform(plan)
        torch.testing.assert_close(logits(done.model, data), logits(ref, data), rtol=1e-4, atol=1e-5)
    # one-shot statistics collected block by block (offload) equal the ones of one full forward pass
    model = tiny_llama()
    full = Compressor(model, data, SCOPE, stats_dtype=torch.float64).statistics()
    offloaded = Compressor(tiny_llama(), data, SCOPE, stats_dtype=torch.float64, offload=True,
                           device="cpu").statistics()
    for name, s in full.items():
        torch.testing.assert_close(offloaded[name].gram, s.gram, rtol=1e-10, atol=1e-9)
    assert offloaded["model.layers.0.self_attn.q_proj"] is offloaded["model.layers.0.self_attn.v_proj"]


def test_shared_inputs_are_factorized_once(monkeypatch):
    model, data = tiny_llama(1), batches()
    stats = Compressor(model, data, SCOPE).statistics()
    q = stats["model.layers.0.self_attn.q_proj"]
    assert q is stats["model.layers.0.self_attn.k_proj"]
    calls = {"n": 0}
    for name in ("eigh", "cholesky_ex"):  # the whitening factor: a checked Cholesky, or eigh where it fails
        original = getattr(torch.linalg, name)

        def counting(*a, _original=original, **k):
            calls["n"] += 1
            return _original(*a, **k)
        monkeypatch.setattr(torch.linalg, name, counting)
    for name in ("q_proj", "k_proj", "v_proj"):
        layer = getattr(model.model.layers[0].self_attn, name)
        project(layer.weight, "lowrank:rank=8", "whitened", q)
    assert calls["n"] == 1


def test_float32_projections_agree_with_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 48, generator=g, dtype=torch.float64) @ torch.randn(48, 48, generator=g,
                                                                             dtype=torch.float64)
    w = torch.randn(40, 48, generator=g)
    s64 = InputStats.empty(48).update(x)
    s32 = InputStats.empty(48, dtype=torch.float32).update(x)
    for spec, method in [("lowrank:rank=12", "whitened"), ("nm:n=2,m=4", "sparsegpt"), ("nm:n=2,m=4", "wanda"),
                         ("monarch:nblocks=4", "whitened")]:
        e64 = project(w, spec, method, s64).fit_info["output_error"]
        e32 = project(w, spec, method, s32).fit_info["output_error"]
        # whitened Monarch is a descent stopped after 10 sweeps: float32 rounding moves its path a little
        rel = F32_LOCAL_DESCENT_REL if spec.startswith("monarch") else F32_AGREE_REL
        assert e32 == pytest.approx(e64, rel=rel), (spec, method)


def test_guard_skips_methods_optimal_by_construction():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 24, generator=g, dtype=torch.float64)
    stats = InputStats.empty(24).update(torch.randn(100, 24, generator=g, dtype=torch.float64))
    assert "data_free_output_error" not in project(w, "lowrank:rank=4", "whitened", stats).fit_info
    assert "data_free_output_error" in project(w, "lowrank:rank=4", "asvd", stats).fit_info
    assert "data_free_output_error" in project(w, "lowrank:rank=4", "whitened", stats, guard=True).fit_info


def test_a_projection_registered_in_one_place_is_usable_everywhere():
    @register_projection("scaled-test", LowRank, needs_stats=True, options={"power": 1.0})
    def scaled(problem, power):
        scale = problem.stats.mean_abs.to(problem.w.dtype) ** power
        u, s, vh = torch.linalg.svd(problem.w * scale, full_matrices=False)
        layer = problem.new_layer()
        r = problem.config.rank
        with torch.no_grad():
            layer.U.copy_(u[:, :r])
            layer.V.copy_(u[:, :r].T @ problem.w)
        return layer
    try:
        assert "scaled-test" in methods_for("lowrank") and METHODS["scaled-test"] == ("lowrank",)
        model, data = tiny_llama(1), batches()
        comp = Compressor(model, data, SCOPE)
        done = comp.uniform({SCOPE: Target("lowrank:ratio=0.5", "scaled-test")})
        assert {r.method for r in done.report.rows} == {"scaled-test"}
        mix = comp.budget(0.5, allow=[Allowed("lowrank", "scaled-test")])
        assert mix.report.params_fraction <= 0.5 + 1e-9
        with pytest.raises(ValueError, match="takes no option"):
            project(model.model.layers[0].mlp.up_proj.weight, "lowrank:rank=4", "scaled-test",
                    comp.statistics()["model.layers.0.mlp.up_proj"], alpha=1)
    finally:
        PROJECTIONS.pop(("scaled-test", "lowrank"))


def test_price_of_a_ladder_matches_the_projections():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 32, generator=g, dtype=torch.float64)
    stats = InputStats.empty(32).update(torch.randn(200, 32, generator=g, dtype=torch.float64))
    configs = LowRank.size_ladder(32, 24)
    assert [c.rank for c in configs] == [8]
    prices = price(w, configs, "whitened", stats)
    assert prices[0] == pytest.approx(project(w, configs[0], "whitened", stats).fit_info["output_error"] ** 2,
                                      rel=1e-6)


def test_plans_and_allow_lists_are_checked_before_any_work():
    with pytest.raises(ValueError, match="has no argument"):
        parse_allow("monarch@whitened:nblock=4")
    with pytest.raises(ValueError, match="valid methods for monarch"):
        parse_allow("monarch@sparsegpt")
    assert [a.text for a in parse_allow("lowrank@whitened,monarch@whitened:nblocks=4,nm@sparsegpt")] == \
        ["lowrank@whitened", "monarch@whitened:nblocks=4", "nm@sparsegpt"]
    with pytest.raises(ValueError, match="plan entry"):
        check_plan({".*": Target("kron:rank=1", "whitened")})
    with pytest.raises(ValueError, match="matches no linear layer"):
        Compressor(tiny_llama(1), batches(), r"nothing\..*")
    with pytest.raises(ValueError, match="stats_dtype"):
        Compressor(tiny_llama(1), batches(), SCOPE, stats_dtype=torch.float16)


def test_cli_rejects_bad_flags_before_loading_and_runs_as_a_module(tmp_path, capsys):
    from structmat.cli import main

    missing = str(tmp_path / "missing")
    assert main(["compress", "--allow", "monarch@whitened:nblock=4", "--model", missing, "--out", str(tmp_path)]) == 1
    assert "has no argument(s) ['nblock']" in capsys.readouterr().err  # the flag, not the missing model
    assert main(["compress", "--model", missing, "--out", str(tmp_path)]) == 1
    assert "no such model folder" in capsys.readouterr().err
    assert main(["compress", "--device", "nonsense", "--out", str(tmp_path)]) == 2
    result = subprocess.run([sys.executable, "-m", "structmat", "compress", "--structure", "monarch@wanda",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "valid methods for monarch" in result.stderr


def test_fisher_monarch_minimizes_the_row_weighted_objective_and_registers_in_one_file():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=g, dtype=torch.float64)
    fisher = torch.rand(32, 48, generator=g, dtype=torch.float64) ** 4 * 10
    d = fisher.sum(dim=1).sqrt().unsqueeze(1)

    def weighted(layer):
        return float((d * (w - layer.to_dense().detach())).square().sum())
    fit = project(w, "monarch:nblocks=4", "fisher", fisher=fisher)
    assert "fisher" in methods_for("monarch")
    assert weighted(fit) < 0.99 * weighted(project(w, "monarch:nblocks=4"))
    # exact: each (s, k) block of the 4 x 4 grid is D_s^-1 [D_s W_sk]_c, computed independently here
    u, q, c = 32 // 4, 48 // 4, fit.c
    dense = fit.to_dense().detach()
    for s_ in range(4):
        for k in range(4):
            block = w[s_ * u:(s_ + 1) * u, k * q:(k + 1) * q]
            ds = d[s_ * u:(s_ + 1) * u]
            uu, ss, vh = torch.linalg.svd(ds * block, full_matrices=False)
            expect = (uu[:, :c] * ss[:c]) @ vh[:c] / ds
            torch.testing.assert_close(dense[s_ * u:(s_ + 1) * u, k * q:(k + 1) * q], expect, rtol=1e-8, atol=1e-10)


def test_demo_on_a_causal_lm_prints_the_perplexity_table_with_both_modes(tmp_path, capsys):
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from structmat.cli import main
    from structmat.data.corpus import minilm_tokenizer

    torch.manual_seed(0)
    tok = minilm_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tmp_path / "lm"), "--methods", "whitened SVD,N:M SparseGPT,budget mix",
                 "--targets", "0.5", "--calib-samples", "4", "--seq-len", "32", "--eval-files", "2",
                 "--eval-tokens", "256", "--eval-window", "64", "--out", str(out)]) == 0
    payload = json.loads((out / "demo.json").read_text())
    rows = payload["metrics"]
    assert {(r["mode"], r["method"]) for r in rows} == {(m, k) for m in ("one-shot", "sequential")
                                                        for k in ("whitened SVD", "N:M SparseGPT", "budget mix")}
    assert all(r["ppl"] > 1 and r["params_frac"] <= 0.5 + 1e-6 for r in rows) and payload["dense"]["ppl"] > 1
    assert len((out / "demo_rows.jsonl").read_text().splitlines()) == 1 + len(rows)
    assert (out / "demo_frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "| dense " in capsys.readouterr().out  # the dense row of the table


def test_batched_sparsegpt_projection_equals_each_layer_alone(monkeypatch, tiny_calibrated_llama):
    """On a GPU structurize fits the N:M SparseGPT layers of one shape together (structmat.project.prefit): the
    layers are the ones fitted alone. Forced on here (the CPU default fits each alone)."""
    from structmat import surgery

    model, names, stats = tiny_calibrated_llama()
    plan = {r".*layers\..*": Target("nm:n=2,m=4", "sparsegpt")}
    alone = copy.deepcopy(model)
    surgery.structurize(alone, plan, calibration=stats)
    fitted = []
    monkeypatch.setattr(surgery, "_prefit_pays", lambda work: True)
    from structmat.project import sparse

    real = sparse.prefit_sparsegpt
    monkeypatch.setattr(sparse._sparsegpt, "prefit", lambda problems, **o: fitted.append(len(problems)) or real(
        problems, **o))
    dims = []
    real_pass = sparse.sparsegpt
    monkeypatch.setattr(sparse, "sparsegpt", lambda w, *a, **k: dims.append(w.dim()) or real_pass(w, *a, **k))
    surgery.structurize(model, plan, calibration=stats)
    assert dims == [3, 3, 3, 3]  # every layer's fit came from a batched pass; none was redone alone
    assert sorted(fitted) == [3, 6, 6, 6]  # by shape over 3 blocks: q and o, k and v, gate and up, down
    got, ref = dict(model.named_modules()), dict(alone.named_modules())
    for name in names:
        assert torch.equal(got[name].index, ref[name].index), name
        assert torch.allclose(got[name].values, ref[name].values, rtol=1e-6, atol=1e-7), name


def test_output_sensitivity_tracks_activations_only_with_the_same_result():
    """With input embeddings to start from, no weight takes part in the backward pass (half the work, no weight
    gradients), and the sensitivities equal those of the path that tracks every weight."""
    from structmat.compress import output_sensitivity
    from structmat.modules import linear_modules

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    names = [n for n in linear_modules(model) if ".layers." in n]
    batches = [{"input_ids": torch.randint(0, 64, (2, 16))} for _ in range(2)]

    class Wrapped(torch.nn.Module):  # no get_input_embeddings: every weight is tracked
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    seen = []
    hook = model.lm_head.weight.register_hook(lambda g: seen.append(g))
    fast = output_sensitivity(model, names, batches)
    assert not seen  # no weight gradient was computed
    hook.remove()
    slow = output_sensitivity(Wrapped(model), ["inner." + n for n in names], batches)
    for n in names:
        assert fast[n] == pytest.approx(slow["inner." + n], rel=1e-12)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_batched_whitened_monarch_projection_equals_each_layer_alone(monkeypatch, tiny_calibrated_llama):
    """On a GPU structurize fits the whitened Monarch layers of one shape and size in one batched descent
    (structmat.project.prefit): each layer is its own descent's. Forced on here (the CPU fits each alone)."""
    from structmat import surgery

    model, names, stats = tiny_calibrated_llama(lambda name: "mlp" in name)
    plan = {r".*mlp\..*": Target("monarch:nblocks=4,block_rank=2", "whitened")}
    alone = copy.deepcopy(model)
    surgery.structurize(alone, plan, calibration=stats)
    monkeypatch.setattr(surgery, "_prefit_pays", lambda work: True)
    from structmat.project import monarch

    calls = []
    real = monarch.whitened_monarch_sizes
    monkeypatch.setattr(monarch, "whitened_monarch_sizes", lambda *a, **k: calls.append(1) or real(*a, **k))
    surgery.structurize(model, plan, calibration=stats)
    assert not calls  # every layer's fit came from a batched descent
    got, ref = dict(model.named_modules()), dict(alone.named_modules())
    for name in names:
        assert torch.allclose(got[name].to_dense(), ref[name].to_dense(), rtol=1e-6, atol=1e-9), name
        assert got[name].fit_info["output_error"] == pytest.approx(ref[name].fit_info["output_error"], rel=1e-6)
