"""Contract tests inherited by every row of the shared structure table."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from safetensors.torch import load_file, save_file

import structmat
from structmat.structures.base import mup_std
from structure_table import REFS, ROW_IDS, ROWS
from tolerances import FORWARD_REL, GRAD_REL, INIT_STD_REL

rows = pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b).clamp_min(1e-300)).item()


def make(row, shape, dtype=torch.float64, bias=True, **kw):
    inn, out = shape
    return structmat.build(row.spec(inn, out), inn, out, bias=bias, dtype=dtype, **kw)


def with_random_bias(layer):
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.normal_()
    return layer


@rows
def test_forward_matches_independent_dense_reference(row):
    """On every drawn shape: to_dense() equals the independent reference and forward == x @ W^T + b."""
    @given(shape=row.shapes)
    def check(shape):
        layer = with_random_bias(make(row, shape))
        x = torch.randn(2, 3, layer.in_features, dtype=torch.float64)
        y = layer(x)
        assert y.shape == (2, 3, layer.out_features)
        ref_w = REFS[layer.name](layer)
        assert rel(layer.to_dense(), ref_w) < FORWARD_REL[torch.float64]
        assert rel(y, x @ ref_w.T + layer.bias) < FORWARD_REL[torch.float64]
    check()


@rows
def test_gradients_match_dense_reference(row):
    @given(shape=row.shapes)
    def check(shape):
        layer = with_random_bias(make(row, shape))
        x = torch.randn(4, layer.in_features, dtype=torch.float64, requires_grad=True)
        g = torch.randn(4, layer.out_features, dtype=torch.float64)
        params = [p for p in layer.parameters()]
        grads = torch.autograd.grad((layer(x) * g).sum(), [x, *params])
        ref = x @ REFS[layer.name](layer).T + layer.bias
        ref_grads = torch.autograd.grad((ref * g).sum(), [x, *params])
        for a, b in zip(grads, ref_grads):
            assert rel(a, b) < GRAD_REL[torch.float64]
    check()


@rows
def test_empty_batch_like_nn_linear(row):
    """An input with no rows (an empty batch, an expert that got no tokens) gives an empty output of the right shape
    and, in training, zero gradients, as nn.Linear does (Monarch and block-diagonal raised on a reshape before)."""
    layer = make(row, row.typical)
    for shape in ((0, layer.in_features), (2, 0, layer.in_features)):
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        assert y.shape == (*shape[:-1], layer.out_features)
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert all(p.grad is None or not p.grad.any() for p in layer.parameters())
        with torch.no_grad():
            assert layer(x).shape == y.shape


@rows
def test_input_in_another_dtype_is_a_type_error(row):
    """Outside autocast an input in another dtype than the layer's is refused with a TypeError naming the layer and
    the fix, as nn.Linear refuses it (the sparse layers computed in the input's dtype: integers gave integer garbage)."""
    layer = make(row, row.typical, dtype=torch.float32)
    for dtype in (torch.float64, torch.bfloat16, torch.int64):
        with pytest.raises(TypeError, match="differs from the layer's"):
            layer(torch.ones(3, layer.in_features, dtype=dtype))
    meta = make(row, row.typical, dtype=torch.float32, device="meta")  # (a device autocast does not know)
    with pytest.raises(TypeError, match="differs from the layer's"):
        meta(torch.ones(3, meta.in_features, dtype=torch.float64, device="meta"))


@rows
def test_counts_match_formulas(row):
    @given(shape=row.shapes)
    def check(shape):
        layer = make(row, shape)
        assert layer.param_count() == row.weight_params(layer) + layer.out_features
        for tokens in (1, 7):
            assert layer.flops(tokens) == row.weight_flops(layer, tokens) + tokens * layer.out_features
        assert row.weight_params(layer) < layer.in_features * layer.out_features or row.name == "dense"
    check()


@rows
def test_safetensors_round_trip(row, tmp_path):
    shape = row.typical
    layer = with_random_bias(make(row, shape, dtype=torch.float32))
    path = tmp_path / "layer.safetensors"
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(path))
    torch.manual_seed(123)  # a different fresh init (and support) for the receiving layer
    other = make(row, shape, dtype=torch.float32)
    other.load_state_dict(load_file(str(path)))
    x = torch.randn(3, layer.in_features)
    assert torch.equal(other(x), layer(x))


@rows
def test_meta_device_build_then_materialize(row):
    shape = row.typical
    layer = make(row, shape, dtype=torch.float32, device="meta")
    assert all(p.device.type == "meta" for p in layer.parameters())
    assert layer.to_dense().shape == (layer.out_features, layer.in_features)
    # a forward on the meta device too: no shape in it depends on the data (a boolean mask would: FixedSparse's did,
    # a host sync per block of rows on a GPU, and no CUDA graph capture)
    assert layer(torch.randn(3, 2, shape[0], device="meta")).shape == (3, 2, layer.out_features)
    assert layer.param_count() == row.weight_params(layer) + layer.out_features
    real = layer.to_empty(device="cpu").init_()
    x = torch.randn(2, real.in_features)
    assert torch.isfinite(real(x)).all()


@rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes_follow_the_layer_and_moves_work(row, dtype):
    shape = row.typical
    layer = with_random_bias(make(row, shape, dtype=torch.float64))
    x = torch.randn(6, layer.in_features, dtype=torch.float64)
    expected = layer(x)
    moved = layer.to(dtype)
    y = moved(x.to(dtype))
    assert y.dtype == dtype
    assert rel(y, expected) < FORWARD_REL[dtype]
    assert moved.to(torch.float64).to_dense().dtype == torch.float64


@rows
def test_init_is_mup_scaled_and_param_groups_cover_everything(row):
    inn, out = (4 * d for d in row.typical)  # large enough for a meaningful sample std
    layer = structmat.build(row.spec(inn, out), inn, out)
    layer.init_(torch.Generator().manual_seed(1))
    groups = layer.param_groups()
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in layer.parameters())
    assert all(g["lr_mult"] > 0 and math.isfinite(g["lr_mult"]) for g in groups)
    if row.fans is not None:
        assert layer._factors() == row.fans(layer)
    for pname, (fan_in, fan_out) in layer._factors().items():
        p = layer.get_parameter(pname)
        if p.numel() >= 100:
            expected = mup_std(fan_in, fan_out)
            assert abs(p.std().item() / expected - 1) < INIT_STD_REL, pname
    assert torch.count_nonzero(layer.bias) == 0


def test_every_registered_structure_has_a_row():
    assert {r.name.split("_")[0] for r in ROWS} == set(structmat.REGISTRY)


@rows
def test_autocast_dtype_is_followed(row):
    layer = with_random_bias(make(row, row.typical, dtype=torch.float32))
    x = torch.randn(5, layer.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert rel(y, layer(x)) < FORWARD_REL[torch.bfloat16]


def test_kron_saves_only_its_input_and_one_z_per_token_for_backward():
    """Compacter fine-tuning of SmolLM2 peaked at 90.7 GiB on an H200: broadcast batched products expanded x (r
    times) and A (once per token) and autograd saved those copies. The forward keeps x and one r * n1 * m2 block."""
    from structmat.structures.kronecker import KroneckerSum

    torch.manual_seed(0)
    layer = KroneckerSum(48, 96, rank=3, bias=False)  # a_shape 8 x 6 (m1 x n1), b_shape 12 x 8
    (m1, n1), (m2, n2) = layer.a_shape, layer.b_shape
    tokens = 64
    x = torch.randn(tokens, 48, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    per_token = (sum(saved) - layer.A.numel() - layer.B.numel()) / tokens
    assert per_token <= 48 + 3 * n1 * m2, (per_token, saved)
    y.square().sum().backward()
    assert layer.A.grad is not None and x.grad is not None
