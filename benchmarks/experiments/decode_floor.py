"""Decode floor (issue 12): how fast could the bench-infer model decode if its block linears cost nothing?

Run on the GPU machine:  ``PYTHONPATH=src python benchmarks/experiments/decode_floor.py --out DIR``

The model of ``structmat bench infer`` (bf16, Llama hidden 2048 / SwiGLU 8192 / 8 layers / vocab 32000), measured
the way ``bench infer`` measures it (HF ``generate`` eager and compiled with a static cache, and one decode step
replayed from a CUDA graph), once dense and once with every linear layer of the blocks replaced by a stand-in:
  ``floor``   no kernel at all: the output is a zero buffer expanded to the output shape (a view, nothing launched).
              What remains is everything that is not a block linear (norms, rotary, attention, cache writes,
              lm_head, HF generate's host loop). dense / floor bounds the speedup ANY structure can reach here.
  ``floor1``  one small kernel per linear (a zero fill of the output): the bound for a structure that runs one
              launch per layer (block-diagonal, N:M), since a launch inside a graph has a fixed cost
  ``floor2``  two dependent small kernels per linear: the bound for two-stage structures (low-rank, Monarch)
The fairness checks of compiled ``generate`` ride along: per-repetition times (not only the median), 32 and 64 new
tokens (a fixed cost per call would show as a difference), graphs compiled (recompiles would show), and the gap
between a compiled generate token and the captured step (the host loop of ``generate``).
Optional: ``--step-compile`` adds the step compiled by inductor and then captured (elementwise work fused; for a
floor model that is no bound: its stand-ins ignore their inputs, so inductor removes what feeds them); a
bench-infer structure in ``--models`` is measured in the same process beside them (ratios within one host state).
Writes ``decode-floor-<UTC>.json`` after every measurement (a time limit keeps the rows done).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
import traceback
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch

DTYPE = torch.bfloat16


def timed_generate(model, new_tokens: int, reps: int) -> dict:
    """infer.generate_tps (compiled, cudagraphs backend), plus the spread of the repetitions."""
    from structmat.bench import infer

    row = infer.generate_tps(model, 1, new_tokens, True, "cudagraphs", "", reps)
    row["new_tokens"] = new_tokens
    row["ms_per_token"] = 1e3 / row["tokens_per_s"]
    return row


def ratios(rep: dict) -> None:
    """Each model's speed over dense's (for a floor model: the best speedup any structure can reach there), and the
    host loop of compiled generate (a compiled token minus the captured step)."""
    dense = rep["models"].get("dense", {})
    for row in rep["models"].values():
        bound = {}
        for kind in ("graph", "eager", "compiled", "graph_compiled"):
            for a, b in zip(row.get(kind, []), dense.get(kind, [])):
                bound[f"{kind}_b{a['batch']}" + (f"_n{a['new_tokens']}" if "new_tokens" in a else "")] = (
                    a["tokens_per_s"] / b["tokens_per_s"])
        row["speed_vs_dense"] = bound
        for g in row.get("compiled", []):
            if row.get("graph"):
                g["host_gap_ms"] = g["ms_per_token"] - row["graph"][0]["ms_per_step"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--models", default="dense,floor,floor1,floor2",
                    help="dense, floor / floor1 / floor2, or a bench-infer structure (lowrank, monarch, blockdiag, "
                         "nm24), measured in this order, all in this process (the same host state for every row)")
    ap.add_argument("--graph-batches", default="1,8,32", help="batches of the captured step")
    ap.add_argument("--eager-models", default=None, help="models that get eager HF generate (default: "
                                                           "--generate-models)")
    ap.add_argument("--generate-models", default="dense,floor", help="models that also get compiled HF generate")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--step-compile", default="", help="models whose step is also compiled by inductor")
    ap.add_argument("--eager-interleaved", default="", help="models whose eager HF generate is also timed "
                    "interleaved: all built at once, each round timing every model once in a rotated order, the "
                    "median over rounds (host drift between models shows as spread instead of as a ratio)")
    ap.add_argument("--eager-rounds", type=int, default=5)
    args = ap.parse_args()
    if args.eager_models is None:
        args.eager_models = args.generate_models
    from structmat.bench import infer
    from structmat.eval.results import run_info, write_json

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"decode-floor-{stamp}.json"
    rep: dict = {"models": {}, "errors": [], "shape": infer.SHAPE, "dtype": "bf16"}
    t0 = time.time()

    def save():
        ratios(rep)
        rep["seconds"] = time.time() - t0
        rep["run_info"] = run_info(vars(args), device="cuda")
        write_json(path, rep)

    infer.warm_process_buffers(DTYPE)
    gen_models = args.generate_models.split(",")
    batches = [int(b) for b in args.graph_batches.split(",")]
    for name in args.models.split(","):
        torch._dynamo.reset()
        if name.startswith("floor"):
            model = infer.floor_model(DTYPE, infer.SHAPE, int(name[5:] or 0))
        else:
            model = infer.build(None if name == "dense" else name, DTYPE, infer.SHAPE)
        row = rep["models"].setdefault(name, {"param_bytes": infer.model_bytes(model)})
        steps = {"graph": lambda: [infer.graph_decode_tps(model, b) for b in batches]}
        if name in args.eager_models.split(","):
            steps["eager"] = lambda: [infer.generate_tps(model, 1, 32, False, "", "", args.reps)]
        if name in gen_models:
            steps["compiled"] = lambda: [timed_generate(model, n, args.reps) for n in (32, 64)]
        if name in args.step_compile.split(","):
            steps["graph_compiled"] = lambda: [infer.graph_decode_tps(model, 1, compile_mode="default")]
        for key, fn in steps.items():
            try:
                if key in ("compiled", "graph_compiled"):
                    torch._dynamo.reset()
                row[key] = fn()
            except Exception:
                rep["errors"].append({"case": f"{name}/{key}", "trace": traceback.format_exc()[-3000:]})
                traceback.print_exc()
            save()
            print(name, key, json.dumps(row.get(key), default=str), f"[{time.time() - t0:.0f}s]", flush=True)
        del model
        torch.cuda.empty_cache()
    names = [n for n in args.eager_interleaved.split(",") if n]
    if names:
        import statistics

        models = {n: infer.build(None if n == "dense" else n, DTYPE, infer.SHAPE) for n in names}
        runs: dict = {n: [] for n in names}
        for r in range(args.eager_rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                runs[n].append(infer.generate_tps(models[n], 1, 32, False, "", "", 1)["tokens_per_s"])
            print("eager round", r, {n: round(v[-1], 1) for n, v in runs.items()}, flush=True)
        # (a NaN sample: the 32-token call was no slower than the 1-token one, host noise; left out of the median)
        med = {n: statistics.median([t for t in v if t == t] or [float("nan")]) for n, v in runs.items()}
        # each round's ratio to the dense model timed beside it: on a noisy host (session 23's H100: dense 94-152
        # tokens/s over nine rounds) the median of these paired ratios is steadier than the ratio of the medians
        paired = {n: [t / d for t, d in zip(v, runs["dense"]) if t == t and d == d] if "dense" in runs else []
                  for n, v in runs.items()}
        rep["eager_interleaved"] = {n: {"tokens_per_s": runs[n], "median": med[n],
                                        "vs_dense": med[n] / med["dense"] if "dense" in med else None,
                                        "vs_dense_per_round": paired[n],
                                        "vs_dense_paired_median": statistics.median(paired[n]) if paired[n] else None}
                                    for n in names}
        del models
        save()
    save()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
