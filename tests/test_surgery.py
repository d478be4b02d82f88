"""structurize / densify / plans on small randomly initialized HF models (CPU, seeded by conftest)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from structmat.structures import LowRankConfig, StructuredLinear
from structmat.surgery import (Plan, Report, Target, densify, linear_modules, structured_modules, structurize)


def tiny_llama(**kw) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_bert() -> BertModel:
    config = BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    return BertModel(config).eval()


def tokens(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(1))


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------


def test_string_pattern_is_a_full_regex_match():
    plan = Plan({r".*\.q_proj": "lowrank:rank=4"})
    assert plan.match("model.layers.0.self_attn.q_proj") == Target("lowrank:rank=4")
    assert plan.match("model.layers.0.self_attn.q_proj_extra") is None  # fullmatch, not search
    assert Plan({"q_proj": "dense"}).match("model.layers.0.self_attn.q_proj") is None
    assert Plan({"q_proj": "dense"}).match("q_proj") == Target("dense")


def test_list_pattern_matches_exact_names_and_suffixes():
    plan = Plan([(["q_proj", ".mlp.up_proj", "lm_head"], "dense")])
    assert plan.match("model.layers.3.self_attn.q_proj") is not None
    assert plan.match("model.layers.3.mlp.up_proj") is not None
    assert plan.match("lm_head") is not None
    assert plan.match("model.layers.3.self_attn.xq_proj") is None  # a suffix starts at a dot
    assert plan.match("model.layers.3.up_proj") is None


def test_none_skips_and_first_match_wins():
    plan = Plan([(r".*layers\.0\..*", None), (r".*_proj", "lowrank:rank=4"), (r".*q_proj", "dense")])
    assert plan.match("model.layers.0.self_attn.q_proj") is None
    assert plan.match("model.layers.1.self_attn.q_proj") == Target("lowrank:rank=4")
    assert plan.match("lm_head") is None
    model = tiny_llama()
    report = structurize(model, plan)
    swapped = set(structured_modules(model))
    assert swapped == {n for n in linear_modules(tiny_llama()) if ".layers.1." in n}
    assert set(report.skipped) == {n for n in linear_modules(tiny_llama()) if n not in swapped}
    assert report.unused_patterns == [r".*q_proj"]


def test_invalid_regex_names_the_pattern():
    with pytest.raises(ValueError, match=r"plan pattern '\.\*\(q_proj'"):
        Plan({r".*(q_proj": "dense"})


def test_plan_json_round_trip_and_version():
    plan = Plan([(r".*attention.*", "lowrank:ratio=0.5"), (["up_proj"], Target("monarch:nblocks=4", "whitened")),
                 (r".*o_proj", "blockdiag:nblocks=8 * nm:n=2,m=4 * blockdiag:nblocks=8"),
                 (r".*down", LowRankConfig(rank=3)), (r".*mlp.*", None)])
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["version"] == 1
    assert Plan.from_dict(data) == plan
    assert Plan.coerce(data) == plan
    assert Target("lowrank:rank=3") == Target(LowRankConfig(rank=3))
    with pytest.raises(ValueError, match="newer"):
        Plan.from_dict({"version": 2, "entries": []})
    with pytest.raises(ValueError):
        Target("nosuchstructure:rank=2")
    with pytest.raises(ValueError, match="method"):
        Target("dense", method="")


def test_exact_plan_does_not_match_suffixes():
    plan = Plan.exact({"layers.0.q_proj": "dense"})
    assert plan.match("layers.0.q_proj") is not None
    assert plan.match("model.layers.0.q_proj") is None
    assert plan.match("layersX0.q_proj") is None  # dots are literal


# ----------------------------------------------------------------------------------------------
# structurize
# ----------------------------------------------------------------------------------------------


def test_report_numbers_add_up():
    model = tiny_llama()
    dense_params = {n: sum(p.numel() for p in m.parameters()) for n, m in linear_modules(model).items()}
    report = structurize(model, {r".*self_attn\.[qkvo]_proj": "lowrank:ratio=0.5", r".*mlp\..*": "nm:n=2,m=4"})
    assert report.params_before == sum(dense_params.values())
    new = {n: m.param_count() for n, m in structured_modules(model).items()}
    assert {r.name for r in report.rows} == set(new)
    for row in report.rows:
        assert row.new_params == new[row.name]
        assert row.old_params == dense_params[row.name]
        assert row.old_flops == 2 * row.in_features * row.out_features  # Llama projections have no bias
        assert row.new_flops == structured_modules(model)[row.name].flops(1)
        assert 0 < row.weight_error < 1 and row.output_error is None and row.seconds >= 0
    assert set(report.skipped) == {"lm_head"}
    assert report.params_after == sum(new.values()) + dense_params["lm_head"]
    assert report.params_fraction == pytest.approx(report.params_after / report.params_before)
    assert 0.4 < report.params_fraction < 0.8
    data = json.loads(json.dumps(report.to_dict()))
    assert data["totals"]["params_fraction"] == pytest.approx(report.params_fraction)
    text = report.format()
    assert "model.layers.1.mlp.down_proj" in text and "nm:n=2,m=4" in text
    # A second call that structures lm_head: the concatenated report no longer lists it as skipped.
    second = structurize(model, Plan.exact({"lm_head": "lowrank:rank=8"}))
    both = Report.concat([report, second])
    assert both.params_before == report.params_before and len(both) == len(report) + 1
    assert both.skipped == {} and both.params_after == report.params_after - dense_params["lm_head"] + \
        second.rows[0].new_params


def test_gpt2_conv1d_swapped_exactly_with_dense():
    model = tiny_gpt2()
    names = linear_modules(model)
    assert isinstance(names["transformer.h.0.attn.c_attn"], Conv1D)
    x = tokens()
    with torch.no_grad():
        before = model(x).logits
    report = structurize(model, {r"transformer\.h\.\d+\..*": "dense"})
    assert len(report) == 8
    assert all(isinstance(m, StructuredLinear) for n, m in structured_modules(model).items())
    with torch.no_grad():
        after = model(x).logits
    assert torch.equal(before, after)
    assert all(r.weight_error == 0.0 for r in report.rows)
    assert report.params_fraction == 1.0


def test_gpt2_conv1d_lossy_error_is_reported():
    model = tiny_gpt2()
    conv = model.transformer.h[1].mlp.c_fc
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    report = structurize(model, Plan([(["h.1.mlp.c_fc"], "lowrank:rank=8")]))
    (row,) = report.rows
    assert (row.in_features, row.out_features) == (64, 256)
    layer = model.transformer.h[1].mlp.c_fc
    expected = torch.linalg.norm(weight.T.double() - layer.to_dense().double()) / torch.linalg.norm(weight.double())
    assert row.weight_error == pytest.approx(expected.item(), rel=1e-6)
    assert row.weight_error > 0.05
    assert torch.equal(layer.bias, bias)
    x = torch.randn(3, 64)
    ref = x @ weight + bias  # Conv1D semantics: y = x W + b
    assert torch.allclose(layer(x), x @ layer.to_dense().T + bias, rtol=1e-4, atol=1e-5)
    assert (layer(x) - ref).norm() / ref.norm() > 0.01


MIXED_PLAN = {r".*q_proj": "monarch:nblocks=4", r".*mlp.*": "lowrank:ratio=0.5", r".*v_proj": "nm:n=2,m=4"}


def test_densify_round_trip():
    model = tiny_llama()
    structurize(model, MIXED_PLAN)
    x = tokens()
    with torch.no_grad():
        structured = model(x).logits
    assert densify(model) == 10  # per block: q, v, gate, up, down
    assert structured_modules(model) == {}
    assert all(type(m) is nn.Linear for m in linear_modules(model).values())
    with torch.no_grad():
        dense = model(x).logits
    assert torch.allclose(structured, dense, rtol=1e-4, atol=1e-5)
    assert densify(model) == 0


def test_densify_only_the_named_structures():
    model = tiny_llama()
    structurize(model, MIXED_PLAN)
    x = tokens()
    with torch.no_grad():
        structured = model(x).logits
    before = structured_modules(model)
    with pytest.raises(ValueError, match="unknown structure name.*'nmm'"):
        densify(model, ("nm", "nmm"))
    assert structured_modules(model) == before  # the refused call changed nothing
    assert densify(model, "nm") == 2  # the v projection of each of the two blocks
    left = structured_modules(model)
    assert sorted({layer.name for layer in left.values()}) == ["lowrank", "monarch"] and len(left) == 8
    assert all(type(module) is nn.Linear for name, module in linear_modules(model).items() if name.endswith("v_proj"))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, structured, rtol=1e-4, atol=1e-5)
    assert densify(model, ["sparse"]) == 0


def test_impossible_size_names_the_module_and_changes_nothing():
    model = tiny_llama()
    state = state_copy(model)
    types = {n: type(m) for n, m in model.named_modules()}
    # q_proj layers are fine, but down_proj (128 -> 64) cannot take 3 Monarch blocks: the error comes late.
    plan = {r".*q_proj": "lowrank:rank=4", r".*down_proj": "monarch:nblocks=3"}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj") as info:
        structurize(model, plan)
    assert "Fix" in str(info.value) and "not changed" in str(info.value)
    assert {n: type(m) for n, m in model.named_modules()} == types
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in state.items())


def test_data_aware_method_without_calibration_is_a_clear_error():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*calibration"):
        structurize(model, {r".*q_proj": Target("lowrank:rank=4", "whitened")})
    assert structured_modules(model) == {}


def test_keeps_dtype_device_bias_and_mode():
    model = tiny_bert().to(torch.bfloat16)
    query = model.encoder.layer[0].attention.self.query
    bias = query.bias.detach().clone()
    structurize(model, Plan([(["query", "key"], "lowrank:rank=8")]), progress=True)
    swapped = structured_modules(model)
    assert len(swapped) == 4 and all(n.endswith(("query", "key")) for n in swapped)
    layer = model.encoder.layer[0].attention.self.query
    assert layer.bias.dtype == torch.bfloat16 and torch.equal(layer.bias, bias)
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    assert not layer.training
    with torch.no_grad():
        out = model(tokens()).last_hidden_state
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_tied_lm_head_is_untied_when_structured():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    wte = model.transformer.wte.weight.detach().clone()
    report = structurize(model, Plan([(["lm_head"], "lowrank:rank=16")]))
    assert isinstance(model.lm_head, StructuredLinear)
    assert model.config.tie_word_embeddings is False
    assert any("tie" in n for n in report.notes)
    model.tie_weights()  # must not put the embedding back into the structured layer
    assert "lm_head.weight" not in model.state_dict()
    assert torch.equal(model.transformer.wte.weight, wte)


def test_shared_module_is_replaced_everywhere():
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert list(linear_modules(model)) == ["0"]
    structurize(model, {"0": "lowrank:rank=2"})
    assert model[0] is model[2] and isinstance(model[2], StructuredLinear)


@pytest.fixture
def one_thread():
    # LAPACK SVDs with several threads on a shared 2-core CI machine can stall for seconds; one thread is steady.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_minilm_realistic(one_thread):
    from structmat.data.pretrained import load_minilm

    model = load_minilm()
    dense_linear = sum(sum(p.numel() for p in m.parameters()) for m in linear_modules(model).values())
    x = tokens(2, 16)
    with torch.no_grad():
        ref = model(x).last_hidden_state
    plan = {r"encoder\.layer\.\d+\.attention\.self\.(query|key)": "lowrank:ratio=0.5",
            r".*intermediate\.dense": "nm:n=2,m=4", r".*pooler.*": None}
    report = structurize(model, plan)
    assert len(report) == 18
    assert set(report.skipped) == set(linear_modules(model)) and "pooler.dense" in report.skipped
    fracs = [r.new_params / r.old_params for r in report.rows]
    assert all(0.45 < f <= 0.51 for f in fracs)
    assert report.params_before == dense_linear
    with torch.no_grad():
        out = model(x).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min()
    assert torch.isfinite(out).all() and cos > 0.5


def test_calibration_reports_output_error():
    from structmat.calibrate import collect_input_stats

    model = tiny_llama()
    names = [n for n in linear_modules(model) if n.endswith("q_proj")]
    x = tokens(4, 16)
    stats = collect_input_stats(model, names, lambda: model(x))
    report = structurize(model, {r".*q_proj": Target("lowrank:rank=8", "whitened")}, calibration=stats)
    assert len(report) == 2
    for row in report.rows:
        assert row.output_error is not None and 0 <= row.output_error < 1
