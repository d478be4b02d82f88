import os
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# One profile for the whole suite: deterministic, bounded, no deadline (CI machines are slow and shared).
settings.register_profile("structmat", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "structmat"))


# Small problems: one thread avoids oversubscription stalls in LAPACK on small shared machines.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield


@pytest.fixture
def tiny_calibrated_llama():
    """A 3-block Llama (hidden 32) with float64 input statistics for its block linears whose names pass ``keep``:
    the common start of the batched pricing/projection tests. Returns (model, names, stats)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from structmat.compress import calibrate
    from structmat.modules import linear_modules

    def build(keep=lambda name: True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=2)).eval()
        names = [n for n in linear_modules(model) if ".layers." in n and keep(n)]
        gen = torch.Generator().manual_seed(0)
        stats = calibrate(model, names, [{"input_ids": torch.randint(0, 64, (2, 24), generator=gen)}])
        return model, names, stats

    return build
