"""Check the automatic dispatch's cost model against a kernel-benchmark results file, offline (no GPU).

For every row, ``structmat.kernels.dispatch.choose`` picks a backend from the shapes alone; the row's measured
per-backend timings say what that choice costs against the fastest measured option (forward rows may also use the
dense pre-merge; forward+backward rows do not: merged every step it measured slower, see dispatch.choose).

    PYTHONPATH=src python benchmarks/eval_dispatch.py benchmarks/results/kernels-20261122T061850Z.json
"""

import json
import statistics
import sys

import torch

from structmat.kernels import dispatch
from structmat.structures.monarch import monarch_block_rank

DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def row_model(r):
    in_f, out_f, n = r["in_features"], r["out_features"], r["tokens"]
    name, _, arg = r["structure"].partition(":")
    val = int(arg.split("=")[1])
    es = 4 if r["dtype"] == "fp32" else 2
    if name == "monarch":
        b = val
        u, p = out_f // b, in_f // b
        c = monarch_block_rank(in_f, out_f, b)
        numel = b * b * c * p + b * u * b * c
        nbytes = es * (numel + n * (in_f + 2 * b * b * c + out_f))
        return name, b, 2.0 * n * numel, nbytes, (es * b * b * c * p, es * b * u * b * c)  # (R's, L's bytes)
    elif name == "blockdiag":
        b = val
        numel = b * (out_f // b) * (in_f // b)
        nbytes = es * (numel + n * (in_f + out_f))
    else:
        b = 1
        numel = val * (in_f + out_f)
        nbytes = es * (numel + n * (in_f + out_f + 2 * val))
    return name, b, 2.0 * n * numel, nbytes, None


def main(path):
    data = json.load(open(path))
    regrets, vs_dense, misses = [], [], []
    for r in data["rows"]:
        if r["structure"].partition(":")[0] not in ("monarch", "blockdiag", "lowrank"):
            continue  # (N:M has one path besides its reference: nothing to choose)
        op, b, flops, nbytes, stages = row_model(r)
        training = r["mode"] == "fwdbwd"
        pick = dispatch.choose(op, r["tokens"], r["in_features"], r["out_features"], flops, nbytes, DT[r["dtype"]], b,
                               training, training, True, stages=stages)
        measured = dict(r["backends"])
        if op == "lowrank":  # lowrank's "triton"/"cublas" are its reference (two cuBLAS GEMMs)
            measured.setdefault("triton", measured["reference"])
        if pick not in measured:
            pick = "reference"
        best = min(measured, key=measured.get)
        regret = measured[pick] / measured[best]
        regrets.append(regret)
        vs_dense.append(r["dense_ms"] / measured[pick])
        if regret > 1.25:
            misses.append(f"{r['dtype']} {r['mode']:6s} {r['in_features']}->{r['out_features']} n={r['tokens']:<5} "
                          f"{r['structure']:22s} picked {pick} {measured[pick]:.3f} ms, best {best} "
                          f"{measured[best]:.3f} ms")
    print(f"{len(regrets)} rows; regret (picked/best measured): median {statistics.median(regrets):.3f}, "
          f"within 10%: {sum(x <= 1.1 for x in regrets)}, over 25%: {len(misses)}")
    fwd = [v for v, r in zip(vs_dense, data["rows"]) if r["mode"] == "fwd"]
    print(f"forward rows where the pick is slower than dense by > 10%: {sum(v < 0.9 for v in fwd)} of {len(fwd)}")
    # What the run itself measured for auto, per mode and token count (bf16), eager and replayed from CUDA graphs.
    for key, label in (("speedup", "eager"), ("graph_speedup", "CUDA graph")):
        for mode in ("fwd", "fwdbwd"):
            sel = [r for r in data["rows"] if r["dtype"] == "bf16" and r["mode"] == mode and r.get(key)]
            if not sel:
                continue
            counts = {n: (sum(r[key] < 0.9 for r in sel if r["tokens"] == n), sum(r["tokens"] == n for r in sel))
                      for n in sorted({r["tokens"] for r in sel})}
            print(f"bf16 {mode:6s} {label:10s} auto slower than 0.9x dense (tokens: slower/rows): "
                  + ", ".join(f"{n}: {a}/{b}" for n, (a, b) in counts.items()))
    for m in misses:
        print("  " + m)
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1])
