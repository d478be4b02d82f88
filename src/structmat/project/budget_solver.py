"""Budget solver: choose one candidate (structure + size + method) per layer to minimize the summed predicted
output error subject to a parameter (or FLOP) budget.

This is a multiple-choice knapsack. We solve it by dynamic programming over the budget discretized into
``units`` equal slices, rounding every candidate's cost UP to whole slices, so the chosen set never exceeds the
budget; with 4000 slices the rounding wastes at most layers/4000 of the budget per layer. The exact optimum of the
discretized problem is returned (no greedy heuristics). A layer's "dense" candidate (keep it as it is) may be
offered; no candidate may be larger than the layer's dense original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Candidate:
    """One way to replace one layer: its cost and its predicted relative squared output error."""

    layer: str
    spec: Any  # a StructureConfig (or "dense" to keep the layer)
    method: str
    params: int
    flops: int
    error: float  # predicted ||(W - W_hat) X||^2 / ||W X||^2 on the calibration inputs
    dense_params: int
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def cost(self, key: str) -> int:
        return self.params if key == "params" else self.flops


def solve_budget(candidates: dict[str, list[Candidate]], budget: float, key: str = "params",
                 units: int = 4000) -> dict[str, Candidate]:
    """Pick one candidate per layer, total cost <= budget, minimal summed error (exact on the discretized grid)."""
    if key not in ("params", "flops"):
        raise ValueError(f"budget key must be 'params' or 'flops', got {key!r}")
    if not candidates:
        raise ValueError("the budget solver got no layers to choose for")
    names = list(candidates)
    for name in names:
        options = candidates[name]
        if not options:
            raise ValueError(f"layer {name}: no candidate structure fits it; allow another structure or 'dense'")
        for c in options:
            if c.params > c.dense_params:
                raise ValueError(f"layer {name}: candidate {c.spec} has {c.params} params > dense {c.dense_params}")
            if not math.isfinite(c.error) or c.error < 0:
                raise ValueError(f"layer {name}: candidate {c.spec} has a non-finite or negative predicted error")
    cheapest = sum(min(c.cost(key) for c in candidates[n]) for n in names)
    if cheapest > budget:
        raise ValueError(f"the budget {budget:,.0f} {key} is below the cheapest choice {cheapest:,} {key}; "
                         f"raise the target or allow smaller structures")
    unit = budget / units
    inf = np.inf
    best = np.full(units + 1, inf)  # best[u]: minimal error using at most u units so far
    best[0:] = 0.0
    choice = np.zeros((len(names), units + 1), dtype=np.int32)
    for li, name in enumerate(names):
        new = np.full(units + 1, inf)
        pick = np.full(units + 1, -1, dtype=np.int32)
        for ci, c in enumerate(candidates[name]):
            w = int(math.ceil(c.cost(key) / unit - 1e-9))
            if w > units:
                continue
            shifted = np.full(units + 1, inf)
            shifted[w:] = best[: units + 1 - w] + c.error
            better = shifted < new
            new[better] = shifted[better]
            pick[better] = ci
        best, choice[li] = new, pick
    if not np.isfinite(best[units]):
        raise ValueError(f"no assignment fits the budget {budget:,.0f} {key}")
    # Walk back from the full budget.
    chosen: dict[str, Candidate] = {}
    u = units
    for li in range(len(names) - 1, -1, -1):
        name = names[li]
        ci = int(choice[li, u])
        c = candidates[name][ci]
        chosen[name] = c
        u -= int(math.ceil(c.cost(key) / unit - 1e-9))
    return dict((n, chosen[n]) for n in names)


def summary(chosen: dict[str, Candidate], key: str = "params") -> dict[str, float]:
    return {
        "layers": len(chosen),
        "params": sum(c.params for c in chosen.values()),
        "dense_params": sum(c.dense_params for c in chosen.values()),
        "flops": sum(c.flops for c in chosen.values()),
        "predicted_error": sum(c.error for c in chosen.values()),
    }
