"""Block-by-block compression keeps exactly one set of calibration activations (and no statistics) alive between
blocks: the device-memory bound of sequential, offloaded compression (one block + activations) depends on it."""

import gc

import pytest
import torch
from torch import nn

from structmat.calibrate import InputStats
from structmat.compress import Compressor
from structmat.plan import Target


def _live(kind):
    gc.collect()
    return [o for o in gc.get_objects() if kind(o)]


SCOPE = r".*layers\.\d+\..*"


def _tiny_llama(layers=3, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **config)
    return LlamaForCausalLM(config).eval()


def _batches(n=2, batch=4, seq=16):
    gen = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 128, (batch, seq), generator=gen)} for _ in range(n)]


def test_between_blocks_only_the_activations_and_no_statistics_stay_alive():
    model = _tiny_llama(tie_word_embeddings=False).to(torch.bfloat16)
    batch, seq, n_batches = 2, 16, 3
    batches = _batches(n_batches, batch, seq)
    records = []

    def census(stage, block):
        if stage in ("inputs", "offload"):
            hidden = _live(lambda o: torch.is_tensor(o) and tuple(o.shape) == (batch, seq, 32))
            stats = _live(lambda o: isinstance(o, InputStats))
            records.append((stage, block, len({t.untyped_storage().data_ptr() for t in hidden}), len(stats)))

    comp = Compressor(model, batches, SCOPE, offload=True, sequential=True, on_stage=census)
    comp.uniform({r".*": Target("lowrank:ratio=0.5", "whitened")}, inplace=True)
    assert [r[:2] for r in records] == [("inputs", -1), ("offload", 0), ("offload", 1), ("offload", 2)]
    for stage, block, activations, statistics in records:
        assert activations == n_batches, f"after {stage} of block {block}: {activations} activation batches alive"
        assert statistics == 0, f"after {stage} of block {block}: {statistics} statistics objects alive"


def test_between_blocks_nothing_but_the_current_block_sits_on_the_device(monkeypatch):
    """Where each parameter is, as blockwise moves it (the CPU stands in for the device: every move goes through
    compress._onload / compress._offload, recorded here): outside the blocks only while the first block's inputs
    are computed, then exactly one block from its onload to its offload."""
    import structmat.compress as compress

    model = _tiny_llama()
    onloaded: list[nn.Module] = []  # modules moved to the device and not back (their parameters as they are now:
    events = []                     # the projection swaps a block's layers while it is on the device)
    real_onload, real_offload = compress._onload, compress._offload

    def onload(module, device):
        onloaded.append((module, {id(p) for p in module.parameters()}))
        events.append(("onload", len(onloaded[-1][1])))
        real_onload(module, device)

    def offload(module):
        onloaded[:] = [(m, ids) for m, ids in onloaded if m is not module]
        real_offload(module)

    monkeypatch.setattr(compress, "_onload", onload)
    monkeypatch.setattr(compress, "_offload", offload)
    blocks = model.model.layers
    seen = []

    def on_device():
        # a block counts with the parameters it holds now; the rest of the model as it was moved (blocks out)
        held = {id(p) for m, ids in onloaded for p in m.parameters() if m in blocks.children() or id(p) in ids}
        return {id(p) for p in model.parameters() if id(p) in held}

    def census(stage, block):
        seen.append((stage, block))
        expected = set() if stage in ("inputs", "offload") else {id(p) for p in blocks[block].parameters()}
        assert on_device() == expected, f"{stage} of block {block}: {len(on_device())} parameters on the device"

    comp = Compressor(model, _batches(), SCOPE, offload=True, sequential=True, device="cpu", on_stage=census,
                      forward_tokens=16)
    comp.uniform({r".*": Target("lowrank:ratio=0.5", "whitened")}, inplace=True)
    assert len(seen) == 1 + 5 * len(blocks) and not onloaded
    # the embeddings, final norm and head (everything but the blocks) went to the device once, for the inputs
    outside = sum(1 for _ in model.parameters()) - sum(1 for _ in blocks.parameters())
    assert events[0] == ("onload", outside)


def test_forward_pieces_leave_statistics_and_results_unchanged():
    """A block forward split into pieces of whole sequences (forward_tokens) gives the statistics and the
    sequentially compressed model of whole batches, up to summation order; the calibration batches are untouched
    though block outputs are written over the block inputs, also where the first block's input IS a batch tensor
    (inputs_embeds)."""
    plan = {r".*": Target("lowrank:ratio=0.5", "whitened")}
    data = _batches()
    before = [{k: v.clone() for k, v in b.items()} for b in data]
    ids = data[0]["input_ids"]
    whole = Compressor(_tiny_llama(), data, SCOPE, offload=True, sequential=True, device="cpu",
                       stats_dtype=torch.float64, forward_tokens=None).uniform(plan).model
    with torch.no_grad():
        expected = whole(input_ids=ids).logits
    stats_whole = Compressor(_tiny_llama(), data, SCOPE, offload=True, device="cpu", stats_dtype=torch.float64,
                             forward_tokens=None).statistics()
    for tokens in (16, 40, 48):  # pieces of 1, 2 and 3 (+1) sequences of 16 tokens
        model = Compressor(_tiny_llama(), data, SCOPE, offload=True, sequential=True, device="cpu",
                           stats_dtype=torch.float64, forward_tokens=tokens).uniform(plan).model
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
        stats = Compressor(_tiny_llama(), data, SCOPE, offload=True, device="cpu", stats_dtype=torch.float64,
                           forward_tokens=tokens).statistics()
        for name, s in stats_whole.items():
            torch.testing.assert_close(stats[name].gram, s.gram, rtol=1e-6, atol=1e-8)
            torch.testing.assert_close(stats[name].abs_sum, s.abs_sum, rtol=1e-6, atol=1e-8)
            assert stats[name].count == s.count
    assert all(torch.equal(b["input_ids"], a["input_ids"]) for a, b in zip(before, data))

    reference = _tiny_llama()
    embeds = [{"inputs_embeds": reference.model.embed_tokens(b["input_ids"]).detach()} for b in data]
    kept = [e["inputs_embeds"].clone() for e in embeds]
    outs = []
    for tokens in (None, 16):
        model = Compressor(_tiny_llama(), embeds, SCOPE, offload=True, sequential=True, device="cpu",
                           stats_dtype=torch.float64, forward_tokens=tokens).uniform(plan).model
        with torch.no_grad():
            outs.append(model(inputs_embeds=kept[0]).logits)
        assert all(torch.equal(e["inputs_embeds"], k) for e, k in zip(embeds, kept))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


def test_forward_tokens_is_checked():
    for bad in (0, -5, 1.5, True, "many"):
        with pytest.raises(ValueError, match="forward_tokens"):
            Compressor(_tiny_llama(1), _batches(), SCOPE, forward_tokens=bad)
    assert Compressor(_tiny_llama(1), _batches(), SCOPE, device="cpu").forward_tokens is None  # auto: not on a CPU


# ------------------------------------------------------------------------------------------------ offload="all"
def test_stat_passes_cover_every_column_once_within_the_budget():
    from structmat.compress import _stat_passes

    widths = {"q": 32, "o": 32, "down": 96}
    for budget in (10**9, 40_000, 20_000, 5_000, 1):
        passes = _stat_passes(widths, budget, 4)
        for name, n in widths.items():
            spans = sorted((0, n) if p[name] is None else p[name] for p in passes if name in p)
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # no gap, no overlap
            assert len(spans) <= 8  # a slice is at least an eighth of its Gram
        for p in passes:
            used = sum((widths[k] * (widths[k] if c is None else c[1] - c[0]) + widths[k]) * 4 for k, c in p.items())
            smallest = min((widths[k] * max(1, widths[k] // 8) + widths[k]) * 4 for k in p)
            assert used <= budget or (len(p) == 1 and used <= smallest)  # over only by one smallest slice
    assert _stat_passes(widths, 10**9, 4) == [{"q": None, "o": None, "down": None}]
    assert len(_stat_passes(widths, (96 * 96 + 96) * 4, 4)) == 2  # down fills a pass of its own


def test_gram_columns_assemble_to_the_whole_gram():
    from structmat.calibrate import GramColumns, assemble

    x = torch.randn(3, 10, 24, dtype=torch.float64)
    whole = InputStats.empty(24).update(x)
    parts = [GramColumns.empty(24, lo, hi).update(x) for lo, hi in ((0, 5), (5, 17), (17, 24))]
    built = assemble(parts[::-1])
    torch.testing.assert_close(built.gram, whole.gram)
    torch.testing.assert_close(built.abs_sum, whole.abs_sum)
    assert built.count == whole.count == 30
    with pytest.raises(ValueError, match="cover"):
        assemble(parts[:2])
    with pytest.raises(ValueError, match="cover"):
        assemble([parts[0], GramColumns.empty(24, 3, 24).update(x)])
    with pytest.raises(ValueError, match="token counts"):
        assemble([parts[0], GramColumns.empty(24, 5, 24).update(x[:1])])
    with pytest.raises(ValueError, match="NaN/Inf"):
        GramColumns.empty(24, 0, 5).update(torch.full((2, 24), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="columns"):
        GramColumns.empty(24, 5, 30)


@pytest.mark.parametrize("budget", [None, 1, 10**9])
def test_offload_all_gives_the_statistics_and_model_of_offloaded_blocks(budget):
    """offload="all" (activations and statistics on the host, the statistics collected in passes of column slices
    when the budget is small, each group of layers projected where it fits) computes what offload=True does: the
    same statistics (float64, up to summation order) and the same sequentially compressed model. ``budget``:
    the default (one block + activations), so small that every Gram is sliced and every projection runs on the
    host, and large (one pass, every group 'on the device')."""
    plan = {r".*": Target("lowrank:ratio=0.5", "whitened")}
    data = _batches()
    ids = data[0]["input_ids"]
    ref = Compressor(_tiny_llama(), data, SCOPE, offload=True, device="cpu", stats_dtype=torch.float64,
                     forward_tokens=16)
    opts = dict(offload="all", device="cpu", stats_dtype=torch.float64, forward_tokens=16, device_budget=budget)
    stats = Compressor(_tiny_llama(), data, SCOPE, **opts).statistics()
    expected = ref.statistics()
    assert set(stats) == set(expected)
    for name, s in expected.items():
        torch.testing.assert_close(stats[name].gram, s.gram, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(stats[name].abs_sum, s.abs_sum, rtol=1e-9, atol=1e-10)
        assert stats[name].count == s.count
    qkv = [stats[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv"]
    assert qkv[0] is qkv[1] is qkv[2]  # one shared Gram for one shared input, however it was collected
    for sequential in (True, False):
        base = Compressor(_tiny_llama(), data, SCOPE, offload=True, sequential=sequential, device="cpu",
                          stats_dtype=torch.float64, forward_tokens=16).uniform(plan)
        done = Compressor(_tiny_llama(), data, SCOPE, sequential=sequential, **opts).uniform(plan)
        assert [r.name for r in done.report.rows] == [r.name for r in base.report.rows]
        assert done.report.params_fraction == base.report.params_fraction
        assert all(p.device.type == "cpu" for p in done.model.parameters())
        with torch.no_grad():
            torch.testing.assert_close(done.model(input_ids=ids).logits, base.model(input_ids=ids).logits,
                                       rtol=1e-5, atol=1e-6)


def test_offload_is_checked():
    for bad in ("gpu", 2, "ALL"):
        with pytest.raises(ValueError, match="offload"):
            Compressor(_tiny_llama(1), _batches(), SCOPE, offload=bad)
    with pytest.raises(ValueError, match="device_budget"):
        Compressor(_tiny_llama(1), _batches(), SCOPE, offload=True, device_budget=10**6)
    with pytest.raises(ValueError, match="device_budget"):
        Compressor(_tiny_llama(1), _batches(), SCOPE, offload="all", device_budget=0)


@pytest.mark.gpu
@pytest.mark.parametrize("budget", [None, 10 * 2**20])
def test_offload_all_peak_stays_within_the_device_budget(budget):
    """On a GPU, sequential compression with offload="all" never holds more than its device budget (default: one
    block + the calibration activations), by the allocator's peak above cuBLAS's workspace, and gives offload=True's
    model. With 10 MiB the Gram of down_proj is collected in column slices and down_proj is projected on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 512, (16, 128), generator=gen)} for _ in range(8)]
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    activations = 8 * 16 * 128 * 256 * 4  # float32 hidden states
    bound = budget or block + activations
    plan = {r".*": Target("lowrank:ratio=0.5", "whitened")}
    torch.ones(16, 16, device="cuda") @ torch.ones(16, 16, device="cuda")  # cuBLAS's workspace, before the base
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    done = Compressor(model, data, SCOPE, offload="all", sequential=True, device="cuda", forward_tokens=128,
                      device_budget=budget).uniform(plan)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert 0 < peak <= bound, (peak, bound, block, activations)
    ref = Compressor(model, data, SCOPE, offload=True, sequential=True, device="cuda").uniform(plan)
    ids = data[0]["input_ids"][:2]
    with torch.no_grad():
        got, want = done.model(input_ids=ids).logits, ref.model(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()


def test_projection_estimate_covers_the_measured_projections():
    """compress._projection_bytes (which decides, with offload="all", whether a layer is projected on the device)
    is at least what the whitened projections of the 1B-block shapes took on an H200
    (benchmarks/results/projection-peak-20261203T203624Z.json: bytes above the weight and its Gram), and keeps the
    1B run's decisions: q/k/v/o on the device, gate/up/down on the CPU, within one block + activations."""
    from structmat.compress import _projection_bytes

    measured = {(2048, 2048): 134829056, (512, 2048): 36676608, (8192, 2048): 398747136, (2048, 8192): 503927808}
    bound = 121643008 + 268435456  # one 1B block + 128 x 512 bf16 activations
    for (out_f, in_f), peak in measured.items():
        module = nn.Linear(in_f, out_f, bias=False, device="meta", dtype=torch.bfloat16)
        gram = InputStats(torch.empty(in_f, in_f, device="meta"), torch.empty(in_f, device="meta"), 1)
        estimate = _projection_bytes(module, gram)
        assert estimate - out_f * in_f * 2 - in_f * in_f * 4 >= peak
        assert (estimate <= bound) == (out_f <= in_f and in_f == 2048)
