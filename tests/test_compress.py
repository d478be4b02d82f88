"""The compression pipeline on small HF models: layer-sequential calibration, the budget solver end to end,
save/load and perplexity after compression."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from structmat.compress import (Allowed, budget_plan, calibrate, candidates_for, compress_sequential, find_blocks,
                                matched_layers)
from structmat.eval.perplexity import perplexity
from structmat.io import load_pretrained, save_pretrained
from structmat.structures import StructuredLinear
from structmat.surgery import Plan, Target, dense_weight, linear_modules, structurize


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)).eval()


def batches(n=3, batch=2, seq=32, vocab=256):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)} for _ in range(n)]


BLOCK_PLAN = {r".*layers\.\d+\.(self_attn|mlp)\..*": Target("lowrank:ratio=0.5", "whitened"),
              r".*h\.\d+\.(attn|mlp)\..*": Target("lowrank:ratio=0.5", "whitened")}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_sequential_compression_saves_loads_and_evaluates(make, tmp_path):
    model = make()
    data = batches()
    report = compress_sequential(model, Plan.from_dict(BLOCK_PLAN), data)
    structured = [m for m in model.modules() if isinstance(m, StructuredLinear)]
    assert len(report.rows) == len(structured) > 0
    assert all(r.output_error is not None and 0 <= r.output_error < 1 for r in report.rows)
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    ids = data[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    stream = torch.randint(0, 256, (4 * 64 + 7,), generator=torch.Generator().manual_seed(2))
    result = perplexity(loaded, stream, window=64, batch_size=2)
    assert result["windows"] == 4 and result["ppl"] > 1


def test_sequential_calibrates_each_block_on_the_compressed_blocks_before_it():
    model, data = tiny_llama(), batches()
    expected = copy.deepcopy(model)
    plan = Plan.from_dict(BLOCK_PLAN)
    compress_sequential(model, plan, data)
    # By hand: block 0 on the original model's statistics, then block 1 on statistics of the half-done model.
    for block in (0, 1):
        here = {n: t for n, t in matched_layers(expected, plan).items() if n.startswith(f"model.layers.{block}.")}
        structurize(expected, Plan.exact(here), calibration=calibrate(expected, here, data))
    for (name, a), (_, b) in zip(model.named_parameters(), expected.named_parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
    # ... and that differs from one-shot statistics (all blocks on the original model).
    oneshot = tiny_llama()
    names = matched_layers(oneshot, plan)
    structurize(oneshot, plan, calibration=calibrate(oneshot, names, data))
    u_seq = model.get_parameter("model.layers.1.mlp.down_proj.U")
    u_one = oneshot.get_parameter("model.layers.1.mlp.down_proj.U")
    assert not torch.allclose(u_seq, u_one, atol=1e-5)


def test_find_blocks_on_three_architectures():
    assert find_blocks(tiny_llama())[0] == "model.layers"
    assert find_blocks(tiny_gpt2())[0] == "transformer.h"
    bert = BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64))
    assert find_blocks(bert)[0] == "encoder.layer"


def test_budget_solver_end_to_end_hits_the_target_and_beats_uniform_choices():
    model, data = tiny_llama(), batches()
    names = list(matched_layers(model, Plan.from_dict(BLOCK_PLAN)))
    stats = calibrate(model, names, data)
    allowed = [Allowed("lowrank", "whitened"), Allowed("monarch", "whitened", nblocks=4), Allowed("nm", "sparsegpt")]
    plan, chosen = budget_plan(model, allowed, stats, 0.5, names=names)
    dense_total = sum(c.dense_params for c in chosen.values())
    used = sum(c.params for c in chosen.values())
    assert 0.49 * dense_total <= used <= 0.5 * dense_total
    assert all(c.params <= c.dense_params for c in chosen.values())
    mix_error = sum(c.error for c in chosen.values())
    # Uniform 2:4 SparseGPT is one feasible assignment at exactly 50%: the solver's choice is at least as good.
    modules = linear_modules(model)
    uniform = 0.0
    for n in names:
        options = candidates_for(n, dense_weight(modules[n]), allowed, stats[n])
        uniform += next(c.error for c in options if c.spec.name == "nm" and (c.spec.n, c.spec.m) == (2, 4))
    assert mix_error <= uniform + 1e-12
    report = structurize(model, plan, calibration=stats)
    assert report.rows and all(r.new_params < r.old_params for r in report.rows)


def test_allowed_parsing_and_errors():
    assert Allowed.parse("monarch@whitened:nblocks=4") == Allowed("monarch", "whitened", 4)
    assert Allowed.parse("lowrank") == Allowed("lowrank", "data-free")
    with pytest.raises(ValueError, match="unknown structure 'butterfly'"):
        Allowed.parse("butterfly@whitened")
    with pytest.raises(ValueError, match="only nblocks="):
        Allowed.parse("monarch@whitened:rank=2")
    with pytest.raises(ValueError, match="target must lie in"):
        budget_plan(tiny_llama(), [Allowed("lowrank")], None, 1.5)
