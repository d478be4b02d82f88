"""Where a training step's GPU time goes: torch.profiler over a few steps of a preset, dense vs structured MLP.

    PYTHONPATH=src python benchmarks/profile_train_step.py --preset 60m --mlp dense lowrank:ratio=0.5 --out DIR

Prints, per variant, the step time and the top CUDA kernels; writes profile-train-step-<stamp>.json under --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import torch

from structmat.eval.results import run_info, write_json
from structmat.train.loop import param_groups
from structmat.train.models import make_plan, structured_llama


def profile(preset: str, mlp: str | None, batch: int, seq: int, vocab: int, steps: int, compile_: bool) -> dict:
    dev = torch.device("cuda")
    model = structured_llama(preset, vocab, make_plan(mlp) if mlp else None, max_seq_len=seq).to(dev)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    fwd = torch.compile(model) if compile_ else model
    x = torch.randint(0, vocab, (batch, seq), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / steps * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append({"name": e.key[:90], "ms_per_step": t / 3 / 1e3, "calls_per_step": e.count / 3})
    rows.sort(key=lambda r: -r["ms_per_step"])
    gpu_ms = sum(r["ms_per_step"] for r in rows)
    return {"mlp": mlp or "dense", "compile": compile_, "step_ms": ms, "tokens_per_s": batch * seq / ms * 1e3,
            "gpu_busy_ms": gpu_ms, "top": rows[:18]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="60m")
    p.add_argument("--mlp", nargs="+", default=["dense", "lowrank:ratio=0.5"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    res = []
    for mlp in a.mlp:
        r = profile(a.preset, None if mlp == "dense" else mlp, a.batch, a.seq, a.vocab, a.steps, a.compile)
        res.append(r)
        print(f"== {r['mlp']} compile={a.compile}: {r['step_ms']:.1f} ms/step ({r['tokens_per_s']:,.0f} tok/s), "
              f"GPU busy {r['gpu_busy_ms']:.1f} ms")
        for row in r["top"][:12]:
            print(f"   {row['ms_per_step']:7.2f} ms  x{row['calls_per_step']:5.0f}  {row['name']}")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    write_json(Path(a.out) / f"profile-train-step-{a.preset}-{stamp}.json", {"results": res, "run_info": run_info(vars(a))})


if __name__ == "__main__":
    main()
