"""The main job: compress a pretrained model at several parameter targets with several methods, measure its
quality on held-out text (encoder fidelity for MiniLM, perplexity for a causal LM such as SmolLM2), and draw the
quality-vs-params frontier.

Protocol (all offline): calibration texts come from the training files of the standard-library corpus and
evaluation texts from its validation files (split by file hash, disjoint). Every method structures the same layers
— the linear layers of the transformer blocks (MiniLM's pooler, the LM head and embeddings stay dense) — and the
parameter fraction reported is over those layers (weights and biases). All of it goes through one
:class:`~structmat.compress.Compressor` per calibration mode, so statistics, prices and sensitivities are computed
once per mode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..atomic import write_png
from ..compress import DEFAULT_ALLOW, Compressor, parse_allow
from ..plan import Target
from .results import markdown_table

ENCODER_LAYERS = r"encoder\.layer\.\d+\..*"
BLOCK_LAYERS = r".*(layer|layers|h)\.\d+\..*"

# label -> (structure family used for the spec, method); specs are filled in per target.
METHODS: dict[str, tuple[str, str]] = {
    "SVD": ("lowrank", "data-free"),
    "whitened SVD": ("lowrank", "whitened"),
    "ASVD": ("lowrank", "asvd"),
    "Monarch": ("monarch", "data-free"),
    "whitened Monarch": ("monarch", "whitened"),
    "block-diagonal": ("blockdiag", "data-free"),
    "N:M magnitude": ("nm", "magnitude"),
    "N:M Wanda": ("nm", "wanda"),
    "N:M SparseGPT": ("nm", "sparsegpt"),
    "budget mix": ("mix", "whitened"),
}
MIX = tuple(parse_allow(DEFAULT_ALLOW))  # the default budget's structures (from the projections' registrations)
# the mix prices every layer's options once, then solves each target with output-sensitivity weighting


@dataclass
class SweepRow:
    method: str
    target: float
    spec: str
    params_frac: float
    seconds: float
    mode: str = "one-shot"
    metrics: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, key: str) -> Any:  # row.cosine, row.ppl, ...
        metrics = self.__dict__.get("metrics", {})
        if key in metrics:
            return metrics[key]
        raise AttributeError(key)


def spec_for(structure: str, target: float) -> str | None:
    """The per-layer spec for a uniform method at ``target``; None where the structure has no such size."""
    if structure == "nm":
        n = target * 4
        return f"nm:n={round(n)},m=4" if abs(n - round(n)) < 1e-9 and 1 <= round(n) <= 3 else None
    return f"{structure}:ratio={target}"


def run_sweep(model, calib_batches, targets=(0.25, 0.5, 0.75), methods=None, *, scope: str = ENCODER_LAYERS,
              modes=("one-shot",), quality_fn: Callable[[Any], dict] | None = None, device=None,
              progress: bool = False, on_row=None, compressors: dict[str, Compressor] | None = None
              ) -> list[SweepRow]:
    """Compress ``model`` with every (mode, method, target) and measure ``quality_fn(compressed_model)``.
    ``modes``: "one-shot" and/or "sequential"."""
    methods = methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    bad = [m for m in modes if m not in ("one-shot", "sequential")]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; choose from one-shot, sequential")
    comps = {mode: (compressors or {}).get(mode) or Compressor(model, calib_batches, scope, device=device,
                                                                sequential=mode == "sequential", progress=progress)
             for mode in modes}
    rows: list[SweepRow] = []
    for target in targets:  # target-major: a run cut short still has every method and mode at the first target
        for mode, comp in comps.items():
            for label in methods:
                structure, method = METHODS[label]
                start = time.perf_counter()
                if structure == "mix":
                    done = comp.budget(target, allow=list(MIX))
                    spec_text = "solver: " + ", ".join(f"{k} x{v}" for k, v in sorted(done.mix().items()))
                else:
                    spec = spec_for(structure, target)
                    if spec is None:
                        continue
                    done = comp.uniform({scope: Target(spec, method)})
                    spec_text = spec
                metrics = quality_fn(done.model) if quality_fn is not None else {}
                rows.append(SweepRow(label, target, spec_text, done.report.params_fraction,
                                     time.perf_counter() - start, mode, dict(metrics)))
                del done
                if on_row is not None:
                    on_row(rows[-1])
    return rows


def perplexity_row_log(path, dense: dict[str, Any]) -> Callable[[SweepRow], None]:
    """An ``on_row`` for :func:`run_sweep` on a causal LM: prints each finished row beside the dense perplexity and
    appends it to ``path`` as a JSON line (the first line holds the dense result), so a run cut short keeps what it
    measured."""
    import json

    from ..atomic import write_atomic

    path = Path(path)
    lines = [json.dumps({"dense": dense})]
    write_atomic(path, ("\n".join(lines) + "\n").encode())

    def on_row(r: SweepRow) -> None:
        print(f"  {r.mode:<10} {r.method:<17} target {r.target:.2f}: ppl {r.ppl:.3f} "
              f"({r.ppl / dense['ppl']:.2f} x dense, {r.seconds:.1f} s)", flush=True)
        lines.append(json.dumps(rows_as_dicts([r])[0]))
        write_atomic(path, ("\n".join(lines) + "\n").encode())  # (the whole file each row: never half a line)
    return on_row


def format_rows(rows: list[SweepRow], dense: dict[str, Any] | None = None) -> str:
    """A markdown table; perplexity rows (causal LMs) also show the ratio to the dense model's perplexity."""
    order = list(METHODS)
    rows = sorted(rows, key=lambda r: (r.mode != "one-shot", order.index(r.method) if r.method in order else 99,
                                       r.target))
    causal = any("ppl" in r.metrics for r in rows)
    if causal:
        header = ("mode", "method", "target", "spec", "linear params", "ppl", "x dense", "seconds")
        base = (dense or {}).get("ppl")
        body = [(r.mode, r.method, f"{r.target:.2f}", r.spec, f"{100 * r.params_frac:.1f}%", f"{r.ppl:.2f}",
                 "-" if not base else f"{r.ppl / base:.2f}", f"{r.seconds:.1f}") for r in rows]
        if base:
            body.insert(0, ("-", "dense", "1.00", "dense", "100.0%", f"{base:.2f}", "1.00", "-"))
        return markdown_table(header, body, left=4)
    header = ("method", "target", "spec", "linear params", "cosine", "top-1 agree", "seconds")
    return markdown_table(header, [(r.method, f"{r.target:.2f}", r.spec, f"{100 * r.params_frac:.1f}%",
                                    f"{r.cosine:.4f}", f"{r.top1_agreement:.3f}", f"{r.seconds:.1f}") for r in rows],
                          left=3)


def plot_frontier(rows: list[SweepRow], path, title: str, dense: dict[str, Any] | None = None) -> Path:
    """The quality-vs-params frontier as a PNG at ``path`` (written atomically); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    causal = any("ppl" in r.metrics for r in rows)
    key = "ppl" if causal else "cosine"
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    modes = list(dict.fromkeys(r.mode for r in rows))
    for mode in modes:
        for label in dict.fromkeys(r.method for r in rows):
            pts = sorted((r.params_frac, r.metrics[key]) for r in rows if r.method == label and r.mode == mode)
            if pts:
                name = label if len(modes) == 1 else f"{label} ({mode})"
                ax.plot([100 * p for p, _ in pts], [c for _, c in pts], marker="o", label=name,
                        linestyle="-" if mode == modes[0] else "--")
    if causal and dense and dense.get("ppl"):
        ax.axhline(dense["ppl"], color="black", linewidth=0.8, label="dense")
        ax.set_yscale("log")
    ax.set_xlabel("linear-layer parameters kept (%)")
    ax.set_ylabel("validation perplexity (log)" if causal else "mean cosine to the original embeddings")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return write_png(path, fig)


def rows_as_dicts(rows: list[SweepRow]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        row = {k: v for k, v in vars(r).items() if k != "metrics"}
        out.append({**row, **r.metrics})
    return out
