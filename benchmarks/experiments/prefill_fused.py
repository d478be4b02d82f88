"""Prefill (4x2048) of fused models beside their unfused forms, in one process (issue 12, session 9).

Run on the GPU machine:  ``PYTHONPATH=src python benchmarks/experiments/prefill_fused.py --out DIR``

``structmat bench infer`` measured the fused Monarch model's prefill at 0.93x dense (round 5, one process per model)
where the unfused one measured 1.18x (session 7): fused members run their own paths on strided views of the stacks.
Here dense and each structure, unfused and fused, are timed in one process (median of 5 forwards), and each
structured model's forward is profiled once: the CUDA kernels' total time per kernel name, so a path that changed
with the strided factors shows by name. Writes ``prefill-fused-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch


def main() -> int:
    from structmat.bench import infer

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--models", default="dense,monarch,monarch+fused,lowrank,lowrank+fused")
    args = ap.parse_args()
    rows: dict = {}
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"prefill-fused-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        model = infer.build(None if name == "dense" else name, torch.bfloat16, infer.SHAPE)
        row = rows[name] = {"prefill_tps": infer.prefill_tps(model, 4, 2048, 5)}
        ids = torch.randint(0, model.config.vocab_size, (4, 2048), device="cuda")
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
        # (kernel entries only: an operator's entry also counts its kernels' time)
        kernels = sorted(((e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
                          if str(e.device_type).endswith("CUDA") and e.self_device_time_total > 0),
                         key=lambda r: -r[1])
        row["kernels_us"] = [{"name": k[:120], "us": round(t, 1), "calls": c} for k, t, c in kernels[:20]]
        row["cuda_total_us"] = round(sum(t for _, t, _ in kernels), 1)
        rows["dense"] = rows.get("dense", row)
        row["vs_dense"] = row["prefill_tps"] / rows["dense"]["prefill_tps"]
        print(name, round(row["prefill_tps"]), round(row["vs_dense"], 3), row["cuda_total_us"], flush=True)
        for k in row["kernels_us"][:8]:
            print("   ", k, flush=True)
        path.write_text(json.dumps({"rows": rows, "device": torch.cuda.get_device_name(),
                                    "torch": torch.__version__}, indent=1))
        del model
        torch.cuda.empty_cache()
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
