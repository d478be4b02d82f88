"""Where the host time of ``structmat generate --compile`` goes, per decoded token, dense against structured.

Session 19 measured HF ``generate`` compiled (static cache, inductor reduce-overhead) at the bench shape on an H200:
low-rank 0.88x dense, block-diagonal 1.05x, while the captured decode step alone runs 1.5-1.8x. HF's loop waits on
the GPU every token (its stopping check reads a device tensor), so a token costs the host's work plus the GPU's
step; a structured model whose step is shorter but whose token is longer spends more host time per token. This
script profiles one N-token ``generate`` of each model (folders from ``generate_folders.py``), after the same
warm-up and timed rounds as ``structmat generate``, and writes per token: wall time, launches by kind (graph
replays, Triton/driver launches, runtime launches) and the self CPU time of the top host events, so the two models'
host work can be compared line by line.

    PYTHONPATH=src python benchmarks/experiments/compiled_generate_profile.py --dir DIR --out OUT [--structures ...]

One model per process gives each its own dynamo cache: the models of one process share the code object HF compiles,
so a later model's cache lookup first fails the guards of every earlier one.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch

LAUNCHES = {"graph": ("cudaGraphLaunch",), "driver": ("cuLaunchKernel", "cuLaunchKernelEx"),
            "runtime": ("cudaLaunchKernel", "cudaLaunchKernelExC")}


def profile_one(folder: Path, device: torch.device, tokens: int, rounds: int, top: int, skip_guards: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from structmat.cli import _load
    from structmat.generate import Runner

    loaded = _load(str(folder), None)
    runner = Runner(loaded.model, loaded.tokenizer, loaded.source, device=device,
                    dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, prompt="w5 w6 w7 w8", new_tokens=tokens, fuse=True, densify_sparse=False,
                    sample=False, temperature=0.8, seed=0, compile_backend="inductor")
    # skip_guard_eval_unsafe: after the warm-up compiled every graph, check only the guards that tell the cache
    # entries apart (what the guards cost per token is the difference)
    stance = (torch.compiler.set_stance("default", skip_guard_eval_unsafe=True) if skip_guards
              else contextlib.nullcontext())
    with stance:
        for _ in range(rounds):
            runner.round()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _, seconds = runner._run(tokens)
    rows = prof.key_averages()
    per = 1.0 / tokens
    launches = {kind: sum(r.count for r in rows if r.key in names) * per for kind, names in LAUNCHES.items()}
    host = sorted(rows, key=lambda r: r.self_cpu_time_total, reverse=True)[:top]
    m = runner.measured
    result = {"skip_guard_eval_unsafe": skip_guards, "decode_tokens_per_s": m.decode_tokens_per_s, "profiled_ms_per_token": seconds * 1e3 * per,
              "graphs_in_rounds": m.graphs_in_rounds, "structured_layers": m.structured_layers,
              "fused_groups": m.fused_groups, "launches_per_token": launches,
              "host_us_per_token": {r.key: round(r.self_cpu_time_total * per, 1) for r in host},
              "calls_per_token": {r.key: round(r.count * per, 2) for r in host}}
    del runner, loaded
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, help="folders from generate_folders.py")
    ap.add_argument("--structures", default="dense,lowrank,blockdiag")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip-guards", action="store_true", help="decode under skip_guard_eval_unsafe")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (tiny folders)")
    args = ap.parse_args()

    from structmat.bench.infer import warm_process_buffers
    from structmat.eval.results import run_info, write_json

    device = torch.device(args.device)
    if device.type == "cuda":
        warm_process_buffers(torch.bfloat16)
    results = {}
    for name in args.structures.split(","):
        results[name] = profile_one(Path(args.dir) / name, device, args.tokens, args.rounds, args.top,
                                    args.skip_guards)
        r = results[name]
        print(f"{name}: {r['decode_tokens_per_s']:.1f} tok/s, profiled {r['profiled_ms_per_token']:.3f} ms/token, "
              f"launches/token {r['launches_per_token']}", flush=True)
        for key, us in r["host_us_per_token"].items():
            print(f"  {us:9.1f} us  x{r['calls_per_token'][key]:<7} {key}")
    path = write_json(Path(args.out) / f"compiled-generate-profile-{args.structures.replace(',', '-')}{'-skip' if args.skip_guards else ''}.json",
                      {"results": results, "run_info": run_info(vars(args), device=device)})
    print(f"wrote {path}")
    print(json.dumps({k: v["decode_tokens_per_s"] for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
