"""Prefill (4x2048) of fused models beside their unfused forms, in one process (issue 12, session 9).

Run on the GPU machine:  ``PYTHONPATH=src python benchmarks/experiments/prefill_fused.py --out DIR``

``structmat bench infer`` measured the fused Monarch model's prefill at 0.93x dense (round 5, one process per model)
where the unfused one measured 1.18x (session 7): fused members run their own paths on strided views of the stacks.
Here dense and each structure, unfused and fused, are timed in one process (median of 5 forwards), and each
structured model's forward is profiled once: the CUDA kernels' total time per kernel name, so a path that changed
with the strided factors shows by name. Writes ``prefill-fused-<UTC>.json``.
Session 10's run (``prefill-fused-20261204T093841Z.json``) found the same kernels and GPU time fused and unfused
but 3.5 ms more wall time per fused forward, and CPU profiles (sessions 10, 17, 18) found no host-side difference.
So each row also has (session 18): ``host_ms``, the host's time to issue one forward (no sync inside the timed call;
a sync inside the forward shows as host time close to the wall time), ``wall_ms`` (synchronized), ``gpu_busy_ms``
(the union of the forward's kernel intervals) and ``gpu_idle_ms`` (first kernel start to last kernel end, less the
busy time), with the five longest idle gaps and the kernels on either side of each: where the GPU waits, and after
what.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch


def host_and_wall(forward, reps: int = 5) -> dict:
    """Medians over ``reps`` forwards (no grad): the host's time to return from one (the GPU idle before it, no sync
    inside the timed call) and the synchronized wall time."""
    import time

    host, wall = [], []
    with torch.no_grad():
        forward()
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            forward()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            host.append((t1 - t0) * 1e3)
            wall.append((time.perf_counter() - t0) * 1e3)
    return {"host_ms": sorted(host)[reps // 2], "wall_ms": sorted(wall)[reps // 2]}


def gpu_gaps(prof, top: int = 5) -> dict:
    """From a profile of one forward: the union of its kernels' intervals (busy), the idle time between the first
    kernel's start and the last one's end, and the ``top`` longest idle gaps with the kernels before and after."""
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if str(e.device_type).endswith("CUDA") and e.time_range.end > e.time_range.start)
    if not kernels:
        return {}
    busy, gaps, end, last = 0.0, [], kernels[0][0], kernels[0][2]
    for start, stop, name in kernels:
        if start > end:
            gaps.append((start - end, last, name))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, last = stop, name
    gaps.sort(reverse=True)
    return {"gpu_busy_ms": busy / 1e3, "gpu_idle_ms": (end - kernels[0][0] - busy) / 1e3, "kernels": len(kernels),
            "longest_gaps": [{"us": round(g, 1), "after": a[:100], "before": b[:100]} for g, a, b in gaps[:top]]}


def main() -> int:
    from structmat.bench import infer

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--models", default="dense,monarch,monarch+fused,lowrank,lowrank+fused")
    ap.add_argument("--compiled", action="store_true",
                    help="(session 20) also each model's forward compiled by inductor (static shapes): rows "
                         "'<model>@compiled', profiled the same way")
    ap.add_argument("--scope", default="blocks", choices=["blocks", "model"],
                    help="what --compiled compiles (structmat.bench.infer.compiled_forward)")
    ap.add_argument("--mode", default="default", help="inductor mode for --compiled (e.g. reduce-overhead)")
    args = ap.parse_args()
    rows: dict = {}
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"prefill-fused-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    forms = [(name, False) for name in args.models.split(",")]
    if args.compiled:
        forms += [(name, True) for name in args.models.split(",")]
    for name, compiled in forms:
        model = infer.build(None if name == "dense" else name, torch.bfloat16, infer.SHAPE)
        if compiled:
            torch._dynamo.reset()
            held = infer.compiled_forward(model, args.scope, args.mode)  # (kept: its exit restores the model)
            model = held.__enter__()
            name = f"{name}@compiled-{args.scope}-{args.mode}"
        ids = torch.randint(0, model.config.vocab_size, (4, 2048), device="cuda")
        row = rows[name] = {}
        row.update(host_and_wall(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)))
        row["prefill_tps"] = 4 * 2048 / row["wall_ms"] * 1e3
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
        row.update(gpu_gaps(prof))
        # (kernel entries only: an operator's entry also counts its kernels' time)
        kernels = sorted(((e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
                          if str(e.device_type).endswith("CUDA") and e.self_device_time_total > 0),
                         key=lambda r: -r[1])
        row["kernels_us"] = [{"name": k[:120], "us": round(t, 1), "calls": c} for k, t, c in kernels[:20]]
        row["cuda_total_us"] = round(sum(t for _, t, _ in kernels), 1)
        dense = rows.get(f"dense@compiled-{args.scope}-{args.mode}" if compiled else "dense", row)
        row["vs_dense"] = row["prefill_tps"] / dense["prefill_tps"]
        print(name, round(row["prefill_tps"]), round(row["vs_dense"], 3), row["cuda_total_us"],
              {k: round(row[k], 2) for k in ("host_ms", "wall_ms", "gpu_busy_ms", "gpu_idle_ms") if k in row},
              flush=True)
        for k in row["kernels_us"][:8]:
            print("   ", k, flush=True)
        path.write_text(json.dumps({"rows": rows, "device": torch.cuda.get_device_name(),
                                    "torch": torch.__version__}, indent=1))
        model = None
        torch.cuda.empty_cache()
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
