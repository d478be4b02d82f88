"""Loss curves of one or more training runs: loss vs tokens, vs training FLOPs and vs wall time (one PNG)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def plot_runs(runs: dict[str, dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """``runs``: label -> a ``train()`` results dict. Training loss (thin, smoothed) and validation loss (markers)
    against tokens, FLOPs and wall seconds; written atomically as PNG."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import write_png

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), sharey=True)
    for i, (label, res) in enumerate(runs.items()):
        color = f"C{i % 10}"
        hist, val = res.get("history", []), res.get("validation", [])
        k = max(1, len(hist) // 50)  # moving average over ~2% of the run
        for ax, key in zip(axes, ("tokens", "flops", "wall_s")):
            if hist:
                xs = [h[key] for h in hist]
                ys = [h["loss"] for h in hist]
                smooth = [sum(ys[max(0, j - k + 1):j + 1]) / len(ys[max(0, j - k + 1):j + 1]) for j in range(len(ys))]
                ax.plot(xs, smooth, color=color, lw=1, alpha=0.6)
            if val and all(key in v for v in val):
                ax.plot([v[key] for v in val], [v["loss"] for v in val], "o-", color=color, ms=3, label=label)
    for ax, name in zip(axes, ("tokens", "training FLOPs", "wall time (s)")):
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (line: train, smoothed; dots: validation)")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return write_png(path, fig, dpi=110)
