"""Kernels of one captured decode step, per model (issue 12, session 10).

Run on the GPU machine:  ``PYTHONPATH=src python benchmarks/experiments/step_profile.py --out DIR``

Round 5 measured the fused Monarch model's captured step at batch 8 slower than the unfused one (1.52 vs 1.34 ms)
where at batch 1 it is faster (0.90 vs 1.02 ms). For each model, the decode step at the given batch is captured in a
CUDA graph as ``infer.graph_decode_tps`` captures it, and 5 replays are profiled: each kernel's GPU time per step and
its calls, so the layers that differ show by kernel name (``--compile``: the step compiled by inductor first). Writes
``step-profile-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch


def main() -> int:
    from torch.profiler import ProfilerActivity, profile

    from structmat.bench import infer

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--models", default="monarch,monarch+fused")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--compile", action="store_true", help="the step compiled by inductor first (as "
                    "infer.graph_decode_tps's compile_mode='default'), then captured")
    args = ap.parse_args()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"step-profile-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows: dict = {}
    reps = 5
    for name in args.models.split(","):
        model = infer.build(None if name == "dense" else name, torch.bfloat16, infer.SHAPE)
        step, pos = infer.decode_step(model, args.batch, 32)
        if args.compile:
            torch._dynamo.reset()
            step = torch.compile(step)
            step()
        graph = infer.capture(step)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                graph.replay()
            torch.cuda.synchronize()
        kernels = sorted(((e.key, e.self_device_time_total / reps, e.count // reps) for e in prof.key_averages()
                          if str(e.device_type).endswith("CUDA") and e.self_device_time_total > 0),
                         key=lambda r: -r[1])
        rows[name] = {"kernels_us_per_step": [{"name": k[:140], "us": round(t, 2), "calls": c} for k, t, c in kernels],
                      "total_us": round(sum(t for _, t, _ in kernels), 1), "batch": args.batch}
        print(name, rows[name]["total_us"], flush=True)
        for k in rows[name]["kernels_us_per_step"][:14]:
            print("   ", k, flush=True)
        path.write_text(json.dumps({"rows": rows, "device": torch.cuda.get_device_name()}, indent=1))
        del model, graph
        torch.cuda.empty_cache()
    print("wrote", path)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
