"""The fla backend on the CPU: argument mapping and backend choice (the kernels themselves: test_mixers_fla_gpu.py).

fla has no CPU path, so the mapping (scale, beta, gate, sub-step order, padding, cu_seqlens, initial/final state) is
checked against a stand-in ``fla`` package with fla 0.6.0's documented signatures and semantics, written here as a
plain loop in fla's own layout and conventions (scale defaults to 1/sqrt(K), keys of a DeltaProduct interleaved
token-major, gate applied once per token before the first sub-step, state (N, H, K, V) in float32 for bf16 inputs).
A mapping mistake (a missing scale=1, a wrong interleave, a mask dropped) changes the result and fails these tests.
"""

import logging
import sys
import types

import pytest
import torch

from structmat.mixers import DeltaNet, DeltaProduct, GatedDeltaNet, delta_rule, fla_backend
from test_mixers import TOL, detached_copy, make_inputs, rrms, run


def _fla_loop(q, k, v, g, beta, nh, scale, h0, output_final_state, cu_seqlens):
    """fla's semantics: q (B,T,H,K), k/v/beta (B,T*nh,H,.), g (B,T,H) natural-log decay or None."""
    if cu_seqlens is not None:
        os_, hs = [], []
        cu = cu_seqlens.tolist()
        for i in range(len(cu) - 1):
            a, b = cu[i], cu[i + 1]
            o, h = _fla_loop(q[:, a:b], k[:, a * nh:b * nh], v[:, a * nh:b * nh], None if g is None else g[:, a:b],
                             beta[:, a * nh:b * nh], nh, scale, None if h0 is None else h0[i:i + 1], True, None)
            os_.append(o)
            hs.append(h)
        return torch.cat(os_, 1), (torch.cat(hs, 0) if output_final_state else None)
    B, T, H, K = q.shape
    V = v.shape[-1]
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    h = torch.zeros(B, H, K, V, dtype=cd) if h0 is None else h0.to(cd)
    out = []
    for t in range(T):
        if g is not None:
            h = h * g[:, t].to(cd).exp()[..., None, None]
        for j in range(nh):
            kt, vt, bt = k[:, t * nh + j].to(cd), v[:, t * nh + j].to(cd), beta[:, t * nh + j].to(cd)
            h = h + bt[..., None, None] * kt[..., None] * (vt - torch.einsum("bhkv,bhk->bhv", h, kt))[..., None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", h, q[:, t].to(cd) * scale))
    return torch.stack(out, 1).to(q.dtype), (h if output_final_state else None)


def _fake_fla(calls):
    def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                         cu_seqlens=None, **kw):
        assert beta.dim() == 3 and q.dtype == k.dtype == v.dtype
        calls.append("chunk_delta_rule")
        scale = k.shape[-1] ** -0.5 if scale is None else scale
        return _fla_loop(q, k, v, None, beta, 1, scale, initial_state, output_final_state, cu_seqlens)

    def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None, **kw):
        calls.append("chunk_gated_delta_rule")
        scale = k.shape[-1] ** -0.5 if scale is None else scale
        return _fla_loop(q, k, v, g, beta, 1, scale, initial_state, output_final_state, cu_seqlens)

    def chunk_gated_delta_product(q, k, v, g, beta, num_householder, scale=None, initial_state=None,
                                  output_final_state=False, cu_seqlens=None, **kw):
        B, T, H, K = q.shape
        assert k.shape == (B, T * num_householder, H, K) and beta.shape == (B, T * num_householder, H)
        calls.append("chunk_gated_delta_product")
        scale = K ** -0.5 if scale is None else scale
        return _fla_loop(q, k, v, g, beta, num_householder, scale, initial_state, output_final_state, cu_seqlens)

    mods = {name: types.ModuleType(name) for name in ("fla", "fla.ops", "fla.ops.delta_rule", "fla.utils",
                                                       "fla.ops.gated_delta_rule", "fla.ops.gated_delta_product")}
    mods["fla.ops.delta_rule"].chunk_delta_rule = chunk_delta_rule
    mods["fla.ops.gated_delta_rule"].chunk_gated_delta_rule = chunk_gated_delta_rule
    mods["fla.ops.gated_delta_product"].chunk_gated_delta_product = chunk_gated_delta_product
    mods["fla.utils"].IS_NVIDIA_HOPPER, mods["fla.utils"].TRITON_ABOVE_3_4_0 = True, True
    mods["fla.utils"].TRITON_ABOVE_3_7_1 = False
    return mods


@pytest.fixture
def fake_fla(monkeypatch):
    calls = []
    for name, mod in _fake_fla(calls).items():
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


# (B, T, H, Dk, Dv, n_h, gated, expected fla function)
MAPPING = [
    (2, 13, 2, 8, 6, 1, False, "chunk_delta_rule"),
    (2, 11, 3, 8, 5, 1, True, "chunk_gated_delta_rule"),
    (1, 9, 2, 6, 4, 2, False, "chunk_gated_delta_product"),
    (2, 7, 2, 6, 4, 3, True, "chunk_gated_delta_product"),
]


@pytest.mark.parametrize("B,T,H,Dk,Dv,nh,gated,fn", MAPPING)
def test_mapping_matches_reference(fake_fla, B, T, H, Dk, Dv, nh, gated, fn):
    """Outputs, final state and every gradient (initial state and gate included) equal the recurrent reference;
    beta spans (0, 2] so the eigenvalue range [-1, 1] is exercised."""
    inp = make_inputs(B, T, H, Dk, Dv, nh, gated, True, torch.float64, seed=3, beta_lo=0.0)
    k5 = inp["k"] if nh > 1 else inp["k"].unsqueeze(3)
    v5 = inp["v"] if nh > 1 else inp["v"].unsqueeze(3)
    b5 = inp["beta"] if nh > 1 else inp["beta"].unsqueeze(3)
    o, S = fla_backend.delta_rule_fla(inp["q"], k5, v5, b5, inp["log_gate"], inp["initial_state"], True)
    assert fake_fla == [fn]
    ref = detached_copy(inp)
    ro, rS, rg = run("recurrent", ref)
    tol = TOL[torch.float64]
    assert rrms(o, ro) < tol["out"] and rrms(S, rS) < tol["state"]
    g = torch.Generator().manual_seed(1)  # the same loss weights as run()
    wo = torch.randn(o.shape, generator=g, dtype=torch.float64)
    ws = torch.randn(S.shape, generator=g, dtype=torch.float64)
    names = [n for n, t in inp.items() if t is not None]
    grads = torch.autograd.grad((o * wo).sum() + (S * ws).sum(), [inp[n] for n in names])
    for n, gr in zip(names, grads):
        assert rrms(gr, rg[n]) < tol["grad"], n


@pytest.mark.parametrize("nh,gated", [(1, True), (2, False)])
def test_mapping_padding_and_varlen(fake_fla, nh, gated):
    """mask: padded tokens are identity steps with zero output; cu_seqlens: packed sequences with one initial and
    one final state each -- both equal the recurrent reference on the same arguments."""
    inp = make_inputs(2, 10, 2, 6, 4, nh, gated, True, torch.float64, seed=5, state=False)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    mask[1, 7:] = False  # right padding

    def five(t):
        return t if nh > 1 else t.unsqueeze(3)

    o, S = fla_backend.delta_rule_fla(inp["q"], five(inp["k"]), five(inp["v"]), five(inp["beta"]),
                                      inp["log_gate"], None, True, mask=mask)
    ro, rS = delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], inp["log_gate"], output_final_state=True,
                        mask=mask, backend="recurrent")
    assert rrms(o, ro) < TOL[torch.float64]["out"] and rrms(S, rS) < TOL[torch.float64]["state"]
    assert o[0, :3].abs().max() == 0 and o[1, 7:].abs().max() == 0

    packed = {n: None if t is None else t[:1].reshape(1, 10, *t.shape[2:]) for n, t in inp.items()}
    cu = torch.tensor([0, 4, 10])
    S0 = torch.randn(2, 2, 6, 4, dtype=torch.float64)
    o, S = fla_backend.delta_rule_fla(packed["q"], five(packed["k"]), five(packed["v"]), five(packed["beta"]),
                                      packed["log_gate"], S0, True, cu_seqlens=cu)
    ro, rS = delta_rule(packed["q"], packed["k"], packed["v"], packed["beta"], packed["log_gate"], S0, True,
                        cu_seqlens=cu, backend="recurrent")
    assert S.shape == (2, 2, 6, 4)
    assert rrms(o, ro) < TOL[torch.float64]["out"] and rrms(S, rS) < TOL[torch.float64]["state"]


def test_auto_runs_chunked_on_cpu_and_says_why_once(caplog):
    inp = make_inputs(1, 9, 2, 4, 4, 1, False, True, torch.float32, seed=2)
    with caplog.at_level(logging.INFO, logger="structmat.mixers"):
        fla_backend._logged.clear()
        o, S = delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], output_final_state=True, backend="auto")
        delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], backend="auto")
    ro, rS = delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], output_final_state=True, backend="chunked")
    assert torch.equal(o, ro) and torch.equal(S, rS)
    msgs = [r.getMessage() for r in caplog.records if "backend='auto'" in r.getMessage()]
    assert len(msgs) == 1 and "'chunked'" in msgs[0], msgs
    assert "not installed" in msgs[0] or "no cpu kernels" in msgs[0]


def test_fla_refuses_what_it_cannot_run(fake_fla, monkeypatch):
    monkeypatch.setattr(fla_backend, "fla_available", lambda: True)
    inp = make_inputs(1, 5, 2, 4, 4, 1, False, True, torch.float32, seed=2)
    with pytest.raises(ValueError, match="backend='fla'.*no cpu kernels"):
        delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], backend="fla")
    q = inp["q"].detach()
    assert "bf16/fp16" in fla_backend.fla_unsupported(q.to("meta"), q.to("meta"), q.to("meta"), False, False) \
        or "meta" in fla_backend.fla_unsupported(q.to("meta"), q.to("meta"), q.to("meta"), False, False)
    monkeypatch.setattr(fla_backend, "fla_available", lambda: False)
    with pytest.raises(ValueError, match="not installed"):
        delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], backend="fla")
    with pytest.raises(ValueError, match="unknown backend"):
        delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], backend="triton")


def test_gated_backward_refusal_follows_fla_flags(fake_fla, monkeypatch):
    """With fla's flags saying Hopper + Triton in [3.4, 3.7.1) (the stand-in's), a gated layer that needs
    gradients is refused and a forward-only call is not; the ungated delta rule is never refused for it."""
    fla_backend._gated_backward_refused.cache_clear()
    monkeypatch.setattr(fla_backend.importlib.util, "find_spec", lambda name: None)  # no tilelang
    try:
        assert fla_backend._gated_backward_refused()
    finally:
        fla_backend._gated_backward_refused.cache_clear()
    monkeypatch.setattr(fla_backend, "_gated_backward_refused", lambda: True)
    monkeypatch.setattr(fla_backend, "fla_available", lambda: True)

    class FakeCuda:  # only what fla_unsupported reads
        device = torch.device("cuda")
        dtype = torch.bfloat16
        shape = (1, 4, 2, 64)

    x = FakeCuda()
    assert "#640" in fla_backend.fla_unsupported(x, x, x, gated=True, needs_grad=True)
    assert fla_backend.fla_unsupported(x, x, x, gated=True, needs_grad=False) is None
    assert fla_backend.fla_unsupported(x, x, x, gated=False, needs_grad=True) is None
    x.shape = (1, 4, 2, 512)
    assert "<= 256" in fla_backend.fla_unsupported(x, x, x, gated=False, needs_grad=False)


def test_layers_show_the_backend_that_ran():
    for layer in (DeltaNet(16, 2, backend="auto"), GatedDeltaNet(16, 2, backend="auto"),
                  DeltaProduct(16, 2, n_householder=2, backend="auto")):
        assert "backend=auto" in repr(layer) and "last call ran" not in repr(layer)
        y, _ = layer(torch.randn(2, 5, 16))
        assert torch.isfinite(y).all()
        assert "backend=auto (last call ran chunked)" in repr(layer)
    with pytest.raises(ValueError, match="DeltaMixer: unknown backend 'flash'"):
        DeltaNet(16, 2, backend="flash")
