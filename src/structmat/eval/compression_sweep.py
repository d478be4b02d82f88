"""The main job: compress the packaged MiniLM at several parameter targets with several methods, measure
encoder fidelity on held-out text, and draw the quality-vs-params frontier.

Protocol (all offline): calibration texts come from the training files of the standard-library corpus and
evaluation texts from its validation files (split by file hash, disjoint). Statistics are collected once on the
original model (one-shot) unless ``sequential`` is set. Every method structures the same layers — the 36 linear
layers of the 6 encoder blocks (the pooler is not used for sentence embeddings and stays dense) — and the
parameter fraction reported is over those layers (weights and biases).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..compress import (Allowed, budget_plan, calibrate, compress_sequential, matched_layers, output_sensitivity,
                        price_layers)
from ..surgery import Plan, Target, linear_modules, structurize
from .results import markdown_table

ENCODER_LAYERS = r"encoder\.layer\.\d+\..*"

# label -> (structure family used for the spec, method); specs are filled in per target.
METHODS: dict[str, tuple[str, str]] = {
    "SVD": ("lowrank", "data-free"),
    "whitened SVD": ("lowrank", "whitened"),
    "ASVD": ("lowrank", "asvd"),
    "Monarch": ("monarch", "data-free"),
    "whitened Monarch": ("monarch", "whitened"),
    "N:M magnitude": ("nm", "magnitude"),
    "N:M Wanda": ("nm", "wanda"),
    "N:M SparseGPT": ("nm", "sparsegpt"),
    "budget mix": ("mix", "whitened"),
}
MIX = (Allowed("lowrank", "whitened"), Allowed("monarch", "whitened", nblocks=4), Allowed("nm", "sparsegpt"))
# the mix prices every layer's options once, then solves each target with output-sensitivity weighting


@dataclass
class SweepRow:
    method: str
    target: float
    spec: str
    params_frac: float
    cosine: float
    top1_agreement: float
    seconds: float


def spec_for(structure: str, target: float) -> str | None:
    """The per-layer spec for a uniform method at ``target``; None where the structure has no such size."""
    if structure == "nm":
        n = target * 4
        return f"nm:n={round(n)},m=4" if abs(n - round(n)) < 1e-9 and 1 <= round(n) <= 3 else None
    return f"{structure}:ratio={target}"


def run_sweep(model, tokenizer, calib_batches, eval_texts, targets=(0.25, 0.5, 0.75), methods=None,
              sequential: bool = False, progress: bool = False, fidelity_fn=None, reference=None,
              on_row=None) -> list[SweepRow]:
    """Compress ``model`` with every (method, target) and measure fidelity against ``reference`` embeddings."""
    methods = methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    layers = [n for n in linear_modules(model) if Plan.from_dict({ENCODER_LAYERS: "dense"}).match(n) is not None]
    stats = None if sequential else calibrate(model, layers, calib_batches)
    priced = sensitivity = None
    rows: list[SweepRow] = []
    for label in methods:
        structure, method = METHODS[label]
        for target in targets:
            start = time.perf_counter()
            work = copy.deepcopy(model)
            if structure == "mix":
                if stats is None:
                    stats = calibrate(model, layers, calib_batches)
                if priced is None:  # once for all targets
                    priced = price_layers(model, list(MIX), stats, layers)
                    sensitivity = output_sensitivity(model, layers, calib_batches)
                plan, _ = budget_plan(work, list(MIX), stats, target, names=layers, sensitivity=sensitivity,
                                      candidates=priced)
                spec_text = "solver: lowrank/monarch/N:M per layer"
            else:
                spec = spec_for(structure, target)
                if spec is None:
                    continue
                plan = Plan.from_dict({ENCODER_LAYERS: Target(spec, method)})
                spec_text = spec
            if sequential:
                report = compress_sequential(work, plan, calib_batches, progress=progress)
            else:
                report = structurize(work, plan, calibration={n: stats[n] for n in matched_layers(work, plan)},
                                     progress=progress)
            fidelity = fidelity_fn(work, reference)
            kept = sum(report.skipped.get(n, 0) for n in layers)  # in-scope layers the solver left dense
            scoped = (sum(r.new_params for r in report.rows) + kept) / (sum(r.old_params for r in report.rows) + kept)
            rows.append(SweepRow(label, target, spec_text, scoped, fidelity["cosine"],
                                 fidelity["top1_agreement"], time.perf_counter() - start))
            if on_row is not None:
                on_row(rows[-1])
    return rows


def format_rows(rows: list[SweepRow]) -> str:
    header = ("method", "target", "spec", "linear params", "cosine", "top-1 agree", "seconds")
    return markdown_table(header, [(r.method, f"{r.target:.2f}", r.spec, f"{100 * r.params_frac:.1f}%",
                                    f"{r.cosine:.4f}", f"{r.top1_agreement:.3f}", f"{r.seconds:.1f}") for r in rows],
                          left=3)


def plot_frontier(rows: list[SweepRow], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for label in dict.fromkeys(r.method for r in rows):
        pts = sorted((r.params_frac, r.cosine) for r in rows if r.method == label)
        ax.plot([100 * p for p, _ in pts], [c for _, c in pts], marker="o", label=label)
    ax.set_xlabel("linear-layer parameters kept (%)")
    ax.set_ylabel("mean cosine to the original embeddings")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def rows_as_dicts(rows: list[SweepRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
