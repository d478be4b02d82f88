"""Decode probe (issue 12): where a dense decode step's time goes, and each decode kernel's rate against dense.

Run on the GPU machine:  ``PYTHONPATH=src python benchmarks/experiments/decode_probe.py --out DIR``
Writes ``decode-probe-<UTC>.json``:
  ``breakdown``   for the bench-infer model shape (hidden 2048 / SwiGLU 8192 / 8 layers / vocab 32000, bf16, batch 1,
                  static cache): the captured step's time; the same step's linear layers alone (every nn.Linear and
                  structured layer called once on a random token, one CUDA graph); lm_head alone; and the eager
                  step's GPU kernels from torch.profiler, grouped (linear / attention / cache copies / the rest) with
                  their count. Then the step compiled by inductor (default mode) and captured the same way.
  ``kernels``     each structured layer of the model shape at 1-64 tokens, replayed from CUDA graphs: structmat's
                  decode kernels (multiply-reduce at <= SMALL_TOKENS tokens, and the tensor-core tiles forced at
                  those counts too), the reference path, dense ``F.linear`` (cuBLAS), and for 2:4 torch's
                  semi-structured sparse ``F.linear``; ms, GB/s on the layer's own bytes, ratio to dense
  ``prefill_24``  2:4 at prefill sizes: structmat's reference vs torch's semi-structured path vs dense
  ``monarch_4096``  Monarch nb=4 4096x4096 at 8192 tokens: dense, structmat's forward, and its two batched stages
                  alone (bytes, TFLOP/s): the measured account for the fused-prefill target
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
import traceback
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch
import torch.nn.functional as F

DTYPE = torch.bfloat16
TOKENS = (1, 2, 4, 8, 16, 64)


def graph_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=15, return_mode="median")


def _category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("gemm", "gemv", "nvjet", "cutlass", "xmma", "_decode_", "splitk", "cublas")):
        return "linear"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "efficient")):
        return "attention"
    if any(k in n for k in ("index_copy", "index_put", "scatter", "copy")):
        return "cache/copy"
    return "other"


def profile_kernels(step, reps: int = 5) -> dict:
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    cats: dict = {}
    names: dict = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.time_range.elapsed_us()
        c = cats.setdefault(_category(e.name), {"count": 0, "us": 0.0})
        c["count"] += 1
        c["us"] += us
        k = names.setdefault(e.name[:90], {"count": 0, "us": 0.0, "category": _category(e.name)})
        k["count"] += 1
        k["us"] += us
    for c in [*cats.values(), *names.values()]:
        c["count"] /= reps
        c["us"] /= reps
    top = sorted(names.items(), key=lambda kv: -kv[1]["us"])[:25]
    return {"per_step": cats, "kernels_per_step": sum(c["count"] for c in cats.values()),
            "kernel_us_per_step": sum(c["us"] for c in cats.values()), "top": dict(top)}


def linears_only_ms(model) -> float:
    from structmat.structures.base import StructuredLinear

    mods = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, StructuredLinear))]
    xs = [torch.randn(1, m.in_features, device="cuda", dtype=DTYPE) for m in mods]

    def run():
        with torch.no_grad():
            for m, x in zip(mods, xs):
                m(x)

    return graph_ms(run)


def breakdown(rep: dict, structures: list[str]) -> None:
    from structmat.bench import infer

    rep["breakdown"] = {}
    for name in structures:
        torch._dynamo.reset()
        model = infer.build(None if name == "dense" else name, DTYPE, infer.SHAPE)
        row = {}
        row["graph_step"] = infer.graph_decode_tps(model, 1)
        row["linears_only_ms"] = linears_only_ms(model)
        lm = model.lm_head.weight
        h = torch.randn(1, lm.shape[1], device="cuda", dtype=DTYPE)
        row["lm_head_ms"] = graph_ms(lambda: F.linear(h, lm))
        step, _ = infer.decode_step(model, 1)
        row["eager_profile"] = profile_kernels(step)
        rep["breakdown"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "eager_profile"}),
              json.dumps(row["eager_profile"]["per_step"]), flush=True)
        try:
            row["compiled_step"] = infer.graph_decode_tps(model, 1, compile_mode="default")
            cstep, _ = infer.decode_step(model, 1)
            cstep = torch.compile(cstep)
            row["compiled_profile"] = profile_kernels(cstep)
            print(name, "compiled", json.dumps(row["compiled_step"]),
                  json.dumps(row["compiled_profile"]["per_step"]), flush=True)
        except Exception:
            rep["errors"].append({"case": f"compiled-{name}", "trace": traceback.format_exc()[-3000:]})
            traceback.print_exc()
        del model
        torch.cuda.empty_cache()


def layer_for(structure: str, inp: int, out: int):
    from structmat.bench.infer import STRUCTURES
    from structmat.structures.base import resolve_spec, structure_class

    cfg = resolve_spec(STRUCTURES.get(structure, structure), inp, out)  # (a bench name, or any spec)
    kw = {k: v for k, v in cfg.to_dict().items() if k != "structure"}
    torch.manual_seed(0)
    layer = structure_class(cfg.to_dict()["structure"])(inp, out, bias=False, device="cuda", dtype=DTYPE, **kw)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, inp ** -0.5)
    return layer.eval()


def nbytes(layer) -> int:
    return sum(t.numel() * t.element_size() for _, t in [*layer.named_parameters(), *layer.named_buffers()])


def kernels(rep: dict, structures: list[str]) -> None:
    import structmat.kernels as K
    from structmat.kernels import _triton_decode as TD

    rep["kernels"] = []
    for inp, out in ((2048, 2048), (2048, 8192), (8192, 2048)):
        W = torch.randn(out, inp, device="cuda", dtype=DTYPE) * inp ** -0.5
        for s in structures:
            layer = layer_for(s, inp, out)
            wb = nbytes(layer)
            semi = None
            if s == "nm24":
                try:
                    from torch.sparse import to_sparse_semi_structured

                    semi = to_sparse_semi_structured(layer.to_dense().to(DTYPE).contiguous())
                except Exception as err:
                    rep["errors"].append({"case": f"semi-{inp}x{out}", "trace": repr(err)[:1000]})
            for n in TOKENS:
                x = torch.randn(n, inp, device="cuda", dtype=DTYPE)
                row = dict(structure=s, spec=layer.spec, inp=inp, out=out, tokens=n, weight_bytes=wb,
                           dense_bytes=W.numel() * 2)
                with torch.no_grad():
                    row["dense_ms"] = graph_ms(lambda: F.linear(x, W))
                    with K.use_backend("reference"):
                        row["reference_ms"] = graph_ms(lambda: layer(x))
                    with K.use_backend("decode"):
                        ref = F.linear(x.float(), layer.to_dense().float())
                        y = layer(x)
                        row["decode_err"] = ((y.float() - ref).norm() / ref.norm()).item()
                        row["decode_ms"] = graph_ms(lambda: layer(x))
                        if n <= TD.SMALL_TOKENS[0]:  # the tensor-core path at the same count, for comparison
                            saved = TD.SMALL_TOKENS[0]
                            TD.SMALL_TOKENS[0] = 0
                            try:
                                row["decode_dot_ms"] = graph_ms(lambda: layer(x))
                            finally:
                                TD.SMALL_TOKENS[0] = saved
                    if semi is not None:
                        try:
                            row["semi24_ms"] = graph_ms(lambda: F.linear(x, semi))
                        except Exception as err:
                            row["semi24_error"] = repr(err)[:300]
                    with K.use_backend("auto"):
                        layer(x)
                        row["auto_choice"] = K.LAST_CHOICE.get(layer.name, "?")
                row["decode_gbs"] = wb / row["decode_ms"] * 1e-6
                row["dense_gbs"] = row["dense_bytes"] / row["dense_ms"] * 1e-6
                row["decode_vs_dense"] = row["dense_ms"] / row["decode_ms"]
                rep["kernels"].append(row)
                print(f"{s:9s} {inp}x{out} n={n:2d} dense {row['dense_ms']*1e3:6.1f}us "
                      f"decode {row['decode_ms']*1e3:6.1f}us ({row['decode_vs_dense']:.2f}x, "
                      f"{row['decode_gbs']:.0f} GB/s) dot {row.get('decode_dot_ms', 0)*1e3:6.1f}us "
                      f"ref {row['reference_ms']*1e3:6.1f}us semi {row.get('semi24_ms', 0)*1e3:6.1f}us "
                      f"err {row['decode_err']:.1e}", flush=True)
        del W


def prefill_24(rep: dict) -> None:
    import structmat.kernels as K
    from torch.sparse import to_sparse_semi_structured

    rep["prefill_24"] = []
    for inp, out in ((2048, 2048), (2048, 8192), (8192, 2048)):
        layer = layer_for("nm24", inp, out)
        Wd = layer.to_dense().to(DTYPE).contiguous()
        semi = to_sparse_semi_structured(Wd)
        for n in (64, 512, 8192):
            x = torch.randn(n, inp, device="cuda", dtype=DTYPE)
            with torch.no_grad():
                row = dict(inp=inp, out=out, tokens=n, dense_ms=graph_ms(lambda: F.linear(x, Wd)),
                           semi24_ms=graph_ms(lambda: F.linear(x, semi)))
                with K.use_backend("auto"):
                    row["structmat_ms"] = graph_ms(lambda: layer(x))
                ref = F.linear(x.float(), Wd.float())
                row["semi24_err"] = ((F.linear(x, semi).float() - ref).norm() / ref.norm()).item()
            rep["prefill_24"].append(row)
            print("2:4 prefill", json.dumps(row), flush=True)


def monarch_4096(rep: dict) -> None:
    import structmat.kernels as K
    from structmat.structures.monarch import Monarch

    torch.manual_seed(0)
    layer = Monarch(4096, 4096, nblocks=4, bias=False, device="cuda", dtype=DTYPE).eval()
    R, L = layer.R.detach(), layer.L.detach()
    b, bc, p = R.shape
    u = L.shape[1]
    n = 8192
    x = torch.randn(n, 4096, device="cuda", dtype=DTYPE)
    W = torch.randn(4096, 4096, device="cuda", dtype=DTYPE)
    xb = x.view(n, b, p).transpose(0, 1)  # (b, n, p): strided view, as the cuBLAS engine reads it
    h = torch.randn(b, n, bc, device="cuda", dtype=DTYPE)
    with torch.no_grad():
        row = dict(tokens=n, R=list(R.shape), L=list(L.shape), dense_ms=graph_ms(lambda: F.linear(x, W)))
        with K.use_backend("auto"):
            row["structmat_ms"] = graph_ms(lambda: layer(x))
            layer(x)
            row["auto_choice"] = K.LAST_CHOICE.get("monarch")
        row["stage1_bmm_ms"] = graph_ms(lambda: torch.bmm(xb, R.transpose(1, 2)))
        row["stage2_bmm_ms"] = graph_ms(lambda: torch.bmm(h, L.transpose(1, 2)))
    flops1, flops2 = 2.0 * n * R.numel(), 2.0 * n * L.numel()
    row.update(dense_tflops=2.0 * n * W.numel() / row["dense_ms"] * 1e-9,
               stage1_tflops=flops1 / row["stage1_bmm_ms"] * 1e-9, stage2_tflops=flops2 / row["stage2_bmm_ms"] * 1e-9,
               structmat_tflops=(flops1 + flops2) / row["structmat_ms"] * 1e-9,
               speedup=row["dense_ms"] / row["structmat_ms"],
               bytes_dense=2 * (2 * n * 4096 + W.numel()),
               bytes_structmat_unfused=2 * (n * 4096 + R.numel() + 2 * n * b * bc + L.numel() + n * b * u))
    rep["monarch_4096"] = row
    print("monarch 4096", json.dumps(row), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sections", default="kernels,breakdown,prefill_24,monarch_4096")
    ap.add_argument("--structures", default="lowrank,monarch,blockdiag,nm24")
    ap.add_argument("--breakdown-models", default="dense,blockdiag")
    args = ap.parse_args()
    from structmat.eval.results import run_info, write_json

    rep: dict = {"errors": []}
    t0 = time.time()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"decode-probe-{stamp}.json"
    sections = {"kernels": lambda: kernels(rep, args.structures.split(",")),
                "breakdown": lambda: breakdown(rep, args.breakdown_models.split(",")),
                "prefill_24": lambda: prefill_24(rep), "monarch_4096": lambda: monarch_4096(rep)}
    for name in args.sections.split(","):
        try:
            sections[name]()
        except Exception:
            rep["errors"].append({"case": name, "trace": traceback.format_exc()[-3000:]})
            traceback.print_exc()
        rep["seconds"] = time.time() - t0
        rep["run_info"] = run_info(vars(args), device="cuda")
        write_json(path, rep)  # after every section: a later failure or timeout keeps what was measured
        print(f"   [{name} done at {time.time() - t0:.0f}s]", flush=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
