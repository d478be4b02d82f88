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
