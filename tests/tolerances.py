"""Every numeric tolerance of the test suite, in one table (relative errors unless named otherwise)."""

import torch

FORWARD_REL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}  # layer(x) vs x @ W^T
GRAD_REL = {torch.float64: 1e-11, torch.float32: 1e-5}  # gradients vs the dense reference
EXACT_RECOVERY_REL = 1e-10  # from_dense(member) in float64
OPTIMUM_REL = 1e-9  # projection error vs the theoretical optimum, float64
GD_IMPROVEMENT_REL = 1e-9  # gradient descent may not beat a closed-form projection by more than this
INIT_STD_REL = 0.15  # sample std of a fresh factor vs its muP std
RATIO_ABS = 0.03  # budget form: achieved param fraction vs the asked ratio (moderate shapes)
STATS_REL = 1e-12  # streamed Gram statistics vs a direct X^T X
NEVER_WORSE_SLACK = 1e-9  # a data-aware projection vs its data-free counterpart on the calibration objective
CURVE_REL = 1e-8  # predicted low-rank error curve vs the projection's actual error
STRICT_GAIN = 0.9  # "strictly better": at most this fraction of the data-free error on correlated data
MONARCH_DESCENT_REL = 0.03  # whitened Monarch (subspace-iteration sweeps) vs exact-SVD block descent, same sweeps
MONARCH_PRICE_REL = 0.05  # its budget price (4 cheap sweeps) vs the exact descent's 2-sweep price it replaced
F32_AGREE_REL = 2e-3  # a projection's output error with float32 vs float64 statistics (closed forms, SparseGPT)
F32_LOCAL_DESCENT_REL = 5e-3  # the same for whitened Monarch (a block descent stopped after 10 sweeps)
