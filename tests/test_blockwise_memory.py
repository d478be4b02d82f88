"""Block-by-block compression keeps exactly one set of calibration activations (and no statistics) alive between
blocks: the device-memory bound of sequential, offloaded compression (one block + activations) depends on it."""

import gc

import torch

from structmat.calibrate import InputStats
from structmat.compress import Compressor
from structmat.plan import Target


def _live(kind):
    gc.collect()
    return [o for o in gc.get_objects() if kind(o)]


def test_between_blocks_only_the_activations_and_no_statistics_stay_alive():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    batch, seq, n_batches = 2, 16, 3
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 128, (batch, seq), generator=gen)} for _ in range(n_batches)]
    records = []

    def census(stage, block):
        if stage in ("inputs", "offload"):
            hidden = _live(lambda o: torch.is_tensor(o) and tuple(o.shape) == (batch, seq, 32))
            stats = _live(lambda o: isinstance(o, InputStats))
            records.append((stage, block, len({t.untyped_storage().data_ptr() for t in hidden}), len(stats)))

    comp = Compressor(model, batches, r".*layers\.\d+\..*", offload=True, sequential=True, on_stage=census)
    comp.uniform({r".*": Target("lowrank:ratio=0.5", "whitened")}, inplace=True)
    assert [r[:2] for r in records] == [("inputs", -1), ("offload", 0), ("offload", 1), ("offload", 2)]
    for stage, block, activations, statistics in records:
        assert activations == n_batches, f"after {stage} of block {block}: {activations} activation batches alive"
        assert statistics == 0, f"after {stage} of block {block}: {statistics} statistics objects alive"
