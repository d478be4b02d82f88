"""GaLoreAdamW: the projected update lies in the gradient's top singular subspace, the projector is refreshed on
schedule, Fira's residual is scaled and limited as specified, unprojected parameters are exact AdamW, state is plain
tensors that round-trip through ``weights_only`` loading, and a training run with it resumes exactly."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn

from structmat.train.galore import GaLoreAdamW, state_bytes, without_embeddings
from structmat.train.loop import checkpoint_paths, list_checkpoints, train

from corpora import STDLIB_FILES, stdlib_corpus

LR, SCALE = 0.1, 0.5


def _param(*shape, seed=0) -> nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    return nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64).float())


def _step_with(opt: torch.optim.Optimizer, params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def _span(basis: torch.Tensor) -> torch.Tensor:
    """The orthogonal projector onto the column span of ``basis`` (sign/rotation-free comparison of subspaces)."""
    return basis @ basis.mT


@pytest.mark.parametrize("shape", [(12, 40), (40, 12)])
def test_update_lies_in_the_gradients_top_singular_subspace(shape):
    p = _param(*shape)
    w0 = p.detach().clone()
    opt = GaLoreAdamW([p], lr=LR, rank=3, scale=SCALE, update_proj_gap=10)
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    _step_with(opt, [p], [grad])
    delta = (p.detach() - w0).double()
    u, _, vh = torch.linalg.svd(grad.double())
    proj = opt.state[p]["projector"].double()
    if shape[0] < shape[1]:  # left projection: (m, r) with the top left singular vectors
        assert proj.shape == (12, 3)
        torch.testing.assert_close(_span(proj), _span(u[:, :3]), atol=1e-5, rtol=0)
        torch.testing.assert_close(delta - _span(proj) @ delta, torch.zeros_like(delta), atol=1e-6, rtol=0)
        assert opt.state[p]["exp_avg"].shape == (3, 40)
    else:                    # right projection: (n, r) with the top right singular vectors
        assert proj.shape == (12, 3)
        torch.testing.assert_close(_span(proj), _span(vh[:3].mT), atol=1e-5, rtol=0)
        torch.testing.assert_close(delta - delta @ _span(proj), torch.zeros_like(delta), atol=1e-6, rtol=0)
        assert opt.state[p]["exp_avg"].shape == (40, 3)
    # first Adam step: N = R / (|R| + eps) ~ sign(R); the update is -lr * scale * P N
    low = proj.mT @ grad.double() if shape[0] < shape[1] else grad.double() @ proj
    n = low / (low.abs() + 1e-8)
    expect = proj @ n if shape[0] < shape[1] else n @ proj.mT
    torch.testing.assert_close(delta, -LR * SCALE * expect, atol=1e-5, rtol=1e-4)


def test_projector_is_refreshed_every_gap_steps_only():
    p = _param(10, 30)
    opt = GaLoreAdamW([p], lr=1e-3, rank=2, update_proj_gap=3)
    gen = torch.Generator().manual_seed(2)
    seen = []
    for _ in range(7):
        _step_with(opt, [p], [torch.randn(10, 30, generator=gen)])
        seen.append(opt.state[p]["projector"].clone())
    same = [torch.equal(a, b) for a, b in zip(seen, seen[1:])]
    # refreshes at steps 0, 3, 6 (0-based): the projector changes going into steps 3 and 6 only
    assert same == [True, True, False, True, True, False]
    assert int(opt.state[p]["step"]) == 7


def test_unprojected_parameters_are_exact_adamw():
    shapes = [(16,), (4, 50), (20, 30)]  # 1-D; smaller side <= rank; a matrix in a galore=False group
    mine = [_param(*s, seed=i) for i, s in enumerate(shapes)]
    ref = [nn.Parameter(p.detach().clone()) for p in mine]
    kw = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = GaLoreAdamW([{"params": mine[:2]}, {"params": mine[2:], "galore": False}], rank=4, **kw)
    base = torch.optim.AdamW(ref, **kw)
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        grads = [torch.randn(*s, generator=gen) for s in shapes]
        _step_with(opt, mine, grads)
        _step_with(base, ref, grads)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert all("projector" not in opt.state[p] for p in mine)


def test_weight_decay_is_decoupled_and_applies_to_the_full_weight():
    p = _param(8, 24)
    w0 = p.detach().clone()
    opt = GaLoreAdamW([p], lr=0.1, rank=2, weight_decay=0.5)
    _step_with(opt, [p], [torch.zeros(8, 24)])  # zero gradient: only the decay moves the weight
    torch.testing.assert_close(p.detach(), w0 * (1 - 0.1 * 0.5))


def test_fira_adds_the_scaled_residual_and_limits_its_growth():
    shape, r = (10, 32), 3
    gen = torch.Generator().manual_seed(4)
    g1 = torch.randn(*shape, generator=gen)
    a, b = _param(*shape), _param(*shape)
    plain = GaLoreAdamW([a], lr=LR, rank=r, scale=SCALE)
    fira = GaLoreAdamW([b], lr=LR, rank=r, scale=SCALE, residual="fira")
    w0 = b.detach().clone()
    _step_with(plain, [a], [g1])
    _step_with(fira, [b], [g1])
    proj = fira.state[b]["projector"]
    low = proj.mT @ g1
    n = low / (low.abs() + 1e-8)
    phi = n.norm(dim=0, keepdim=True) / (low.norm(dim=0, keepdim=True) + 1e-8)  # one factor per column
    residual = g1 - proj @ low
    torch.testing.assert_close(b.detach() - w0, -LR * SCALE * (proj @ n + phi * residual), atol=1e-5, rtol=1e-4)
    assert float(fira.state[b]["residual_norm"]) == pytest.approx(float((phi * residual).norm()), rel=1e-5)
    # the residual changes the step: it is no longer confined to the subspace
    assert not torch.allclose(a, b, atol=1e-4)
    # a gradient whose out-of-subspace part is 100x larger: the scaled residual's norm grows by at most 1%
    prev = float(fira.state[b]["residual_norm"])
    _step_with(fira, [b], [g1 + 100 * residual])
    assert float(fira.state[b]["residual_norm"]) == pytest.approx(1.01 * prev, rel=1e-5)


def test_fira_equals_galore_when_the_gradient_has_rank_at_most_r():
    gen = torch.Generator().manual_seed(5)
    a, b = _param(12, 30), _param(12, 30)
    plain = GaLoreAdamW([a], lr=LR, rank=3)
    fira = GaLoreAdamW([b], lr=LR, rank=3, residual="fira")
    left, right = torch.randn(12, 2, generator=gen), torch.randn(2, 30, generator=gen)
    for k in range(3):  # the same rank-2 subspace every step: nothing is left outside a rank-3 projection
        g = left @ (right + 0.1 * k)
        _step_with(plain, [a], [g])
        _step_with(fira, [b], [g])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_block_factors_are_projected_block_by_block():
    p = _param(3, 10, 24)
    w0 = p.detach().clone()
    opt = GaLoreAdamW([p], lr=LR, rank=2)
    grad = torch.randn(3, 10, 24, generator=torch.Generator().manual_seed(6))
    _step_with(opt, [p], [grad])
    proj = opt.state[p]["projector"]
    assert proj.shape == (3, 10, 2)
    delta = (p.detach() - w0)
    for k in range(3):
        u = torch.linalg.svd(grad[k])[0]
        torch.testing.assert_close(_span(proj[k]), _span(u[:, :2]), atol=1e-5, rtol=0)
        torch.testing.assert_close(_span(proj[k]) @ delta[k], delta[k], atol=1e-6, rtol=0)


def test_state_is_plain_tensors_that_load_with_weights_only_and_continue_exactly():
    params = [_param(16, 40, seed=1), _param(40, 16, seed=2), _param(16, seed=3)]
    clone = [nn.Parameter(p.detach().clone()) for p in params]
    kw = dict(lr=0.01, rank=4, update_proj_gap=2, residual="fira", weight_decay=0.01)
    opt = GaLoreAdamW(params, **kw)
    grads = [[torch.randn_like(p) for p in params] for _ in range(6)]
    for g in grads[:3]:
        _step_with(opt, params, g)
    assert all(isinstance(v, torch.Tensor) for st in opt.state.values() for v in st.values())
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in params]}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    with torch.no_grad():
        for c, w in zip(clone, saved["params"]):
            c.copy_(w)
    again = GaLoreAdamW(clone, **kw)
    again.load_state_dict(saved["opt"])
    for g in grads[3:]:  # step 4 refreshes the projector in both
        _step_with(opt, params, g)
        _step_with(again, clone, g)
    for a, b in zip(params, clone):
        assert torch.equal(a, b)


def test_state_is_smaller_than_adamw_for_large_matrices():
    p, q = _param(256, 512), _param(256, 512)
    galore, adamw = GaLoreAdamW([p], rank=16), torch.optim.AdamW([q])
    g = torch.randn(256, 512)
    _step_with(galore, [p], [g])
    _step_with(adamw, [q], [g])
    # moments (16 x 512) x2 + projector (256 x 16) vs moments (256 x 512) x2
    assert state_bytes(galore) < 0.1 * state_bytes(adamw)


def test_training_a_least_squares_problem_converges():
    torch.manual_seed(0)
    x = torch.randn(256, 48)
    target = x @ torch.randn(48, 32) * 0.5
    losses = {}
    for residual in ("none", "fira"):
        w = nn.Parameter(torch.zeros(48, 32))
        opt = GaLoreAdamW([w], lr=0.05, rank=4, update_proj_gap=10, scale=1.0, residual=residual)
        first = None
        for _ in range(200):
            loss = ((x @ w - target) ** 2).mean()
            first = first if first is not None else float(loss.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[residual] = float(loss.detach()) / first
    assert losses["none"] < 0.1 and losses["fira"] < 0.1


def test_bad_settings_and_non_finite_gradients_fail_loudly():
    p = _param(8, 24)
    for kw, match in [(dict(rank=0), "rank"), (dict(update_proj_gap=0), "update_proj_gap"),
                      (dict(residual="full"), "residual"), (dict(scale=0.0), "scale"),
                      (dict(betas=(0.9, 1.0)), "betas")]:
        with pytest.raises(ValueError, match=match):
            GaLoreAdamW([p], **kw)
    opt = GaLoreAdamW([p], rank=2)
    bad = torch.randn(8, 24)
    bad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        _step_with(opt, [p], [bad])


def test_embeddings_keep_plain_adamw():
    emb = nn.Embedding(50, 16)
    head = nn.Linear(16, 50, bias=False)
    body = nn.Linear(16, 16)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.body, self.head = emb, body, head

        def get_input_embeddings(self):
            return self.emb

        def get_output_embeddings(self):
            return self.head

    groups = without_embeddings(Tiny(), [{"params": [emb.weight, body.weight, head.weight], "name": "dense"},
                                         {"params": [body.bias], "name": "dense.no_decay"}])
    assert [g["name"] for g in groups] == ["dense", "dense.no_decay", "embeddings"]
    assert groups[0]["params"] == [body.weight] and groups[2]["params"] == [emb.weight, head.weight]
    assert groups[2]["galore"] is False and "galore" not in groups[0]


# ------------------------------------------------------------------------------------------------ the trainer
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return stdlib_corpus(tmp_path_factory.mktemp("galore"), STDLIB_FILES[:8])


def test_training_with_galore_fira_resumes_exactly(corpus, tmp_path):
    cfg = dict(out_dir=str(tmp_path / "galore"), corpus=str(corpus), val_fraction=0.25, vocab_size=384, seq_len=48,
               batch_size=8, steps=12, lr=3e-3, warmup=2, eval_every=0, ckpt_every=4, keep_checkpoints=10,
               cache_dir=str(corpus.parent / "cache"), mlp="lowrank:ratio=0.5", threads=1, progress=False,
               model_overrides={"num_hidden_layers": 2}, seed=3, optimizer="galore", galore_rank=8,
               galore_gap=5, galore_residual="fira")
    ref = train(cfg)
    losses = [h["loss"] for h in ref["history"]]
    assert losses[-1] < losses[0]
    ckpt_dir = Path(cfg["out_dir"]) / "checkpoints"
    for s in list_checkpoints(ckpt_dir):
        if s > 4:  # resume from step 4: between projector refreshes (steps 0, 5, 10)
            for p in checkpoint_paths(ckpt_dir, s):
                p.unlink()
    res = train(cfg)
    assert res["resumed_from"] == 4
    assert [h["loss"] for h in res["history"]] == pytest.approx(losses, abs=1e-6, rel=0)
