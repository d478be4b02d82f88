"""What a model built by ``structmat bench infer`` holds after one forward in inference mode, counted on CPU.

    PYTHONPATH=src python benchmarks/experiments/resident_census.py [--tokens 64] [--out benchmarks/results]

The bench's builder at its full shape (bf16, hidden 2048 / SwiGLU 8192 / 8 layers / vocab 32000), dense and every
structure: parameter + buffer bytes, and every live tensor beside them after a forward (``hidden_tensors``: a cache,
a module attribute, a merged copy), by owner. The GPU's allocator-held bytes (workspaces) are not visible here; the
bench's ``untracked_bytes`` and ``--memory-history`` cover those. Writes ``resident-census-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
from pathlib import Path

import torch

from structmat.bench.infer import SHAPE, build, model_bytes
from structmat.eval.results import run_info, write_json
from structmat.inference import hidden_tensors, live_storages


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--structures", default="dense,lowrank,monarch,blockdiag,nm24")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    rows = {}
    for name in args.structures.split(","):
        before = live_storages("cpu")
        model = build(None if name == "dense" else name, torch.bfloat16, dict(SHAPE), device="cpu")
        with torch.inference_mode():
            model(input_ids=torch.randint(0, SHAPE["vocab_size"], (1, args.tokens)), use_cache=False)
        hidden = hidden_tensors(model, before, "cpu")
        rows[name] = dict(param_bytes=model_bytes(model), hidden_bytes=sum(r["bytes"] for r in hidden),
                          hidden=hidden[:8])
        print(name, {k: v for k, v in rows[name].items() if k != "hidden"}, flush=True)
        del model
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = write_json(out / f"resident-census-{stamp}.json",
                      dict(shape=SHAPE, dtype="bf16", device="cpu", models=rows, run_info=run_info(vars(args))))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
