"""Specs, configs, the budget form and every bad-input path: one clear ValueError/TypeError each."""

from __future__ import annotations

import json

import pytest
import torch

import structmat
from structmat.structures.base import config_from_dict, parse_spec
from tolerances import RATIO_ABS

ISSUE_SPECS = ["lowrank:rank=64", "monarch:nblocks=4", "monarch:nblocks=4,rank=2", "nm:n=2,m=4", "kron:rank=2",
               "splr:rank=32,density=0.05", "blockdiag:nblocks=4", "sparse:density=0.1", "dense",
               "blockdiag:nblocks=4 * nm:n=2,m=4 * blockdiag:nblocks=4", "kron:rank=3,a_shape=16x8"]


@pytest.mark.parametrize("spec", ISSUE_SPECS)
def test_spec_round_trips_through_string_and_json(spec):
    config = parse_spec(spec)
    assert parse_spec(config.spec) == config
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert parse_spec(config) is config


@pytest.mark.parametrize("spec", ["lowrank:rank=64", "monarch:nblocks=4", "kron:rank=2", "nm:n=2,m=4",
                                  "splr:rank=32,density=0.05", "blockdiag:nblocks=16 * nm:n=2,m=4 * blockdiag:nblocks=16"])
def test_build_and_from_dense_accept_string_and_config(spec):
    a = structmat.build(spec, 512, 256)
    b = structmat.build(parse_spec(spec), 512, 256)
    assert type(a) is type(b) and a.spec == b.spec
    assert a.param_count() < 512 * 256 + 256


@pytest.mark.parametrize("name", ["lowrank", "monarch", "blockdiag", "kron", "nm", "sparse", "splr"])
@pytest.mark.parametrize("shape", [(768, 768), (768, 3072), (3072, 768)])
def test_budget_form_hits_the_ratio(name, shape):
    inn, out = shape
    layer = structmat.build(f"{name}:ratio=0.5", inn, out, bias=False)
    frac = layer.param_count() / (inn * out)
    assert abs(frac - 0.5) < RATIO_ABS, (layer.spec, frac)
    w = torch.randn(out, inn) if name != "splr" else torch.randn(96, 128)
    if name == "splr":
        inn, out = 128, 96
    projected = structmat.from_dense(w, f"{name}:ratio=0.5")
    assert abs(projected.param_count() / (inn * out) - 0.5) < 2 * RATIO_ABS


def test_budget_form_via_classmethod_matches_spec():
    w = torch.randn(64, 96)
    a = structmat.LowRank.from_dense(w, ratio=0.25)
    b = structmat.from_dense(w, "lowrank:ratio=0.25")
    assert a.spec == b.spec and torch.allclose(a.to_dense(), b.to_dense())


# --- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, in_out, message", [
    ("blockdiag:nblocks=5", (768, 768), r"nblocks=5 does not divide .*valid nblocks: \[2, 3, 4, 6, 8.*pad=True"),
    ("monarch:nblocks=5", (768, 3072), r"does not divide.*valid nblocks"),
    ("nm:n=2,m=4", (766, 64), r"m=4 does not divide in_features=766.*valid m: \[2, 383, 766\]"),
    ("lowrank:rank=400", (768, 768), r">= dense .*use rank <= 383"),
    ("monarch:nblocks=2", (768, 768), r">= dense"),
    ("blockdiag:nblocks=1", (64, 64), r">= dense"),
    ("kron:rank=40", (36, 36), r">= dense"),
    ("kron:rank=1,a_shape=5x5", (36, 36), r"a_shape=5x5 must divide"),
    ("splr:rank=30,density=0.5", (64, 64), r">= dense"),
    ("blockdiag:nblocks=2 * dense * blockdiag:nblocks=2", (64, 64), r">= dense"),
    ("blockdiag:nblocks=3 * nm:n=2,m=4", (64, 64), r"factor 0 .*does not divide"),
])
def test_impossible_sizes_raise_value_error_naming_the_layer_and_fix(spec, in_out, message):
    with pytest.raises(ValueError, match=message):
        structmat.build(spec, *in_out)


def test_padding_is_explicit_and_counted():
    layer = structmat.build("blockdiag:nblocks=4,pad=True", 766, 64, bias=False)
    assert layer.param_count() == 4 * 16 * 192  # in padded 766 -> 768
    assert layer.flops(1) == 2 * 4 * 16 * 192


@pytest.mark.parametrize("spec, error, message", [
    ("butterfly:nblocks=4", ValueError, r"unknown structure 'butterfly'; valid structures: blockdiag, cols, dense, kron, ldu"),
    ("lowrank:rnak=4", ValueError, r"unknown key\(s\) rnak; valid keys: rank, ratio"),
    ("monarch:nblocks=4,blocks=2", ValueError, r"unknown key\(s\) blocks; valid keys: nblocks, rank"),
    ("lowrank:rank=four", ValueError, r"cannot read rank='four' as int"),
    ("lowrank:rank=0", ValueError, r"rank must be >= 1"),
    ("lowrank", ValueError, r"required keys: rank"),
    ("nm:n=4,m=4", ValueError, r"n=4 must be < m=4"),
    ("sparse:density=1.5", ValueError, r"strictly between 0 and 1"),
    ("lowrank:ratio=2", ValueError, r"ratio must lie strictly between 0 and 1"),
    ("lowrank:4", ValueError, r"write key=value"),
    ("monarch:nblocks=4,rank=2,block_rank=3", ValueError, r"either rank .* or block_rank"),
    ("lowrank:ratio=0.5 * nm:n=2,m=4", ValueError, r"ratio= is not supported inside a product"),
    ("product:factors=3", ValueError, r"write a product as its factors joined by"),
])
def test_bad_specs_raise_clear_errors(spec, error, message):
    with pytest.raises(error, match=message):
        structmat.build(spec, 64, 64)


def test_spec_of_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="string or a config object"):
        structmat.build(42, 64, 64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("spec", ["lowrank:rank=4", "monarch:nblocks=4", "nm:n=2,m=4", "splr:rank=2,density=0.1"])
def test_non_finite_weights_are_refused(bad, spec):
    w = torch.randn(32, 32)
    w[3, 5] = bad
    with pytest.raises(ValueError, match="1 NaN/Inf entries"):
        structmat.from_dense(w, spec)


def test_non_finite_bias_is_refused():
    with pytest.raises(ValueError, match="bias has NaN/Inf"):
        structmat.from_dense(torch.randn(8, 8), "lowrank:rank=2", bias=torch.tensor([float("nan")] * 8))


@pytest.mark.parametrize("weight, error, message", [
    ([[1.0, 2.0]], TypeError, "must be a torch.Tensor"),
    (torch.randn(8), ValueError, "must be 2-D"),
    (torch.ones(8, 8, dtype=torch.long), TypeError, "floating point"),
])
def test_malformed_weights_are_refused(weight, error, message):
    with pytest.raises(error, match=message):
        structmat.from_dense(weight, "lowrank:rank=2")


def test_wrong_input_width_names_the_layer():
    layer = structmat.build("monarch:nblocks=4", 64, 32)
    with pytest.raises(ValueError, match=r"Monarch\(in_features=64, out_features=32\): input has last dimension 63"):
        layer(torch.randn(2, 63))


def test_bias_of_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(8,\)"):
        structmat.from_dense(torch.randn(8, 8), "lowrank:rank=2", bias=torch.randn(7))


def test_from_linear_needs_a_linear():
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        structmat.LowRank.from_linear(torch.nn.Conv1d(3, 3, 1), rank=1)


def test_config_from_dict_resolves_only_registered_types():
    with pytest.raises(ValueError, match="unknown structure 'os.system'"):
        config_from_dict({"structure": "os.system", "rank": 1})
    with pytest.raises(ValueError, match="'structure' key"):
        config_from_dict({"rank": 1})
