"""Inference that keeps the savings: no hidden dense copies, merge_for_inference as an explicit choice."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn

import structmat
from structmat.inference import is_merged
from structmat.structures.blockdiag import BlockDiagonal
from structmat.structures.lowrank import LowRank
from structmat.structures.monarch import Monarch
from structmat.structures.sparse import NMSparse


def live_tensor_bytes() -> int:
    """Bytes of every distinct storage reachable from a live tensor (what a hidden cache would add)."""
    gc.collect()
    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # (isinstance on deprecated module attributes warns)
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in objects:
        try:
            if obj.device.type == "cpu" and not obj.is_sparse:
                st = obj.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
        except Exception:  # objects that only look like tensors
            continue
    return sum(seen.values())


def structured_mlp(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Monarch(64, 96, nblocks=4), nn.GELU(), LowRank(96, 64, rank=8), BlockDiagonal(64, 64, 4),
                         NMSparse(64, 32, n=2, m=4)).to(dtype)


def param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_memory_after_forward_is_params_plus_activations(backend):
    """After a forward, the structured model holds its parameters, and the output it returned: no dense copy."""
    model = structured_mlp()
    x = torch.randn(5, 64)
    with structmat.kernels.use_backend(backend):
        with torch.no_grad():
            model(x)  # warm-up: any cache a forward would make exists from here on
            before = live_tensor_bytes()
            y = model(x)
            after = live_tensor_bytes()
    assert after - before == y.numel() * y.element_size()
    assert not structmat.kernels.dispatch._dense_cache
    dense = sum(m.in_features * m.out_features * 4 for m in model if hasattr(m, "in_features"))
    assert param_bytes(model) < dense  # (the check is meaningful: a dense copy would be larger than the model)


def test_auto_never_picks_the_dense_merge():
    """The GPU cost model (H200 constants), at decode and prefill sizes, in inference and training: never 'dense'."""
    from structmat.kernels.dispatch import choose

    for n in (1, 8, 64, 2048, 8192):
        for f in (1024, 4096):
            for training in (False, True):
                b, c = 4, f // 16
                numel = 2 * b * b * c * (f // b)
                for op, kernels_ok in (("monarch", True), ("blockdiag", True), ("lowrank", False)):
                    pick = choose(op, n, f, f, 2.0 * n * numel, 2 * (numel + n * 4 * f), torch.bfloat16, b,
                                  training, training, kernels_ok)
                    assert pick != "dense", (op, n, f, training)


def test_merge_for_inference_is_explicit_and_reversible():
    model = structured_mlp(torch.float64).eval()
    x = torch.randn(7, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        base = live_tensor_bytes()
        added = structmat.merge_for_inference(model)
        layers = [m for m in model if isinstance(m, structmat.StructuredLinear)]
        assert added == sum(m.in_features * m.out_features * 8 for m in layers)  # the documented cost
        assert all(is_merged(m) for m in layers)
        assert live_tensor_bytes() - base == added
        y = model(x)
        assert torch.allclose(y, ref, rtol=1e-10, atol=1e-12)
        del y
    assert not any(k.endswith("merged_weight") for k in model.state_dict())  # never saved
    # a factor that needs a gradient: the factors' own path runs, and gradients reach the factors
    model[0].R.grad = None
    model(x).sum().backward()
    assert model[0].R.grad is not None and torch.isfinite(model[0].R.grad).all()
    # a changed factor: an error, not an answer computed from the old weight
    with torch.no_grad():
        model[2].U.mul_(2.0)
        with pytest.raises(ValueError, match="unmerge_for_inference"):
            model(x)
    assert structmat.unmerge_for_inference(model) == added
    assert not any(is_merged(m) for m in model)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert live_tensor_bytes() <= base
        model(x)


def test_merge_for_inference_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        structmat.merge_for_inference("model")
    layer = Monarch(16, 16, nblocks=4, device="meta")
    with pytest.raises(ValueError, match="meta"):
        structmat.merge_for_inference(nn.Sequential(layer))
