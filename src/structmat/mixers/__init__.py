"""Sequence mixers with structured state transitions.

* :mod:`.delta`  — the generalized delta rule (DeltaNet / Gated DeltaNet / DeltaProduct): one functional op
  :func:`delta_rule` with a recurrent reference backend (the specification), a chunkwise-parallel WY/UT backend,
  and flash-linear-attention's kernels (:mod:`.fla_backend`, ``backend="fla"`` or ``"auto"``).
* :mod:`.ssm`    — diagonal SSMs: ZOH S4D (Lin / Inv / Real init) and a selective variant with transitions in [-1, 1].
* :mod:`.layers` — ``nn.Module`` token mixers with a decode-step API and a state cache, and a small LM.
"""

from . import fla_backend
from .delta import BACKENDS, beta_from_logits, delta_rule, delta_rule_chunked, delta_rule_recurrent, l2norm
from .layers import (DeltaMixer, DeltaNet, DeltaProduct, DiagonalSSMMixer, GatedDeltaNet, MixerCache, MixerLM,
                     RMSNorm, ShortConv)
from .ssm import INITS, S4DKernel, SelectiveDiagonal, diag_scan, diag_scan_recurrent, s4d_init

__all__ = ["fla_backend", "BACKENDS", "beta_from_logits", "delta_rule", "delta_rule_chunked", "delta_rule_recurrent", "l2norm",
           "DeltaMixer", "DeltaNet", "DeltaProduct", "DiagonalSSMMixer", "GatedDeltaNet", "MixerCache", "MixerLM",
           "RMSNorm", "ShortConv", "INITS", "S4DKernel", "SelectiveDiagonal", "diag_scan", "diag_scan_recurrent",
           "s4d_init"]

# HF Llama-style integration (no transformers import needed at import time).
from .hf import (LlamaMixerAttention, hybrid_layers, mixer_decode_logits, mixer_generate, mixer_prefill, mixer_step,
                 rebuild_from_config, replace_attention)

__all__ += ["LlamaMixerAttention", "hybrid_layers", "mixer_decode_logits", "mixer_generate", "mixer_prefill",
            "mixer_step", "rebuild_from_config", "replace_attention"]
