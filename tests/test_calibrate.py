"""Calibration statistics: exact Gram, shared-input detection, error paths, saving, Fisher."""

import pytest
import torch
from torch import nn

from structmat.calibrate import InputStats, collect_fisher, collect_input_stats, load_stats, save_stats

from tolerances import STATS_REL


def _rel(a, b):
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


class Attention(nn.Module):
    """q/k/v see the same tensor; o sees a different one; up sees a view-free copy of the same values."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up = nn.Linear(d, 2 * d)

    def forward(self, x):
        h = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), dim=-1) @ self.v(x)
        y = self.o(h)
        return self.up(y.clone() + 1.0)


def _batches(gen, n=3, d=16):
    return [torch.randn(2, 5, d, generator=gen, dtype=torch.float64) * 3 + 1 for _ in range(n)]


def test_gram_abs_sum_count_match_direct_computation():
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 8)).double()
    batches = _batches(gen)

    def run():
        with torch.no_grad():
            for b in batches:
                model(b)

    stats = collect_input_stats(model, ["0"], run)["0"]
    x = torch.cat([b.reshape(-1, 16) for b in batches])
    assert stats.count == x.shape[0] == 30
    assert stats.gram.dtype == torch.float64 and stats.gram.shape == (16, 16)
    assert _rel(stats.gram, x.T @ x) < STATS_REL
    assert _rel(stats.abs_sum, x.abs().sum(0)) < STATS_REL
    assert _rel(stats.mean_abs, x.abs().mean(0)) < STATS_REL
    assert not model[0]._forward_pre_hooks and not model._forward_pre_hooks  # hooks removed


def test_shared_inputs_get_one_object_distinct_inputs_another():
    gen = torch.Generator().manual_seed(2)
    model = Attention().double()
    batches = _batches(gen)
    seen = {}

    def run():
        with torch.no_grad():
            for b in batches:
                model(b)

    stats = collect_input_stats(model, ["q", "k", "v", "o", "up"], run)
    assert stats["q"] is stats["k"] is stats["v"]
    assert stats["o"] is not stats["q"] and stats["up"] is not stats["o"]
    assert len({id(s) for s in stats.values()}) == 3  # one Gram per distinct input
    x = torch.cat([b.reshape(-1, 16) for b in batches])
    assert stats["q"].count == 30  # counted once, not three times
    assert _rel(stats["q"].gram, x.T @ x) < STATS_REL
    # o's own input, recomputed directly
    hooks = [model.o.register_forward_pre_hook(lambda m, a: seen.setdefault("o", []).append(a[0]))]
    with torch.no_grad():
        for b in batches:
            model(b)
    hooks[0].remove()
    xo = torch.cat([t.reshape(-1, 16) for t in seen["o"]])
    assert _rel(stats["o"].gram, xo.T @ xo) < STATS_REL


def test_conv1d_weight_is_in_by_out():
    from transformers.pytorch_utils import Conv1D

    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(Conv1D(12, 16)).double()  # nf=12 outputs, nx=16 inputs; weight (16, 12)
    batches = _batches(gen)
    stats = collect_input_stats(model, ["0"], lambda: [model(b) for b in batches])["0"]
    x = torch.cat([b.reshape(-1, 16) for b in batches])
    assert stats.in_features == 16 and _rel(stats.gram, x.T @ x) < STATS_REL


def test_nan_input_raises_and_hooks_are_removed():
    model = nn.Sequential(nn.Linear(4, 4))
    bad = torch.randn(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf.*never skips"):
        collect_input_stats(model, ["0"], lambda: model(bad))
    assert not model[0]._forward_pre_hooks and not model._forward_pre_hooks
    with pytest.raises(ValueError, match="NaN/Inf"):
        InputStats.empty(4).update(torch.tensor([[1.0, float("inf"), 0.0, 2.0]]))


def test_error_paths_names_and_uncalled_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no module named"):
        collect_input_stats(model, ["3"], lambda: None)
    with pytest.raises(ValueError, match="neither nn.Linear"):
        collect_input_stats(model, ["1"], lambda: None)
    with pytest.raises(ValueError, match="never called"):
        collect_input_stats(model, ["0", "2"], lambda: model[0](torch.randn(2, 4)))
    with pytest.raises(RuntimeError):
        collect_input_stats(model, ["0"], lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert not model[0]._forward_pre_hooks


def test_merge_state_dict_and_file_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    whole = InputStats.empty(8).update(x)
    half = InputStats.empty(8).update(x[:17]).merge(InputStats.empty(8).update(x[17:]))
    assert half.count == 40 and _rel(half.gram, whole.gram) < STATS_REL
    again = InputStats.from_state_dict(whole.state_dict())
    assert again.count == 40 and torch.equal(again.gram, whole.gram) and torch.equal(again.abs_sum, whole.abs_sum)
    other = InputStats.empty(8).update(x[:5])
    save_stats(tmp_path / "stats.safetensors", {"q": whole, "k": whole, "o": other})
    loaded = load_stats(tmp_path / "stats.safetensors")
    assert loaded["q"] is loaded["k"] and loaded["o"] is not loaded["q"]
    assert torch.equal(loaded["q"].gram, whole.gram) and loaded["o"].count == 5
    bad = whole.state_dict()
    bad["gram"] = bad["gram"].clone()
    bad["gram"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        InputStats.from_state_dict(bad)
    with pytest.raises(ValueError, match="in_features"):
        whole.merge(InputStats.empty(4))


def test_fisher_is_sum_of_squared_gradients():
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[2].weight.requires_grad_(False)  # frozen weights still get a Fisher; the flag is restored
    data = [(torch.randn(4, 6, generator=gen, dtype=torch.float64),
             torch.randn(4, 3, generator=gen, dtype=torch.float64)) for _ in range(3)]

    def loss(x, y):
        return ((model(x) - y) ** 2).mean()

    fisher = collect_fisher(model, ["0", "2"], (loss(x, y) for x, y in data))
    expected = {"0": torch.zeros(5, 6, dtype=torch.float64), "2": torch.zeros(3, 5, dtype=torch.float64)}
    model[2].weight.requires_grad_(True)
    for x, y in data:
        grads = torch.autograd.grad(loss(x, y), [model[0].weight, model[2].weight])
        expected["0"] += grads[0] ** 2
        expected["2"] += grads[1] ** 2
    model[2].weight.requires_grad_(False)
    for name in expected:
        assert fisher[name].shape == expected[name].shape and _rel(fisher[name], expected[name]) < STATS_REL
    assert model[0].weight.requires_grad and not model[2].weight.requires_grad
    assert model[0].weight.grad is None
    # callables work too; a non-finite loss is an error
    fisher2 = collect_fisher(model, ["0"], [lambda: loss(*data[0])])
    assert fisher2["0"].abs().sum() > 0
    with pytest.raises(ValueError, match="loss of batch 0"):
        collect_fisher(model, ["0"], [lambda: loss(*data[0]) * float("nan")])
    with pytest.raises(ValueError, match="empty"):
        collect_fisher(model, ["0"], [])
