"""Calibration statistics for data-aware projection.

* :class:`InputStats` streams, per distinct layer input, the Gram matrix ``sum_t x_t x_t^T`` and ``sum_t |x_t|`` in
  float64 on the device of the activations, and can be merged, moved and saved (plain tensors, safetensors-ready).
* :func:`collect_input_stats` hooks ``nn.Linear`` / HF ``Conv1D`` modules, runs the user's calibration loop and
  returns one (possibly shared) :class:`InputStats` per module name. Modules that receive the very same input tensor
  in a forward (q/k/v projections; gate/up) share ONE object, so the Gram of a distinct input is computed and stored
  once.
* :class:`GramColumns` and :func:`assemble`: a Gram collected a slice of columns per pass and put together on the
  host, for devices that cannot hold a wide layer's whole Gram beside its block (``offload="all"``).
* :func:`collect_fisher` sums squared gradients of module weights over a stream of losses (Fisher weighting, FWSVD).

A non-finite number anywhere is an error, never skipped.
"""

from __future__ import annotations

from .fisher import collect_fisher
from .stats import GramColumns, InputStats, assemble, collect_input_stats, linear_in_features, load_stats, save_stats

__all__ = ["InputStats", "GramColumns", "assemble", "collect_input_stats", "collect_fisher", "linear_in_features",
           "save_stats", "load_stats"]
