"""Budget pricing: whitened Monarch prices every ladder size from one start and cheap sweeps, within a stated
tolerance of the exact block-coordinate descent; the price is what projecting that size gives."""

import torch

from structmat.project import output_error, price, project
from structmat.project._linalg import objective, pinv_psd, sqrt_factor
from structmat.structures import structure_class
from test_project import setup
from structmat.project.registry import get_projection
from tolerances import CURVE_REL, MONARCH_DESCENT_REL, MONARCH_PRICE_REL

PRICING = get_projection("whitened", "monarch").pricing_options


def exact_descent(w, gram, b, c, sweeps, damp=1e-6):
    """Reference: block-coordinate descent with a full SVD for every block update (the pre-pricing algorithm),
    from the block-whitened start, on the damped objective; returns the undamped relative squared error."""
    out, inn = w.shape
    p = inn // b
    h = gram + damp * gram.diagonal().mean() * torch.eye(inn, dtype=gram.dtype)
    hkk = torch.stack([h[k * p:(k + 1) * p, k * p:(k + 1) * p] for k in range(b)])
    s, pinv = sqrt_factor(hkk), pinv_psd(hkk)

    def fit(target, k):
        tb = target.reshape(b, -1, p)
        u = torch.linalg.svd(tb @ s[k], full_matrices=False)[0][..., :c]
        return (u @ (u.transpose(1, 2) @ tb)).reshape(target.shape)

    m = torch.cat([fit(w[:, k * p:(k + 1) * p], k) for k in range(b)], dim=1)
    for _ in range(sweeps):
        for k in range(b):
            cols = slice(k * p, (k + 1) * p)
            e = w - m
            g = ((e @ h)[:, cols] - e[:, cols] @ hkk[k]) @ pinv[k]
            m[:, cols] = fit(w[:, cols] + g, k)
    return float(objective(w - m, gram) / objective(w, gram))


def test_whitened_monarch_price_matches_its_projection_and_the_exact_descent():
    w, stats = setup(out=32, inn=48, n=600, seed=3)
    cls = structure_class("monarch")
    configs = cls.size_ladder(48, 32, 4, nblocks=4)
    prices = price(w, configs, "whitened", stats, options=PRICING)
    assert len(prices) == len(configs) and all(p is not None for p in prices)
    assert prices == sorted(prices, reverse=True)  # a larger block rank never prices worse
    for config, value in zip(configs, prices):
        layer = project(w, config, "whitened", stats=stats, **PRICING)
        assert abs(layer.fit_info["output_error"] ** 2 - value) <= CURVE_REL * 10 + 1e-9 * value
        # the budget's price (4 cheap sweeps) vs the exact descent the solver priced with before (2 SVD sweeps)
        assert value <= exact_descent(w, stats.gram, 4, layer.c, sweeps=2) * (1 + MONARCH_PRICE_REL)
        # the final projection (10 sweeps) vs the exact descent with as many sweeps
        final = project(w, config, "whitened", stats=stats, tol=0.0).fit_info["output_error"] ** 2
        assert final <= exact_descent(w, stats.gram, 4, layer.c, sweeps=10) * (1 + MONARCH_DESCENT_REL)
    # never worse than the data-free projection
    for config, value in zip(configs, prices):
        assert value <= output_error(w, project(w, config), stats) ** 2 * (1 + 1e-9)


def test_whitened_monarch_factorization_is_shared_by_layers_with_one_input():
    w, stats = setup(out=32, inn=48, n=600, seed=4)
    configs = structure_class("monarch").size_ladder(48, 32, 4, nblocks=4)
    price(w, configs, "whitened", stats)
    cached = [k for k in stats.__dict__.get("_derived", {}) if str(k[0]).startswith("monarch-whitening")]
    assert len(cached) == 1
    price(w.flip(0), configs, "whitened", stats)  # another layer on the same input reuses it
    assert [k for k in stats._derived if str(k[0]).startswith("monarch-whitening")] == cached


def test_sparsegpt_prices_every_nm_size_in_one_pass_equal_to_its_projection():
    w, stats = setup(out=24, inn=40, n=500, seed=5)
    configs = structure_class("nm").size_ladder(40, 24, 4, m=4)
    for w_dtype in (torch.float64, torch.float32):
        prices = price(w.to(w_dtype), configs, "sparsegpt", stats)
        for config, value in zip(configs, prices):
            layer = project(w.to(w_dtype), config, "sparsegpt", stats=stats)
            assert abs(layer.fit_info["output_error"] ** 2 - value) <= 1e-9 + 1e-6 * value, (config, w_dtype)
    assert prices == sorted(prices, reverse=True)
    padded = structure_class("nm").size_ladder(42, 24, 4, m=4, pad=True)  # 42 inputs: padded to 44
    w2, stats2 = setup(out=24, inn=42, n=500, seed=6)
    for config, value in zip(padded, price(w2, padded, "sparsegpt", stats2)):
        assert abs(project(w2, config, "sparsegpt", stats=stats2).fit_info["output_error"] ** 2 - value) <= 1e-9


def test_asvd_is_the_direct_formula_and_beats_plain_svd_on_outlier_channels():
    """ASVD (Yuan et al.): S = diag(mean|x|^alpha), W_r = [W S]_r S^-1. On inputs whose few channels carry
    outliers (as a causal LM's hidden states do) it must fit the calibration outputs better than plain SVD."""
    gen = torch.Generator().manual_seed(7)
    n, d, out, rank = 2000, 48, 40, 8
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x[:, :3] *= 40.0  # outlier channels
    w = torch.randn(out, d, generator=gen, dtype=torch.float64) / d**0.5
    from structmat.calibrate import InputStats

    stats = InputStats.empty(d).update(x)
    scale = x.abs().mean(dim=0) ** 0.5
    u, s, vh = torch.linalg.svd(w * scale, full_matrices=False)
    direct = (u[:, :rank] * s[:rank]) @ vh[:rank] / scale
    fit = project(w, f"lowrank:rank={rank}", "asvd", stats=stats, guard=False)
    assert torch.allclose(fit.to_dense().detach(), direct, rtol=1e-9, atol=1e-12)

    def calib_error(approx):
        return float(torch.linalg.norm((w - approx) @ x.T) / torch.linalg.norm(w @ x.T))

    plain = project(w, f"lowrank:rank={rank}", stats=stats).to_dense().detach()
    assert calib_error(direct) < 0.9 * calib_error(plain)
    assert abs(calib_error(direct) - fit.fit_info["output_error"]) < 1e-9


def test_layers_sharing_an_input_are_priced_together_as_each_alone(tiny_calibrated_llama):
    """q/k/v (and gate/up) stacked as rows, and the same layers of every block batched into one call (SparseGPT;
    whitened Monarch's descents batched over the blocks): the prices are each layer's own."""
    from structmat.compress import candidates_for, parse_allow, price_layers
    from structmat.modules import dense_weight, linear_modules

    model, names, stats = tiny_calibrated_llama()
    allowed = parse_allow("nm@sparsegpt,lowrank@whitened,monarch@whitened:nblocks=4")
    together = price_layers(model, allowed, stats, names)
    modules = linear_modules(model)
    for name in names:
        alone = candidates_for(name, dense_weight(modules[name]), allowed, stats[name])
        assert [(str(c.spec), c.method) for c in alone] == [(str(c.spec), c.method) for c in together[name]]
        for a, b in zip(alone, together[name]):
            assert abs(a.error - b.error) <= 1e-6 * max(a.error, 1e-12) + 1e-12, (name, a.spec)


def test_float32_statistics_keep_pricing_and_projection_in_float32():
    """No silent float64 compute in the budget's pricing and projections when the statistics are float32 (the GPU
    default): no matrix product or factorization there produces a float64 tensor (elementwise bookkeeping such as
    the report's relative weight error may use float64)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import LlamaConfig, LlamaForCausalLM

    from structmat.compress import Compressor

    class Float64Spy(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and any(
                        k in str(func) for k in ("mm", "linalg", "cholesky", "triangular", "svd", "eigh", "qr", "addr",
                                                 "matmul", "dot", "orgqr", "geqrf")) and "norm" not in str(func):
                    self.seen.add(str(func))
            return out

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    gen = torch.Generator().manual_seed(0)
    comp = Compressor(model, [{"input_ids": torch.randint(0, 64, (2, 24), generator=gen)}], r".*layers\.\d+\..*",
                      sensitivity=False)
    comp.statistics()
    with Float64Spy() as spy:
        comp.budget(0.5)
    assert not spy.seen, sorted(spy.seen)
