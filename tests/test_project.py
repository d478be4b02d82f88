"""Data-aware projections on the calibration objective tr(E H E^T)."""

import numpy as np
import pytest
import torch

import structmat.structures as S
from structmat.calibrate import InputStats
from structmat.project import METHODS, lowrank_error_curve, methods_for, output_error, project
from tolerances import CURVE_REL, FORWARD_REL, NEVER_WORSE_SLACK, OPTIMUM_REL
from tolerances import STRICT_GAIN as STRICT


def correlated(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """Mixed Gaussian inputs (strongly correlated channels) with a few large-magnitude outlier channels."""
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5
    x = z @ mix + 0.05 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    x[:, torch.randperm(d, generator=gen)[:3]] *= 15.0
    return x


def setup(out=24, inn=32, n=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=gen, dtype=torch.float64) / inn**0.5
    stats = InputStats.empty(inn).update(correlated(n, inn, gen))
    return w, stats


def fisher_for(w, seed=0):
    gen = torch.Generator().manual_seed(seed + 100)
    rows = torch.rand(w.shape[0], 1, generator=gen, dtype=torch.float64) ** 4 * 10 + 0.01
    return rows * torch.rand(w.shape, generator=gen, dtype=torch.float64)


# (spec, data-aware method, data-free counterpart, strictly better expected)
PAIRS = [
    ("lowrank:rank=6", "whitened", "data-free", True),
    ("lowrank:rank=6", "asvd", "data-free", False),
    ("lowrank:rank=6", "fisher", "data-free", False),
    ("nm:n=2,m=4", "wanda", "magnitude", False),
    ("nm:n=2,m=4", "sparsegpt", "magnitude", True),
    ("sparse:density=0.5", "wanda", "magnitude", False),
    ("sparse:density=0.5", "sparsegpt", "magnitude", True),
    ("monarch:nblocks=4", "whitened", "data-free", True),
    ("monarch:nblocks=3,pad=True", "whitened", "data-free", True),
    ("splr:rank=3,density=0.15", "whitened", "data-free", False),
]


@pytest.mark.parametrize("shape", [(24, 32), (40, 20)])
@pytest.mark.parametrize("spec,method,base,strict", PAIRS)
def test_never_worse_than_data_free(spec, method, base, strict, shape):
    w, stats = setup(*shape)
    fisher = fisher_for(w)
    ref = output_error(w, project(w, spec, base, stats), stats)
    layer = project(w, spec, method, stats, fisher=fisher)
    err = output_error(w, layer, stats)
    assert err <= ref * (1 + NEVER_WORSE_SLACK), (err, ref)
    assert layer.fit_info["output_error"] == pytest.approx(err, rel=1e-12)
    if strict:  # the raw algorithm, no fallback, beats data-free clearly on correlated inputs
        raw = project(w, spec, method, stats, guard=False)
        assert output_error(w, raw, stats) < STRICT * ref
        assert raw.fit_info["used"] == method


def test_whitened_lowrank_equals_independent_closed_form():
    w, stats = setup(24, 32)
    wn, hn = w.numpy(), stats.gram.numpy()
    chol = np.linalg.cholesky(hn)  # H = L L^T, full rank here: the objective is ||(W - W_hat) L||_F
    for rank in (1, 5, 11):
        u, s, vt = np.linalg.svd(wn @ chol, full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vt[:rank] @ np.linalg.inv(chol)
        layer = project(w, f"lowrank:rank={rank}", "whitened", stats, damp=0.0, guard=False)
        got = layer.to_dense().detach().numpy()
        assert np.linalg.norm(got - best) / np.linalg.norm(best) < OPTIMUM_REL * 1e3
        optimum = np.sqrt((s[rank:] ** 2).sum() / (s**2).sum())
        assert output_error(w, layer, stats) == pytest.approx(optimum, rel=OPTIMUM_REL)


def test_whitened_lowrank_not_beaten_by_gradient_descent():
    w, stats = setup(12, 16, n=200, seed=3)
    rank = 3
    h = stats.gram / stats.count
    target = output_error(w, project(w, f"lowrank:rank={rank}", "whitened", stats, damp=0.0, guard=False), stats)
    for start in range(3):
        gen = torch.Generator().manual_seed(start)
        u = (torch.randn(12, rank, generator=gen, dtype=torch.float64) * 0.3).requires_grad_()
        v = (torch.randn(rank, 16, generator=gen, dtype=torch.float64) * 0.3).requires_grad_()
        opt = torch.optim.LBFGS([u, v], max_iter=300, tolerance_grad=1e-12, tolerance_change=1e-15,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            e = w - u @ v
            loss = ((e @ h) * e).sum()
            loss.backward()
            return loss

        opt.step(closure)
        assert output_error(w, (u @ v).detach(), stats) >= target * (1 - 1e-7)


@pytest.mark.parametrize("method", ["whitened", "data-free", "asvd", "fisher"])
@pytest.mark.parametrize("guard", [False, True])
def test_lowrank_error_curve_matches_projection(method, guard):
    w, stats = setup(20, 28)
    fisher = fisher_for(w)
    curve = lowrank_error_curve(w, stats, method, fisher=fisher, guard=guard, damp=1e-6)
    assert curve.shape == (21,) and curve[0].item() == pytest.approx(1.0) and curve[-1].item() < 1e-6
    assert bool((curve[1:] <= curve[:-1] + 1e-12).all()) or method in ("asvd", "fisher")
    for rank in (1, 4, 9):
        layer = project(w, f"lowrank:rank={rank}", method, stats, fisher=fisher,
                        **({} if method == "data-free" else {"guard": guard}))
        assert curve[rank].item() == pytest.approx(output_error(w, layer, stats), rel=CURVE_REL)
    if method == "data-free":  # without stats: relative Frobenius error of the truncated SVD
        plain = lowrank_error_curve(w, None, method)
        assert plain[4].item() == pytest.approx(project(w, "lowrank:rank=4").relative_error(w), rel=CURVE_REL)


@pytest.mark.parametrize("spec", ["nm:n=2,m=4", "nm:n=1,m=4", "nm:n=2,m=4,pad=True"])
def test_sparsegpt_mask_exact_and_beats_wanda(spec):
    w, stats = setup(24, 30 if "pad" in spec else 32)
    n, m = (int(spec.split("n=")[1][0]), 4)
    layer = project(w, spec, "sparsegpt", stats, guard=False)
    dense = layer.to_dense().detach()
    padded = torch.nn.functional.pad(dense, (0, layer.in_padded - dense.shape[1]))
    assert int((padded.reshape(24, -1, m) != 0).sum(-1).max()) <= n
    assert layer.values.numel() == 24 * layer.groups * n
    wanda = project(w, spec, "wanda", stats, guard=False)
    assert output_error(w, layer, stats) < output_error(w, wanda, stats)
    x = torch.randn(5, dense.shape[1], dtype=torch.float64)
    assert torch.allclose(layer(x), x @ dense.T, rtol=FORWARD_REL[torch.float64], atol=0)


def test_sparsegpt_unstructured_keeps_exactly_nnz():
    w, stats = setup(24, 32)
    layer = project(w, "sparse:density=0.3", "sparsegpt", stats, guard=False, blocksize=8)
    nnz = round(0.3 * 24 * 32)
    assert layer.values.numel() == nnz and int((layer.to_dense() != 0).sum()) <= nnz
    assert torch.equal(layer.index, layer.index.sort().values)


def test_dtype_device_bias_and_forward():
    w64, stats = setup(24, 32)
    w = w64.float()
    bias = torch.randn(24)
    for spec, method in [("lowrank:ratio=0.5", "whitened"), ("monarch:nblocks=4", "whitened"),
                         ("nm:n=2,m=4", "sparsegpt"), ("sparse:density=0.4", "wanda"),
                         ("splr:rank=2,density=0.1", "whitened"), ("lowrank:rank=4", "asvd")]:
        layer = project(w, spec, method, stats, bias=bias)
        assert layer.bias.dtype == torch.float32 and torch.equal(layer.bias.detach(), bias)
        assert all(p.dtype == torch.float32 for p in layer.parameters())
        x = torch.randn(3, 32)
        ref = x @ layer.to_dense().detach().T + bias
        assert torch.allclose(layer(x), ref, rtol=1e-4, atol=1e-5)
        assert "output_error" in layer.fit_info


def test_data_free_applies_to_every_structure():
    w, stats = setup(16, 16)
    for spec in ["dense", "lowrank:rank=3", "blockdiag:nblocks=2", "monarch:nblocks=4", "kron:rank=1",
                 "nm:n=2,m=4", "sparse:density=0.3", "blockdiag:nblocks=2 * blockdiag:nblocks=4"]:
        layer = project(w, spec)
        assert torch.equal(layer.to_dense().detach(), S.from_dense(w, spec).to_dense().detach())
    assert set(METHODS["data-free"]) == set(S.REGISTRY)
    # the built-in methods, in registration order (the registry is open: a method registered elsewhere, e.g. by
    # the README's example, is appended)
    assert methods_for("lowrank")[:4] == ["data-free", "whitened", "asvd", "fisher"]


def test_error_paths():
    w, stats = setup(24, 32)
    with pytest.raises(ValueError, match="valid methods for lowrank: data-free, whitened, asvd, fisher"):
        project(w, "lowrank:rank=4", "wanda", stats)
    with pytest.raises(ValueError, match="valid methods for kron: data-free"):
        project(w, "kron:rank=1", "whitened", stats)
    with pytest.raises(ValueError, match="unknown method"):
        project(w, "lowrank:rank=4", "svd-llm", stats)
    with pytest.raises(ValueError, match="needs calibration statistics"):
        project(w, "lowrank:rank=4", "whitened")
    with pytest.raises(ValueError, match="in_features=32.*in_features=24"):
        project(w.T.contiguous(), "lowrank:rank=4", "whitened", stats)
    with pytest.raises(ValueError, match="fisher="):
        project(w, "lowrank:rank=4", "fisher", stats)
    with pytest.raises(ValueError, match="shape"):
        project(w, "lowrank:rank=4", "fisher", stats, fisher=fisher_for(w).T)
    with pytest.raises(ValueError, match="valid options"):
        project(w, "lowrank:rank=4", "whitened", stats, alpha=0.3)
    bad = InputStats(stats.gram.clone(), stats.abs_sum.clone(), stats.count)
    bad.gram[3, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        project(w, "nm:n=2,m=4", "sparsegpt", bad)
    with pytest.raises(ValueError, match="no tokens"):
        project(w, "nm:n=2,m=4", "wanda", InputStats.empty(32))
    with pytest.raises(ValueError, match="needs stats"):
        lowrank_error_curve(w, None, "asvd")


def test_whitening_factor_cholesky_fast_path_and_eigh_fallback(caplog):
    from structmat.project._linalg import damped, whitening_factor

    w, stats = setup(24, 32)
    h = damped(stats.gram, 1e-6)
    s = whitening_factor(stats.gram, 1e-6)  # positive definite: the (lower-triangular) Cholesky factor
    assert torch.equal(s, s.tril()) and torch.allclose(s @ s.T, h, rtol=1e-10, atol=1e-10 * float(h.abs().max()))
    gen = torch.Generator().manual_seed(1)
    few = InputStats.empty(32).update(correlated(8, 32, gen))  # 8 tokens, 32 inputs: a singular Gram
    singular = damped(few.gram, 0.0)
    with caplog.at_level("DEBUG", logger="structmat.project._linalg"):
        root = whitening_factor(few.gram, 0.0)
    assert "eigh" in caplog.text  # Cholesky of a singular matrix fails: the clamped eigh root is used, and said
    assert torch.allclose(root @ root.T, singular, atol=1e-9 * float(singular.abs().max()))
    # and the projection on that singular Gram is still the exact optimum (tail of svd(W S))
    sv = torch.linalg.svdvals(w @ root)
    layer = project(w, "lowrank:rank=3", "whitened", few, damp=0.0)
    assert output_error(w, layer, few) == pytest.approx(float((sv[3:].square().sum() / sv.square().sum()).sqrt()),
                                                        rel=1e-6)


def test_whitening_factor_allocates_one_square_matrix():
    """The Cholesky factor overwrites the damped copy: besides the Gram, one n x n matrix is ever allocated (the
    1B-shape projection peak held a damped copy and a factor at once). Census of every op's output storage."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from structmat.project._linalg import whitening_factor

    n = 48
    _, stats = setup(24, n)
    gram = stats.gram.clone()
    seen: set[int] = set()

    class Census(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() >= n * n:
                    seen.add(t.untyped_storage().data_ptr())
            return out

    with Census():
        s = whitening_factor(gram, 1e-6)
    assert seen - {gram.untyped_storage().data_ptr()} == {s.untyped_storage().data_ptr()}
    assert gram.equal(stats.gram)  # the statistics are left as they were


def test_sparsegpt_inverse_factor_same_on_both_paths(caplog):
    from structmat.project._linalg import damped
    from structmat.project.sparse import inverse_cholesky_upper

    _, stats = setup(24, 32)
    fast = inverse_cholesky_upper(stats.gram, 0.01)
    hinv = torch.linalg.inv(damped(stats.gram, 0.01))
    assert torch.allclose(fast.T @ fast, hinv, rtol=1e-8, atol=1e-10 * float(hinv.abs().max()))
    bad = stats.gram.clone()
    bad[0, 1] = bad[1, 0] = 10 * float(bad.diagonal().max())  # indefinite: Cholesky fails, eigh clamps
    with caplog.at_level("DEBUG", logger="structmat.project.sparse"):
        upper = inverse_cholesky_upper(bad, 0.01)
    assert "eigh" in caplog.text and torch.isfinite(upper).all() and torch.equal(upper, upper.triu())


def _sparsegpt_column_by_column(w, upper, n, m, blocksize):
    """SparseGPT N:M as the reference writes it: every column's update applied at once to the rest of its block."""
    w = w.clone()
    kept = torch.ones_like(w, dtype=torch.bool)
    cols = w.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, u1 = w[:, i1:i2].clone(), upper[i1:i2, i1:i2]
        err, pruned = torch.zeros_like(w1), torch.zeros_like(w1, dtype=torch.bool)
        for j in range(i2 - i1):
            if j % m == 0:
                score = w1[:, j:j + m] ** 2 / u1.diagonal()[j:j + m] ** 2
                pruned[:, j:j + m].scatter_(1, score.topk(m - n, dim=1, largest=False).indices, True)
            q = w1[:, j].masked_fill(pruned[:, j], 0.0)
            e = (w1[:, j] - q) / u1[j, j]
            w1[:, j:] -= e.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            w1[:, j], err[:, j] = q, e
        w[:, i1:i2], kept[:, i1:i2] = w1, ~pruned
        w[:, i2:] -= err @ upper[i1:i2, i2:]
    return w, kept


def test_sparsegpt_group_updates_equal_column_by_column():
    from structmat.project.sparse import inverse_cholesky_upper, sparsegpt

    w, stats = setup(24, 64)
    upper = inverse_cholesky_upper(stats.gram, 0.01)
    got, kept = sparsegpt(w, stats.gram, nm=(2, 4), blocksize=32, upper=upper)
    ref, ref_kept = _sparsegpt_column_by_column(w, upper, 2, 4, 32)
    assert torch.equal(kept, ref_kept)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_sparsegpt_nm_batched_over_inputs_equals_each_alone():
    """A batch of N:M problems, each with its own Gram (the same layer of every block), in one pass: each result
    and each inverse-Hessian factor is the problem's own (also for an all-zero Gram, whose dead inputs are revived
    as the reference does)."""
    from structmat.project.sparse import inverse_cholesky_upper, sparsegpt

    problems = [setup(24, 32, seed=s) for s in range(3)]
    w = torch.stack([p[0] for p in problems])
    grams = torch.stack([p[1].gram for p in problems] + [torch.zeros(32, 32, dtype=torch.float64)])
    w = torch.cat([w, w[:1]])
    uppers = inverse_cholesky_upper(grams, 0.01)
    for b in range(4):
        assert torch.allclose(uppers[b], inverse_cholesky_upper(grams[b], 0.01), rtol=1e-10, atol=1e-12)
    batched, kept = sparsegpt(w, grams, nm=(2, 4), upper=uppers)
    for b in range(4):
        alone, kept_alone = sparsegpt(w[b], grams[b], nm=(2, 4))
        assert torch.equal(kept[b], kept_alone) and torch.allclose(batched[b], alone, rtol=1e-10, atol=1e-12)


def test_thin_svd_of_a_wide_matrix_through_qr_equals_the_svd():
    from structmat.project.lowrank import thin_svd

    gen = torch.Generator().manual_seed(3)
    for shape in [(6, 40), (6, 12), (12, 6), (9, 9)]:
        a = torch.randn(*shape, generator=gen, dtype=torch.float64) @ torch.diag(torch.logspace(0, -3, shape[1],
                                                                                               dtype=torch.float64))
        u, s, vh = thin_svd(a)
        s_ref = torch.linalg.svdvals(a)
        assert u.shape == (shape[0], min(shape)) and vh.shape == (min(shape), shape[1])
        assert torch.allclose(s, s_ref, rtol=1e-12, atol=1e-14)
        assert torch.allclose((u * s) @ vh, a, atol=1e-12)
        assert torch.allclose(u.T @ u, torch.eye(min(shape), dtype=a.dtype), atol=1e-12)
        assert torch.allclose(vh @ vh.T, torch.eye(min(shape), dtype=a.dtype), atol=1e-12)
        u_only, s_only, none = thin_svd(a, right=False)  # the same U and S without the right factor
        assert none is None and torch.equal(u_only, u) and torch.equal(s_only, s)


def test_whitened_projection_of_a_wide_layer_runs_no_wide_svd():
    """The 1B shape's down_proj (2048 x 8192) peaked in cuSOLVER's workspace for the SVD of its 2048 x 8192
    whitened weight. A wide weight's projection now runs every dense SVD on a square matrix of the smaller side
    (a QR of the transpose first): census of the SVDs' input shapes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    out, inn = 16, 64
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out, inn, generator=gen, dtype=torch.float64)
    stats = InputStats.empty(inn).update(correlated(400, inn, gen))
    shapes = []

    class Census(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "svd" in func._schema.name:
                shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    with Census():
        layer = project(w, "lowrank:rank=6", "whitened", stats)
    assert shapes and all(max(s) <= out for s in shapes), shapes
    sv = torch.linalg.svdvals(w @ torch.linalg.cholesky(stats.gram + 1e-6 * stats.gram.diagonal().mean()
                                                        * torch.eye(inn, dtype=torch.float64)))
    assert output_error(w, layer, stats) == pytest.approx(float((sv[6:].square().sum() / sv.square().sum()).sqrt()),
                                                          rel=1e-5)


def test_a_wide_layers_projection_holds_its_factor_and_three_weight_sized_matrices(monkeypatch):
    """The 1B shape's project stage peaked at 1.93 GB, neither in the whitening nor in the SVD: torch.isfinite on
    down_proj's 8192^2 Gram built |G| and three masks, and the report's relative_error five float64 copies of the
    2048 x 8192 weight. Census of the live bytes of every op output while structurize projects one wide layer
    (whitened low rank, the report's measurements in row chunks as at scale): at most the n x n Cholesky factor and
    three float32 weight-sized matrices (the weight, W S and small change), and the factor is gone afterwards."""
    import importlib.util
    from pathlib import Path

    from torch import nn

    import structmat.project as project_module
    import structmat.structures.base as base
    from structmat.plan import Target
    from structmat.surgery import structurize

    out, n = 64, 512
    monkeypatch.setattr(project_module, "OUTPUT_ERROR_CHUNK", 8 * n)
    monkeypatch.setattr(base, "RELATIVE_ERROR_CHUNK", 8 * n)
    gen = torch.Generator().manual_seed(0)
    stats = InputStats.empty(n, dtype=torch.float32).update(correlated(4 * n, n, gen).float())
    model = nn.Sequential(nn.Linear(n, out, bias=False)).to(torch.bfloat16)
    # the live-bytes census of benchmarks/experiments/blockwise_census.py, which measures the same at the 1B shape
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "experiments" / "blockwise_census.py"
    spec = importlib.util.spec_from_file_location("blockwise_census", path)
    census_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(census_module)

    with census_module.LiveBytes([*model.parameters(), stats.gram, stats.abs_sum]) as census:
        structurize(model, {"0": Target("lowrank:ratio=0.5", "whitened")}, calibration={"0": stats})
    factor, weight32 = n * n * 4, out * n * 4
    assert census.peak <= factor + 3 * weight32, (census.peak - factor) / weight32
    assert census.live < weight32  # the new layer's bf16 factors; the Cholesky factor was dropped
