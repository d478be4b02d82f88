"""adapt / merge / unmerge / adapter files: every delta kind, the inits, merges that keep the base's structure,
and the peft LoRA round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import structmat
from structmat.adapters import (adapt, adapter_modules, adapter_parameters, load_adapter, load_peft_lora, merge,
                                save_adapter, save_peft_lora, unmerge)
from structmat.adapters.core import AdaptedLinear, nm_violations
from structmat.calibrate import collect_input_stats
from tolerances import FORWARD_REL

KINDS = ["lowrank:rank=3", "kron:rank=2", "monarch:nblocks=4", "splr:rank=2,density=0.05", "sparse:density=0.05",
         "randbasis:rank=4,bases=6", "ldu:rank=3", "rows:k=4", "cols:k=4", "nm:n=1,m=4",
         "blockdiag:nblocks=4 * blockdiag:nblocks=4"]


class Tiny(nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(32, 48, dtype=dtype)
        self.down = nn.Linear(48, 32, dtype=dtype)
        self.head = nn.Linear(32, 8, dtype=dtype)

    def forward(self, x):
        return self.head(torch.tanh(self.down(torch.tanh(self.up(x)))))


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def randomize_deltas(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapter_modules(model).values():
            for p in a.delta.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def stats_for(model, names, x):
    return collect_input_stats(model, names, lambda: model(x))


@pytest.mark.parametrize("spec", KINDS)
def test_every_kind_starts_at_zero_trains_only_the_delta_and_round_trips(spec, tmp_path):
    model = Tiny()
    x = torch.randn(5, 32, dtype=torch.float64)
    before = model(x).detach()
    report = adapt(model, {r"up|down": spec})
    assert [r.name for r in report.rows] == ["up", "down"]
    assert torch.equal(model(x), before)  # zero start: exactly the base
    assert report.adapter_params == sum(p.numel() for p in adapter_parameters(model))
    assert report.adapter_params == sum(a.delta.param_count() for a in adapter_modules(model).values())
    model(x).square().sum().backward()
    trained = {id(p) for p in adapter_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in trained:
            assert p.requires_grad
        else:  # frozen base and the rest of the model: no weight gradient computed
            assert not p.requires_grad and p.grad is None, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_parameters(model))
    randomize_deltas(model)
    y = model(x).detach()
    assert rel(y, before) > 1e-6
    save_adapter(model, tmp_path / "ad", base_model="tiny")
    fresh = Tiny()
    load_adapter(fresh, tmp_path / "ad")
    assert rel(fresh(x), y) < FORWARD_REL[torch.float64]


def test_scaling_alpha_over_r_and_rslora():
    for rslora, expect in ((False, 16 / 8), (True, 16 / 8 ** 0.5)):
        model = Tiny()
        adapt(model, {"up": "lowrank:rank=8"}, alpha=16, rslora=rslora)
        a = adapter_modules(model)["up"]
        assert a.scale == pytest.approx(expect)
        randomize_deltas(model)
        x = torch.randn(3, 32, dtype=torch.float64)
        ref = a.base(x) + expect * x @ (a.delta.U @ a.delta.V).T
        assert rel(a(x), ref) < FORWARD_REL[torch.float64]


def test_pissa_reconstructs_the_base_exactly_and_starts_from_the_principal_part():
    model = Tiny()
    original = model.up.weight.detach().clone()
    x = torch.randn(6, 32, dtype=torch.float64)
    before = model(x).detach()
    adapt(model, {"up": "lowrank:rank=4"}, init="pissa", alpha=8)
    a = adapter_modules(model)["up"]
    assert rel(model(x), before) < FORWARD_REL[torch.float64]
    u, s, vh = torch.linalg.svd(original)
    principal = (u[:, :4] * s[:4]) @ vh[:4]
    assert rel(a.scale * a.delta.to_dense(), principal) < 1e-10
    assert rel(a.base.weight + a.scale * a.delta.to_dense(), original) < 1e-12


def test_pissa_with_stats_uses_the_whitened_split_and_still_reconstructs():
    model = Tiny()
    x = torch.randn(64, 32, dtype=torch.float64) * torch.linspace(0.1, 3, 32, dtype=torch.float64)
    stats = stats_for(model, ["up"], x)
    before = model(x).detach()
    adapt(model, {"up": "lowrank:rank=4"}, init="pissa", stats=stats)
    assert rel(model(x), before) < FORWARD_REL[torch.float64]


def test_eora_reduces_the_compression_error_on_the_calibration_inputs():
    original = Tiny()
    x = torch.randn(128, 32, dtype=torch.float64) @ torch.randn(32, 32, dtype=torch.float64)
    stats = stats_for(original, ["up", "down"], x)
    model = copy.deepcopy(original)
    structmat.structurize(model, {"up|down": "nm:n=2,m=4"})
    report = adapt(model, {"up|down": "lowrank:rank=4"}, init="eora", stats=stats, reference=original)
    for row in report.rows:
        assert row.output_error_after < 0.95 * row.output_error_before
    ref = original(x)
    adapted_error = rel(model(x), ref)
    with torch.no_grad():
        for a in adapter_modules(model).values():
            a.delta.zero_()
    assert adapted_error < rel(model(x), ref)


def test_merge_keeps_an_nm_base_exactly_nm_and_reports_its_error_then_unmerge_restores():
    model = Tiny()
    x = torch.randn(64, 32, dtype=torch.float64)
    structmat.structurize(model, {"up|down": "nm:n=2,m=4"})
    adapt(model, {"up|down": "lowrank:rank=4"})
    randomize_deltas(model)
    pairs = dict(adapter_modules(model))
    y = model(x).detach()
    report = merge(model)
    assert not adapter_modules(model)
    for name in ("up", "down"):
        layer = getattr(model, name)
        assert isinstance(layer, structmat.NMSparse) and layer.spec == "nm:n=2,m=4"
        assert nm_violations(layer) == 0
    for row in report.rows:
        assert row.nm_violations == 0 and 0 < row.weight_error < 1
        w_full = pairs[row.name].merged_weight()
        got = getattr(model, row.name).to_dense().detach()
        assert row.weight_error == pytest.approx(rel(got, w_full), rel=1e-9)
    assert unmerge(model) == 2
    assert getattr(model, "up") is pairs["up"] and torch.equal(model(x), y)


def test_merge_with_stats_is_calibrated_and_a_monarch_base_stays_monarch():
    model = Tiny()
    x = torch.randn(96, 32, dtype=torch.float64) @ torch.randn(32, 32, dtype=torch.float64)
    structmat.structurize(model, {"up": "monarch:nblocks=4", "down": "nm:n=2,m=4"})
    adapt(model, {"up|down": "lowrank:rank=4"})
    randomize_deltas(model)
    inner = {n: a.base for n, a in adapter_modules(model).items()}
    probe = copy.deepcopy(model)
    merge(probe)  # data-free merge, for comparison
    stats = {}
    h_up = x
    h_down = torch.tanh(model.up(x)).detach()
    from structmat.calibrate import InputStats

    stats["up"] = InputStats.empty(32).update(h_up)
    stats["down"] = InputStats.empty(48).update(h_down)
    report = merge(model, stats=stats)
    assert isinstance(model.up, structmat.Monarch) and model.up.spec == inner["up"].spec
    assert isinstance(model.down, structmat.NMSparse) and nm_violations(model.down) == 0
    rows = {r.name: r for r in report.rows}
    assert rows["up"].method == "whitened" and rows["down"].method == "sparsegpt"
    from structmat.project import output_error

    for name in ("up", "down"):
        free = output_error(unmerge_target(model, name), getattr(probe, name), stats[name])
        assert rows[name].output_error <= free * (1 + 1e-9)


def unmerge_target(model, name):
    return getattr(model, name).__dict__["_adapter_pair"].merged_weight()


def test_dense_merge_is_exact():
    model = Tiny()
    adapt(model, {"up": "kron:rank=2"})
    randomize_deltas(model)
    x = torch.randn(4, 32, dtype=torch.float64)
    y = model(x).detach()
    report = merge(model)
    assert isinstance(model.up, nn.Linear) and report.rows[0].weight_error < 1e-15
    assert rel(model(x), y) < FORWARD_REL[torch.float64]


def test_a_low_rank_base_with_a_low_rank_delta_merges_exactly_into_the_summed_rank():
    """Low rank + low rank is low rank of the summed ranks: the merge is exact (the projection back to the base's
    rank lost the healing: a SmolLM2 healed from 31.1 to 25.4 ppl merged to 35.7); where the summed rank would reach
    dense's size, an exact nn.Linear."""
    model = Tiny()
    structmat.structurize(model, {"up": "lowrank:rank=8", "down": "lowrank:rank=12"})
    adapt(model, {"up": "lowrank:rank=4", "down": "lowrank:rank=16"}, alpha=8.0)
    randomize_deltas(model)
    pairs = dict(adapter_modules(model))
    x = torch.randn(16, 32, dtype=torch.float64)
    y = model(x).detach()
    report = merge(model)
    rows = {r.name: r for r in report.rows}
    assert isinstance(model.up, structmat.LowRank) and model.up.rank == 12  # 8 + 4: exact
    assert rows["up"].method == "exact" and rows["up"].weight_error < 1e-12
    assert rel(model.up.to_dense(), pairs["up"].merged_weight()) < 1e-12
    # 12 + 16 = 28 > 48*32/(48+32) = 19.2: as large as dense, so dense holds the sum
    assert type(model.down) is nn.Linear and rows["down"].method == "exact" and rows["down"].weight_error < 1e-12
    assert rel(model(x), y) < FORWARD_REL[torch.float64]
    assert unmerge(model) == 2 and torch.equal(model(x), y)
    # sparse + low rank: its low-rank part grows, its sparse part stays as it was
    model = Tiny()
    structmat.structurize(model, {"up": "splr:rank=4,density=0.1"})
    adapt(model, {"up": "lowrank:rank=4"})
    randomize_deltas(model)
    pair = adapter_modules(model)["up"]
    y = model(x).detach()
    report = merge(model)
    assert isinstance(model.up, structmat.SparsePlusLowRank) and model.up.rank == 8
    assert torch.equal(model.up.sparse.to_dense(), pair.base.sparse.to_dense())
    assert report.rows[0].method == "exact" and report.rows[0].weight_error < 1e-12
    assert rel(model(x), y) < FORWARD_REL[torch.float64]
    assert unmerge(model) == 1 and torch.equal(model(x), y)


def test_bad_input_raises_before_changing_the_model():
    model = Tiny()
    with pytest.raises(ValueError, match="init must be one of"):
        adapt(model, {"up": "lowrank:rank=2"}, init="lora")
    with pytest.raises(ValueError, match="matches no linear layer"):
        adapt(model, {"nothing": "lowrank:rank=2"})
    with pytest.raises(ValueError, match=r"'down' \(48->32\) with delta monarch:nblocks=5.*valid nblocks.*not changed"):
        adapt(model, {"up": "lowrank:rank=2", "down": "monarch:nblocks=5"})
    assert isinstance(model.up, nn.Linear)
    with pytest.raises(ValueError, match="needs stats"):
        adapt(model, {"up": "lowrank:rank=2"}, init="eora")
    structmat.structurize(model, {"up": "lowrank:rank=4"})
    with pytest.raises(ValueError, match="pissa.*structured"):
        adapt(model, {"up": "lowrank:rank=2"}, init="pissa")
    adapt(model, {"up": "lowrank:rank=2"})
    with pytest.raises(ValueError, match="already has an adapter"):
        adapt(model, {"up": "lowrank:rank=2"})


# --- peft -------------------------------------------------------------------------------------------------------


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_a_peft_lora_loaded_into_structmat_gives_peft_logits(tmp_path):
    import peft
    base = tiny_llama()
    ids = torch.randint(0, 64, (2, 12))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False, lora_dropout=0.0, rank_pattern={"down_proj": 2})
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():
        expected = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    load_peft_lora(ours, tmp_path / "peft")
    assert len(adapter_modules(ours)) == 6
    with torch.no_grad():
        got = ours(ids).logits
    assert rel(got, expected) < FORWARD_REL[torch.float32]
    assert rel(expected, base(ids).logits.detach()) > 1e-3  # the adapter does change the logits


def test_structmat_lora_saved_for_peft_gives_the_same_logits_in_peft(tmp_path):
    import peft
    base = tiny_llama()
    ids = torch.randint(0, 64, (2, 12))
    ours = copy.deepcopy(base)
    adapt(ours, {r".*\.(q_proj|o_proj)": "lowrank:rank=4", r".*\.up_proj": "lowrank:rank=2"}, alpha=16, rslora=True)
    randomize_deltas(ours)
    with torch.no_grad():
        expected = ours(ids).logits
    save_peft_lora(ours, tmp_path / "lora")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora")).eval()
    with torch.no_grad():
        got = loaded(ids).logits
    assert rel(got, expected) < FORWARD_REL[torch.float32]
    with pytest.raises(ValueError, match="low-rank deltas on dense"):
        other = copy.deepcopy(base)
        adapt(other, {r".*\.q_proj": "kron:rank=2"})
        save_peft_lora(other, tmp_path / "bad")


def test_randbasis_layers_of_one_shape_and_seed_share_one_copy_of_their_fixed_bases():
    """NOLA/RandLoRA bases are fixed numbers regenerated from the seed: adapting every layer of a model keeps one
    copy per (shape, seed), not one per layer (SmolLM2's 210 layers would hold 16 GiB of equal bases)."""
    from structmat.structures.randbasis import RandomBasis, random_bases

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(12, 10), nn.Linear(10, 12))
    adapt(model, {r"\d": "randbasis:rank=2,bases=5"})
    deltas = [model[i].delta for i in range(3)]
    assert deltas[0].basis_a.data_ptr() == deltas[1].basis_a.data_ptr() != deltas[2].basis_a.data_ptr()
    a, b = random_bases(0, 5, 2, 12, 10, dtype=torch.float32)
    assert torch.equal(deltas[1].basis_a, a) and torch.equal(deltas[1].basis_b, b)
    a[0, 0, 0] += 1.0  # a caller's copy is its own
    assert not torch.equal(deltas[1].basis_a, a)
    with torch.no_grad():
        deltas[0].alpha.normal_()
        deltas[0].beta.normal_()
    x = torch.randn(3, 12)
    reference = x @ (torch.einsum("k,kor->or", deltas[0].beta, b) @ torch.einsum("k,kri->ri", deltas[0].alpha,
                                                                                   deltas[0].basis_a)).T
    torch.testing.assert_close(deltas[0]._matmul(x), reference)
    assert isinstance(deltas[0], RandomBasis)
