"""Result files: every measuring command writes JSON with its metrics and the run's provenance."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_atomic  # noqa: F401  (re-exported for the result writers)


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_info(args: dict[str, Any] | None = None, seed: int | None = None, device=None) -> dict[str, Any]:
    from .. import __version__

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "structmat": __version__, "git_sha": git_sha(), "python": sys.version.split()[0],
        "torch": torch.__version__, "platform": platform.platform(), "device": device_name(device),
        "seed": seed, "args": args or {},
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    return write_atomic(path, (json.dumps(payload, indent=2, default=str) + "\n").encode())


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]], left: int = 1) -> str:
    """A padded Markdown table; the first ``left`` columns are left-aligned, the rest right-aligned (numbers)."""
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["| " + " | ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
            + " |" for line in lines]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(text)
