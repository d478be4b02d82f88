"""The fla backend on a CUDA GPU (``pytest -m gpu``; needs flash-linear-attention installed): outputs, final state
and every gradient against the recurrent reference in float32 and against the chunked form, bf16 inputs.

Each comparison prints its relative RMS errors (run with ``-s`` to keep them in the log) and, when
``STRUCTMAT_GPU_TEST_LOG`` names a file, appends them to it as one JSON line at once (so a run cut short by its time
limit, or run under pytest-xdist, which hides ``-s`` output, keeps every figure it reached)."""

import json
import os

import pytest
import torch

from structmat.mixers import DeltaNet, DeltaProduct, GatedDeltaNet, beta_from_logits, delta_rule, fla_backend, l2norm
from test_mixers import TOL, rrms

pytestmark = pytest.mark.gpu

needs_fla = pytest.mark.skipif(not (torch.cuda.is_available() and fla_backend.fla_available()),
                               reason="needs a CUDA GPU and flash-linear-attention")
TOL_FLA = TOL[torch.bfloat16]  # the same bar as the chunked form's bf16 agreement


def _inputs(B, T, H, D, nh, gated, beta_range, state, seed):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)
    ks = (B, T, H, nh, D) if nh > 1 else (B, T, H, D)
    bs = (B, T, H, nh) if nh > 1 else (B, T, H)
    x = {"q": l2norm(torch.randn(B, T, H, D, device=dev, generator=g)),
         "k": l2norm(torch.randn(*ks, device=dev, generator=g)),
         "v": torch.randn(*ks, device=dev, generator=g),
         "beta": beta_from_logits(torch.randn(*bs, device=dev, generator=g), beta_range == "[-1,1]"),
         "log_gate": -0.3 * torch.rand(B, T, H, device=dev, generator=g) if gated else None,
         "initial_state": torch.randn(B, H, D, D, device=dev, generator=g) if state else None}
    return x


def _run(x, backend, dtype, grads=True, **kw):
    """bf16 (or float32) copies of x's q/k/v, float32 beta/gate/state; returns o, S and every gradient."""
    lp = {n: None if t is None else t.detach().to(dtype if n in ("q", "k", "v") else t.dtype, copy=True)
          .requires_grad_(grads) for n, t in x.items()}
    o, S = delta_rule(lp["q"], lp["k"], lp["v"], lp["beta"], lp["log_gate"], lp["initial_state"],
                      output_final_state=True, backend=backend, **kw)
    if not grads:
        return o, S, {}
    gen = torch.Generator(device=o.device).manual_seed(7)
    wo = torch.randn(o.shape, device=o.device, generator=gen)
    ws = torch.randn(S.shape, device=o.device, generator=gen)
    names = [n for n, t in lp.items() if t is not None]
    gr = torch.autograd.grad((o.float() * wo).sum() + (S.float() * ws).sum(), [lp[n] for n in names])
    return o, S, dict(zip(names, gr))


def _compare(label, got, ref, tol):
    o, S, gr = got
    ro, rS, rg = ref
    errs = {"o": rrms(o, ro), "S": rrms(S, rS), **{f"d{n}": rrms(gr[n], rg[n]) for n in gr}}
    print(f"\n{label}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    if os.environ.get("STRUCTMAT_GPU_TEST_LOG"):
        with open(os.environ["STRUCTMAT_GPU_TEST_LOG"], "a") as f:
            f.write(json.dumps({"case": label, "device": torch.cuda.get_device_name(), **errs}) + "\n")
    assert errs["o"] < tol["out"] and errs["S"] < tol["state"], errs
    for n in gr:
        assert errs[f"d{n}"] < tol["grad"], (n, errs)


# (B, T, H, D, n_h, gated, beta range, initial state)
CASES = [
    (2, 300, 4, 64, 1, False, "[0,1]", True),
    (2, 300, 4, 64, 1, False, "[-1,1]", False),
    (2, 257, 4, 64, 1, True, "[-1,1]", True),
    (2, 150, 4, 64, 2, False, "[-1,1]", True),
    (1, 120, 2, 64, 4, False, "[0,1]", False),
    (2, 150, 4, 64, 2, True, "[-1,1]", True),
]


@needs_fla
@pytest.mark.parametrize("B,T,H,D,nh,gated,beta_range,state", CASES)
def test_fla_matches_reference_and_chunked(B, T, H, D, nh, gated, beta_range, state):
    x = _inputs(B, T, H, D, nh, gated, beta_range, state, seed=T + nh)
    label = f"nh={nh} gated={gated} beta {beta_range} h0={state}"
    refused = fla_backend.fla_unsupported(x["q"].bfloat16(), x["k"].bfloat16(), x["v"].bfloat16(), gated, True)
    if refused:  # fla cannot run this backward here: 'fla' says so, 'auto' runs chunked; the forward still runs
        assert gated and "#640" in refused, refused
        with pytest.raises(ValueError, match="#640"):
            _run(x, "fla", torch.bfloat16)
        assert rrms(_run(x, "auto", torch.bfloat16)[0], _run(x, "chunked", torch.bfloat16)[0]) < 1e-6
        print(f"\n{label}: backward refused here ({refused}); forward only")
        with torch.no_grad():
            got = _run(x, "fla", torch.bfloat16, grads=False)
            _compare(label + " fwd vs recurrent fp32", got, _run(x, "recurrent", torch.float32, grads=False), TOL_FLA)
        return
    got = _run(x, "fla", torch.bfloat16)
    _compare(label + " vs recurrent fp32", got, _run(x, "recurrent", torch.float32), TOL_FLA)
    _compare(label + " vs chunked bf16", got, _run(x, "chunked", torch.bfloat16), TOL_FLA)


@needs_fla
@pytest.mark.parametrize("nh", [1, 2])
def test_fla_padding_and_varlen(nh):
    x = _inputs(2, 200, 4, 64, nh, False, "[-1,1]", False, seed=11)
    mask = torch.ones(2, 200, dtype=torch.bool, device="cuda")
    mask[0, :37] = False
    mask[1, 150:] = False
    _compare(f"nh={nh} padded", _run(x, "fla", torch.bfloat16, mask=mask),
             _run(x, "recurrent", torch.float32, mask=mask), TOL_FLA)
    packed = {n: None if t is None else t[:1] for n, t in x.items()}
    cu = torch.tensor([0, 63, 130, 200], device="cuda")
    packed["initial_state"] = torch.randn(3, 4, 64, 64, device="cuda")
    _compare(f"nh={nh} cu_seqlens", _run(packed, "fla", torch.bfloat16, cu_seqlens=cu),
             _run(packed, "recurrent", torch.float32, cu_seqlens=cu), TOL_FLA)


@needs_fla
@pytest.mark.parametrize("make", [lambda: DeltaNet(256, 4, backend="auto"),
                                  lambda: DeltaProduct(256, 4, n_householder=2, backend="auto"),
                                  lambda: GatedDeltaNet(256, 4, backend="auto")])
def test_layer_auto_uses_fla_in_bf16_and_agrees(make):
    torch.manual_seed(0)
    layer = make().cuda()
    ref = make().cuda()
    ref.load_state_dict(layer.state_dict())
    ref.backend = "chunked"
    x = torch.randn(2, 200, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, _ = layer(x)
        yr, _ = ref(x)
    expected = "chunked" if (layer.gated and fla_backend._gated_backward_refused()) else "fla"
    assert layer.backend_used == expected and f"last call ran {expected}" in repr(layer)
    y.float().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters() if p.requires_grad)
    print(f"\n{type(layer).__name__} gated={layer.gated} nh={layer.nh}: ran {expected}, "
          f"layer out vs chunked {rrms(y, yr):.2e}")
    assert rrms(y, yr) < TOL_FLA["out"]
    with torch.no_grad():  # float32 layers never go to fla
        layer(x)
    assert layer.backend_used == "chunked"
