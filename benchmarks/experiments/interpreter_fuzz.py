"""Random shapes through Triton's interpreter (issue 12, session 18, CPU): every structure's forward (and input
gradient) on every backend at 1-80 tokens against x @ to_dense().T, and Monarch's fused many-token kernel in both
loop forms, with a tail and in its training form (the intermediate against the two-launch forward's), on random
block shapes and strided inputs. Float32 (the interpreter mishandles 16-bit dots).

    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/experiments/interpreter_fuzz.py [--seed 1] [--cases 80]
        [--fused-cases 25] [--out DIR]

Prints each failing case and writes ``interpreter-fuzz-<UTC>.json`` (cases run, failures).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import random
import sys
import traceback
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def layer_cases(rng: random.Random, count: int, failures: list) -> int:
    import structmat.kernels as K
    from structmat.structures import build

    run = 0
    for _ in range(count):
        kind, b = rng.choice(["lowrank", "monarch", "blockdiag", "nm"]), rng.choice([2, 4, 8])
        if kind == "lowrank":
            inn, out = rng.randint(8, 96), rng.randint(8, 96)
            spec = f"lowrank:rank={rng.randint(1, max(1, min(inn, out) // 2))}"
        elif kind == "nm":
            inn, out, spec = 4 * rng.randint(2, 24), rng.randint(4, 64), "nm:n=2,m=4"
        else:
            inn, out, spec = b * rng.randint(2, 12), b * rng.randint(1, 12), f"{kind}:nblocks={b}"
        try:
            layer = build(spec, inn, out, bias=rng.random() < 0.5).eval()
        except ValueError:  # (a shape the structure refuses, e.g. as large as dense)
            continue
        n, grad = rng.choice([1, 2, 3, 5, 8, 16, 17, 33, 64, 65, 80]), rng.random() < 0.3
        backend = rng.choice(["auto", "triton", "cublas", "decode"])
        case = dict(spec=spec, inn=inn, out=out, tokens=n, backend=backend, grad=grad)
        run += 1
        try:
            x = torch.randn(n, inn, requires_grad=grad)
            with K.use_backend(backend), torch.set_grad_enabled(grad):
                y = layer(x)
                g = torch.randn_like(y)
                gx = torch.autograd.grad((y * g).sum(), [x])[0] if grad else None
            W = layer.to_dense().detach()
            ref = x.detach() @ W.T + (layer.bias.detach() if layer.bias is not None else 0)
            err = max(rel(y.detach(), ref), rel(gx, g @ W) if grad else 0.0)
            if not err < 1e-4:
                failures.append(dict(case, err=err))
        except Exception:
            failures.append(dict(case, trace=traceback.format_exc()[-800:]))
    return run


def fused_cases(rng: random.Random, count: int, failures: list) -> int:
    from structmat.kernels import _triton_monarch as TM
    from structmat.kernels import ops
    from structmat.structures.monarch import monarch_multiply

    run = 0
    for _ in range(count):
        b, p, c, u = rng.choice([2, 3, 4, 8]), rng.randint(1, 40), rng.randint(1, 24), rng.randint(1, 40)
        n, strided = rng.choice([1, 7, 16, 17, 40, 65, 100]), rng.random() < 0.3
        x = torch.randn(n, b * p * 2)[:, ::2] if strided else torch.randn(n, b * p)
        R, L = torch.randn(b, b * c, p), torch.randn(b, u, b * c)
        ref = monarch_multiply(x.double(), R.double(), L.double())
        h_two = ops._two_launch_forward(x, R, L, "cublas")[1]
        for cfg in TM.INTERPRET_CONFIGS:
            for save in (False, True):
                case = dict(b=b, p=p, c=c, u=u, tokens=n, strided=strided, config=str(cfg), save=save)
                run += 1
                try:
                    h = torch.full_like(h_two, float("nan")) if save else None
                    err = rel(TM.monarch_fused(x, R, L, config=cfg, save=h), ref)
                    if save:
                        err = max(err, rel(h, h_two))
                    if not err < 1e-4:
                        failures.append(dict(case, err=err))
                except Exception:
                    failures.append(dict(case, trace=traceback.format_exc()[-800:]))
    return run


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cases", type=int, default=80)
    ap.add_argument("--fused-cases", type=int, default=25)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1 (the kernels run in Triton's interpreter on CPU tensors)")
    from structmat.eval.results import run_info, write_json
    from structmat.kernels import dispatch

    dispatch.INTERPRET = True  # (the dispatch decides as for a GPU tensor)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    failures: list = []
    layers = layer_cases(rng, args.cases, failures)
    fused = fused_cases(rng, args.fused_cases, failures)
    for f in failures:
        print("FAILED", f)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = write_json(Path(args.out) / f"interpreter-fuzz-{stamp}.json",
                      {"layer_cases": layers, "fused_cases": fused, "failures": failures, "run_info": run_info(vars(args))})
    print(f"{layers} layer cases, {fused} fused-kernel cases, {len(failures)} failures; wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
