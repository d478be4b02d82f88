"""Monarch's forward at many tokens: the one-launch fused kernel (``kernels/_triton_monarch.py``, issue 12 deliver 3)
against the two-launch paths (``triton``: Triton stage 1 + cuBLAS stage 2; ``cublas``) and dense cuBLAS, bf16, per
layer: the bench-infer model's Monarch layers (nb=4, 50%: 2048^2, 2048->8192, 8192->2048) and `structmat bench
kernels`' 4096^2 rows (nb=4 and 8). Each fused tile setting is timed on its own, then the one the kernel picks; and
the training forward (the intermediate kept: the SAVE form against the two launches).
GPU times: ``triton.testing.do_bench`` medians (L2 flushed between calls), and replayed from a CUDA graph (warm).

    PYTHONPATH=src python benchmarks/experiments/monarch_many.py --out DIR [--tokens 1024,8192]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
import traceback
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch
import torch.nn.functional as F

SHAPES = [("monarch", 2048, 2048), ("monarch", 2048, 8192), ("monarch", 8192, 2048),
          ("monarch:nblocks=4", 4096, 4096), ("monarch:nblocks=8", 4096, 4096)]


def graph_ms(fn) -> float:
    from decode_layers import graph_us

    return graph_us([fn], reps=20) * 1e-3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--tokens", default="1024,8192")
    ap.add_argument("--shapes", default="", help="indices into SHAPES (default: all)")
    args = ap.parse_args()
    from triton.testing import do_bench

    from decode_probe import layer_for
    from structmat.eval.results import run_info, write_json
    from structmat.kernels import _triton_monarch as TM
    from structmat.kernels import dispatch, ops
    from structmat.structures.monarch import monarch_multiply

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"monarch-many-{stamp}.json"
    rep: dict = {"rows": [], "errors": [], "device": torch.cuda.get_device_name()}
    t0 = time.time()
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    for spec, inp, out in shapes:
        layer = layer_for(spec, inp, out)
        R, L = layer.R.detach(), layer.L.detach()
        flops = 2 * (R.numel() + L.numel())
        for n in [int(t) for t in args.tokens.split(",")]:
            torch.manual_seed(0)
            x = torch.randn(n, inp, device="cuda", dtype=torch.bfloat16)
            W = torch.randn(out, inp, device="cuda", dtype=torch.bfloat16) * inp ** -0.5
            row = dict(spec=spec, inp=inp, out=out, tokens=n, R=list(R.shape), L=list(L.shape))
            row["dense_ms"] = do_bench(lambda: F.linear(x, W), rep=100)
            row["dense_graph_ms"] = graph_ms(lambda: F.linear(x, W))
            with torch.no_grad():
                ref = monarch_multiply(x[:512].double(), R.double(), L.double())
                for be in ("triton", "cublas", "auto"):
                    try:
                        with dispatch.use_backend(be):
                            layer(x)
                            row[f"{be}_ms"] = do_bench(lambda: layer(x), rep=100)
                            row[f"{be}_graph_ms"] = graph_ms(lambda: layer(x))
                            got = layer(x[:512])
                            row[f"{be}_err"] = ((got.double() - ref).norm() / ref.norm()).item()
                    except Exception:
                        rep["errors"].append({"case": f"{spec}-{inp}x{out}-{n}-{be}",
                                              "trace": traceback.format_exc()[-1500:]})
                row["fused"] = {}
                for cfg in TM.CONFIGS:
                    try:
                        ms = do_bench(lambda: TM.monarch_fused(x, R, L, config=cfg), rep=100)
                        row["fused"][str(cfg)] = ms
                    except Exception:
                        rep["errors"].append({"case": f"{spec}-{inp}x{out}-{n}-fused{cfg}",
                                              "trace": traceback.format_exc()[-1500:]})
                try:
                    TM.monarch_fused(x, R, L)  # (picks its setting)
                    row["fused_ms"] = do_bench(lambda: TM.monarch_fused(x, R, L), rep=100)
                    row["fused_graph_ms"] = graph_ms(lambda: TM.monarch_fused(x, R, L))
                    got = TM.monarch_fused(x[:512].contiguous(), R, L)
                    row["fused_err"] = ((got.double() - ref).norm() / ref.norm()).item()
                    full = TM.monarch_fused(x, R, L)
                    with dispatch.use_backend("triton"):
                        two = layer(x)
                    row["fused_vs_triton_maxdiff"] = (full.float() - two.float()).abs().max().item()
                    row["fused_pick"] = str([k for k, v in TM._BEST.items() if k[1:5] == (R.shape[0], R.shape[1],
                                                                                          R.shape[2], L.shape[1])])
                except Exception:
                    rep["errors"].append({"case": f"{spec}-{inp}x{out}-{n}-fused",
                                          "trace": traceback.format_exc()[-1500:]})
                try:  # the training forward: y and the intermediate kept for the backward
                    h = torch.empty(n, R.shape[0] * R.shape[1], device=x.device, dtype=x.dtype)
                    TM.monarch_fused(x, R, L, save=h)  # (picks its setting)
                    row["train_fused_ms"] = do_bench(lambda: TM.monarch_fused(x, R, L, save=h), rep=100)
                    row["train_two_ms"] = do_bench(lambda: ops._two_launch_forward(x, R, L, "triton"), rep=100)
                except Exception:
                    rep["errors"].append({"case": f"{spec}-{inp}x{out}-{n}-train",
                                          "trace": traceback.format_exc()[-1500:]})
            for k in [k for k in row if k.endswith("_ms") and k != "dense_ms" and not k.endswith("graph_ms")]:
                row[k[:-3] + "_vs_dense"] = row["dense_ms"] / row[k]
                row[k[:-3] + "_tflops"] = flops * n / row[k] * 1e-9
            for k in [k for k in row if k.endswith("_graph_ms") and k != "dense_graph_ms"]:
                row[k[:-3] + "_vs_dense"] = row["dense_graph_ms"] / row[k]
            row["dense_tflops"] = 2 * inp * out * n / row["dense_ms"] * 1e-9
            rep["rows"].append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "fused"},
                  {k: round(v, 4) for k, v in row["fused"].items()}, flush=True)
            rep["seconds"] = time.time() - t0
            rep["run_info"] = run_info(vars(args), device="cuda")
            write_json(path, rep)
            del x, W
        del layer
    for e in rep["errors"]:
        print("ERROR", e["case"], e["trace"][-600:])
    print(f"wrote {path} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
