"""Backend agreement for the generalized delta rule, and the mixers built on it (structmat.mixers).

Every check compares against the recurrent reference (the specification) with the relative RMS error
||x - ref||_2 / ||ref||_2, on outputs, final state and every input gradient. Tolerances: the one table below.
"""

import pytest
import torch

from structmat.mixers import (DeltaMixer, DeltaNet, DeltaProduct, DiagonalSSMMixer, GatedDeltaNet, MixerLM,
                              S4DKernel, beta_from_logits, delta_rule, diag_scan, diag_scan_recurrent, l2norm,
                              s4d_init)

# ---- the one tolerance table (relative RMS error vs the reference) --------------------------------------------
TOL = {
    torch.float64: {"out": 1e-10, "state": 1e-10, "grad": 1e-9},
    torch.float32: {"out": 2e-5, "state": 2e-5, "grad": 5e-5},
    torch.bfloat16: {"out": 2e-2, "state": 2e-2, "grad": 3e-2},  # bf16 inputs, fp32 internals, bf16 outputs/grads
}
LONG_T_REL = 1e-3  # T = 16384 with eigenvalues near -1, float32: chunked vs recurrent
LAYER_REL = 1e-9  # float64 layer identities (prefill+decode, padding, varlen)


def rrms(x, ref):
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "non-finite values"
    return ((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-300)).item()


def make_inputs(B, T, H, Dk, Dv, nh, gated, neg, dtype, seed=0, beta_lo=None, state=True):
    g = torch.Generator().manual_seed(seed)
    kshape = (B, T, H, nh, Dk) if nh > 1 else (B, T, H, Dk)
    vshape = (B, T, H, nh, Dv) if nh > 1 else (B, T, H, Dv)
    bshape = (B, T, H, nh) if nh > 1 else (B, T, H)
    q = torch.randn(B, T, H, Dk, generator=g, dtype=torch.float64)
    k = l2norm(torch.randn(*kshape, generator=g, dtype=torch.float64))
    v = torch.randn(*vshape, generator=g, dtype=torch.float64)
    if beta_lo is not None:  # beta in (beta_lo, 2]: eigenvalues 1 - beta in [-1, 1 - beta_lo)
        beta = beta_lo + (2 - beta_lo) * torch.rand(*bshape, generator=g, dtype=torch.float64)
    else:
        beta = beta_from_logits(torch.randn(*bshape, generator=g, dtype=torch.float64), neg)
    lg = -0.5 * torch.rand(B, T, H, generator=g, dtype=torch.float64) if gated else None
    S0 = torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64) if state else None
    cast = (lambda t: None if t is None else t.to(dtype).requires_grad_())
    return dict(q=cast(q), k=cast(k), v=cast(v), beta=cast(beta), log_gate=cast(lg), initial_state=cast(S0))


def run(backend, inp, seed=1, **kw):
    o, S = delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], inp["log_gate"], inp["initial_state"],
                      output_final_state=True, backend=backend, **kw)
    g = torch.Generator().manual_seed(seed)
    wo = torch.randn(o.shape, generator=g, dtype=torch.float64)
    ws = torch.randn(S.shape, generator=g, dtype=torch.float64)
    loss = (o.double() * wo).sum() + (S.double() * ws).sum()
    names = [n for n, t in inp.items() if t is not None]
    grads = torch.autograd.grad(loss, [inp[n] for n in names])
    return o, S, dict(zip(names, grads))


def detached_copy(inp, dtype=None):
    return {n: None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for n, t in inp.items()}


def assert_agree(inp, dtype, ref_dtype=None, **kw):
    """chunked on inp (dtype) vs recurrent on the same values (ref_dtype, default dtype)."""
    tol = TOL[dtype]
    o, S, gr = run("chunked", inp, **kw)
    ref_in = detached_copy(inp, ref_dtype)
    ro, rS, rg = run("recurrent", ref_in)
    assert o.dtype == inp["q"].dtype
    assert rrms(o, ro) < tol["out"], rrms(o, ro)
    assert rrms(S, rS) < tol["state"], rrms(S, rS)
    for n in rg:
        assert gr[n].dtype == inp[n].dtype
        assert rrms(gr[n], rg[n]) < tol["grad"], (n, rrms(gr[n], rg[n]))


# (name, B, T, H, Dk, Dv, n_h, gated, beta_lo, chunk)
CASES = [
    ("deltanet_beta_in_(1,2]", 2, 37, 2, 8, 6, 1, False, 1.0, 16),  # T not a multiple of the chunk
    ("deltanet_[0,1]", 2, 32, 2, 8, 8, 1, False, None, 8),
    ("gated_deltanet", 2, 29, 2, 8, 6, 1, True, 1.0, 16),
    ("deltaproduct_nh2", 1, 21, 2, 6, 5, 2, False, 1.0, 8),
    ("deltaproduct_nh3_gated", 2, 11, 1, 6, 5, 3, True, 1.0, 8),  # chunk not a multiple of n_h
    ("T=1", 2, 1, 2, 8, 6, 1, True, 1.0, 16),
    ("T=1_nh4", 1, 1, 2, 8, 6, 4, False, 1.0, 16),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_chunked_matches_recurrent(case, dtype):
    _, B, T, H, Dk, Dv, nh, gated, beta_lo, chunk = case
    inp = make_inputs(B, T, H, Dk, Dv, nh, gated, True, dtype, beta_lo=beta_lo)
    assert_agree(inp, dtype, chunk_size=chunk)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4]], ids=[CASES[i][0] for i in (0, 2, 4)])
def test_bf16_chunked_matches_float64_reference(case):
    _, B, T, H, Dk, Dv, nh, gated, beta_lo, chunk = case
    inp = make_inputs(B, T, H, Dk, Dv, nh, gated, True, torch.bfloat16, beta_lo=beta_lo)
    assert_agree(inp, torch.bfloat16, ref_dtype=torch.float64, chunk_size=chunk)


def test_gate_one_equals_no_gate():
    inp = make_inputs(2, 19, 2, 8, 8, 1, True, True, torch.float64, beta_lo=1.0)
    with torch.no_grad():
        inp["log_gate"].zero_()
    no_gate = dict(inp, log_gate=None)
    for backend in ("recurrent", "chunked"):
        o1, S1, _ = run(backend, inp, chunk_size=8) if backend == "chunked" else run(backend, inp)
        o2, S2, _ = run(backend, detached_copy(no_gate))
        assert rrms(o1, o2) < TOL[torch.float64]["out"] and rrms(S1, S2) < TOL[torch.float64]["state"]
    assert_agree(inp, torch.float64, chunk_size=8)


def _varlen_inputs(lens, nh, gated, dtype=torch.float64):
    inp = make_inputs(1, sum(lens), 2, 6, 5, nh, gated, True, dtype, beta_lo=1.0, state=False)
    g = torch.Generator().manual_seed(7)
    inp["initial_state"] = torch.randn(len(lens), 2, 6, 5, generator=g, dtype=dtype).requires_grad_()
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)))
    return inp, cu


@pytest.mark.parametrize("nh,gated", [(1, False), (1, True), (2, True)])
def test_varlen_matches_reference_and_padded(nh, gated):
    lens = [5, 1, 17, 9]
    inp, cu = _varlen_inputs(lens, nh, gated)
    tol = TOL[torch.float64]
    # packed: chunked vs the recurrent reference (which loops per sequence, an independent implementation)
    o, S, gr = run("chunked", inp, cu_seqlens=cu, chunk_size=8)
    ro, rS, rg = run("recurrent", detached_copy(inp), cu_seqlens=cu)
    assert rrms(o, ro) < tol["out"] and rrms(S, rS) < tol["state"]
    for n in rg:
        assert rrms(gr[n], rg[n]) < tol["grad"], n
    # packed vs a padded batch with a mask, right- and left-padded: same outputs and final states per sequence
    Tm = max(lens)
    for side in ("right", "left"):
        padded, mask = {}, torch.zeros(len(lens), Tm, dtype=torch.bool)
        for i, L in enumerate(lens):
            sl = slice(0, L) if side == "right" else slice(Tm - L, Tm)
            mask[i, sl] = True
        for n in ("q", "k", "v", "beta", "log_gate"):
            t = inp[n]
            if t is None:
                padded[n] = None
                continue
            z = torch.randn(len(lens), Tm, *t.shape[2:], dtype=t.dtype)  # garbage in the padding, not zeros
            for i, L in enumerate(lens):
                z[i, mask[i]] = t[0, cu[i]:cu[i + 1]].detach()
            padded[n] = z
        padded["initial_state"] = inp["initial_state"].detach()
        for backend in ("chunked", "recurrent"):
            po, pS = delta_rule(**padded, output_final_state=True, mask=mask, backend=backend, chunk_size=8)
            assert rrms(pS, rS) < tol["state"], (side, backend)
            for i, L in enumerate(lens):
                assert rrms(po[i, mask[i]], ro[0, cu[i]:cu[i + 1]]) < tol["out"], (side, backend, i)
            assert (po[~mask] == 0).all()


def test_mask_and_cu_seqlens_are_exclusive_and_backend_names_checked():
    inp, cu = _varlen_inputs([3, 4], 1, False)
    with pytest.raises(ValueError, match="not both"):
        delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], cu_seqlens=cu, mask=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown backend"):
        delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], backend="fast")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_prefill_then_decode_equals_full_sequence(dtype):
    inp = make_inputs(2, 23, 2, 8, 6, 2, True, True, dtype, beta_lo=1.0)
    a = {n: None if t is None else t.detach() for n, t in inp.items()}
    full, Sf = delta_rule(**a, output_final_state=True, backend="chunked", chunk_size=8)
    P = 15
    cut = {n: (t if n == "initial_state" or t is None else t[:, :P]) for n, t in a.items()}
    pre, S = delta_rule(**cut, output_final_state=True, backend="chunked", chunk_size=8)
    outs = [pre]
    for t in range(P, 23):
        step = {n: (None if v is None else v[:, t:t + 1]) for n, v in a.items() if n != "initial_state"}
        o, S = delta_rule(**step, initial_state=S, output_final_state=True, backend="recurrent")
        outs.append(o)
    tol = TOL[dtype]
    assert rrms(torch.cat(outs, 1), full) < tol["out"]
    assert rrms(S, Sf) < tol["state"]


def test_no_nan_at_T16384_with_eigenvalues_near_minus_one():
    T = 16384
    inp = make_inputs(1, T, 1, 4, 4, 1, False, True, torch.float32, beta_lo=1.999)
    o, S = delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], None, inp["initial_state"],
                      output_final_state=True, backend="chunked", chunk_size=64)
    (o.sum() + S.sum()).backward()
    for t in [o, S] + [inp[n].grad for n in ("q", "k", "v", "beta", "initial_state")]:
        assert torch.isfinite(t).all()
    with torch.no_grad():
        a = {n: None if t is None else t.detach() for n, t in inp.items()}
        ro, rS = delta_rule(**a, output_final_state=True, backend="recurrent")
    assert torch.isfinite(ro).all() and torch.isfinite(rS).all()
    assert rrms(o, ro) < LONG_T_REL and rrms(S, rS) < LONG_T_REL


def test_chunked_compiles_fullgraph():
    inp = make_inputs(1, 20, 2, 8, 8, 2, True, True, torch.float32, beta_lo=1.0)
    a = {n: t.detach() for n, t in inp.items()}

    def f(q, k, v, beta, log_gate, initial_state):
        return delta_rule(q, k, v, beta, log_gate, initial_state, output_final_state=True, backend="chunked",
                          chunk_size=8)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    o1, S1 = cf(**a)
    o2, S2 = f(**a)
    assert rrms(o1, o2) < TOL[torch.float32]["out"] and rrms(S1, S2) < TOL[torch.float32]["state"]
    b = {n: t.clone().requires_grad_() for n, t in a.items()}
    o, S = cf(**b)
    (o.sum() + S.square().sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in b.values())


# ---- diagonal SSM --------------------------------------------------------------------------------------------


def test_diag_scan_matches_loop_real_negative_and_complex():
    g = torch.Generator().manual_seed(0)
    a = 2 * torch.rand(3, 37, 5, generator=g, dtype=torch.float64) - 1
    b = torch.randn(3, 37, 5, generator=g, dtype=torch.float64)
    h0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    assert rrms(diag_scan(a, b, h0), diag_scan_recurrent(a, b, h0)) < 1e-12
    ac = torch.complex(a, torch.rand_like(a) * 0.5) * 0.7
    bc = torch.complex(b, b.flip(1))
    x1, x2 = diag_scan(ac, bc), diag_scan_recurrent(ac, bc)
    assert ((x1 - x2).abs().pow(2).mean().sqrt() / x2.abs().pow(2).mean().sqrt()).item() < 1e-12


def test_s4d_inits_and_zoh():
    log_re, im = s4d_init("s4d-lin", 2, 8)
    assert torch.allclose(torch.exp(log_re), torch.full((2, 4), 0.5)) and torch.allclose(im[0], torch.pi * torch.arange(4.0))
    _, im = s4d_init("s4d-inv", 1, 8)
    assert torch.allclose(im[0], (8 / torch.pi) * (8 / (2 * torch.arange(4.0) + 1) - 1))
    log_re, im = s4d_init("s4d-real", 1, 4)
    assert im is None and torch.allclose(torch.exp(log_re[0]), torch.arange(1.0, 5.0))
    k = S4DKernel(3, 4, "s4d-real").double()
    a, b, _ = k.discretize()
    dt = torch.exp(k.log_dt)
    A = -torch.exp(k.log_neg_re)
    for c in range(3):  # zero-order hold via the augmented matrix exponential [[A, B], [0, 0]]
        M = torch.zeros(5, 5, dtype=torch.float64)
        M[:4, :4] = torch.diag(A[c]) * dt[c]
        M[:4, 4] = dt[c]
        E = torch.linalg.matrix_exp(M)
        assert torch.allclose(torch.diagonal(E[:4, :4]), a[c]) and torch.allclose(E[:4, 4], b[c])
    with pytest.raises(ValueError):
        s4d_init("s4d-foo", 1, 4)


def test_selective_transitions_signed():
    m = DiagonalSSMMixer(16, 4, "selective", allow_neg_eigval=True)
    a, _, _ = m.ssm._params(torch.randn(2, 9, 16) * 5)
    assert (a < 0).any() and (a > -1).all() and (a < 1).all()
    m0 = DiagonalSSMMixer(16, 4, "selective", allow_neg_eigval=False)
    a0, _, _ = m0.ssm._params(torch.randn(2, 9, 16) * 5)
    assert (a0 > 0).all() and (a0 < 1).all()


# ---- layers ----------------------------------------------------------------------------------------------------

MIXERS = {
    "deltanet": lambda: DeltaNet(24, 2, allow_neg_eigval=True, chunk_size=8),
    "deltanet01": lambda: DeltaNet(24, 2, allow_neg_eigval=False, chunk_size=8),
    "gated_deltanet": lambda: GatedDeltaNet(24, 2, chunk_size=8),
    "deltaproduct3": lambda: DeltaProduct(24, 2, n_householder=3, chunk_size=8),
    "deltanet_recurrent": lambda: DeltaNet(24, 2, backend="recurrent"),
    "ssm_selective": lambda: DiagonalSSMMixer(24, 4, "selective"),
    "ssm_s4d_lin": lambda: DiagonalSSMMixer(24, 4, "s4d-lin"),
    "ssm_s4d_inv": lambda: DiagonalSSMMixer(24, 4, "s4d-inv"),
    "ssm_s4d_real": lambda: DiagonalSSMMixer(24, 4, "s4d-real"),
}


@pytest.mark.parametrize("name", list(MIXERS))
def test_layer_prefill_decode_and_left_padding(name):
    m = MIXERS[name]().double()
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    y, _ = m(x)
    y1, c = m(x[:, :9], use_cache=True)
    ys = [y1]
    for t in range(9, 13):
        yt, c = m.step(x[:, t], c)
        ys.append(yt[:, None])
    assert rrms(torch.cat(ys, 1), y) < LAYER_REL and c.seen == 13
    # left padding: the padded row reproduces the unpadded run on its real tokens
    xp = torch.cat([torch.randn(2, 4, 24, dtype=torch.float64), x], 1)
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[:, :4] = False
    yp, cp = m(xp, mask=mask, use_cache=True)
    assert rrms(yp[:, 4:], y) < LAYER_REL and (yp[:, :4] == 0).all()
    with pytest.raises(ValueError):
        m(xp.flip(1), mask=mask.flip(1), use_cache=True)  # right padding cannot carry a cache


def test_delta_layer_varlen_equals_separate_sequences():
    m = GatedDeltaNet(24, 2, chunk_size=8).double()
    xs = [torch.randn(1, L, 24, dtype=torch.float64) for L in (5, 11, 3)]
    cu = torch.tensor([0, 5, 16, 19])
    yv, _ = m(torch.cat(xs, 1), cu_seqlens=cu)
    ys = torch.cat([m(x)[0] for x in xs], 1)
    assert rrms(yv, ys) < LAYER_REL
    with pytest.raises(ValueError):
        m(torch.cat(xs, 1), cu_seqlens=cu, mask=torch.ones(1, 19))


def test_lm_decode_and_bf16_layers_finite():
    lm = MixerLM(11, 32, 2, lambda: DeltaProduct(32, 2, n_householder=2, chunk_size=16)).double()
    tok = torch.randint(0, 11, (2, 10))
    logits, _ = lm(tok)
    lp, caches = lm(tok[:, :6], use_cache=True)
    outs = [lp]
    for t in range(6, 10):
        lt, caches = lm.step(tok[:, t], caches)
        outs.append(lt[:, None])
    assert rrms(torch.cat(outs, 1), logits) < LAYER_REL
    for f in (lambda: DeltaNet(32, 2), lambda: GatedDeltaNet(32, 2), lambda: DiagonalSSMMixer(32, 4, "selective"),
              lambda: DiagonalSSMMixer(32, 4, "s4d-lin")):
        m = f().to(torch.bfloat16)
        x = torch.randn(2, 20, 32, dtype=torch.bfloat16, requires_grad=True)
        y, _ = m(x)
        y.float().square().mean().backward()
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all() and torch.isfinite(x.grad).all()
