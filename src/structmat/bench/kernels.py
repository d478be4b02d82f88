"""The kernel benchmark: structured products vs dense cuBLAS over tokens x shapes x structures x dtypes.

Run on a CUDA GPU:  ``PYTHONPATH=src python -m structmat.bench.kernels [--quick] [--out benchmarks/results]``
(or ``structmat bench kernels`` once the CLI forwards to :func:`main`).

Every row times, with the median of ``triton.testing.do_bench``, one structure at one (shape, tokens, dtype, mode):
  ``ms``         the layer's product as dispatched by ``auto`` (what a user gets), bias excluded
  ``backends``   ms of each backend forced (triton, cublas, dense pre-merge (in training: merged differentiably
                 every step), reference PyTorch)
  ``dense_ms``   dense cuBLAS ``F.linear`` with a full weight, measured in the same run
  ``speedup``    dense_ms / ms; ``ideal`` dense FLOPs / structure FLOPs; ``pct_ideal`` = speedup / ideal
  ``tflops``     structure FLOPs / ms (forward+backward counts 3x the forward FLOPs, as for dense)
  ``dispatch``   the backend that ``auto`` picked; ``best`` the fastest forced backend
  ``graph_ms``, ``dense_graph_ms``, ``graph_speedup``  (with ``--graphs``) the same call for ``auto`` and for dense,
                 replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``): GPU time without the host's
                 launch cost, i.e. what ``torch.compile(mode="reduce-overhead")`` or a captured training step gets.
                 No L2 flush between replays (weights up to the 60 MB L2 stay cached, for dense too).
  ``cold_graph_ms``, ``dense_cold_graph_ms``, ``cold_graph_speedup``  (with ``--graphs``, forward at <= 64 tokens) the
                 same, from one CUDA graph that runs distinct copies of the layer (of the dense weight) whose bytes
                 together exceed ``COLD_BYTES``: every call reads its weight from HBM, as in a model's decode step,
                 where a layer's weight is never still in L2 from its previous call (per call)
Writes ``kernels-<UTC date-time>.json`` (rows + run_info) and a PNG of speed vs dense next to it.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

TOKENS = (1, 16, 256, 2048, 8192, 16384)
SHAPES = ((4096, 4096), (4096, 16384), (16384, 4096), (1024, 1024), (8192, 8192))  # the targets' shapes first
NBLOCKS = (2, 4, 8)
QUICK_TOKENS = (1, 256, 8192)
QUICK_SHAPES = ((4096, 4096), (4096, 16384))
GRAPH_REP_MS = 5  # per CUDA-graph timing (10 replays of ~5 ms each): host noise is gone, a short run is stable
COLD_BYTES = 256e6  # the copies of a cold timing hold at least this many weight bytes (4x the largest L2, 60 MB)
COLD_MAX_TOKENS = 64  # cold timings at decode's token counts (above, the products are no longer weight-bound)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _git_sha() -> str:
    if os.environ.get("STRUCTMAT_GIT_SHA"):
        return os.environ["STRUCTMAT_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except Exception:
        return os.environ.get("STRUCTMAT_GIT_SHA", "unknown")


def _bench_ms(fn, warmup: int, rep: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _graph_ms(fn, rep: int) -> float | None:
    """Median ms of ``fn`` replayed from a CUDA graph; None (recorded as such) where capture fails."""
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    except Exception as err:  # a path that cannot be captured is reported, not hidden
        print(f"  (no CUDA-graph timing: {err!r:.200})", file=sys.stderr)
        return None


def structure_cases(in_f: int, out_f: int, quick: bool):
    """(label, factory) for every structure of the grid at this shape; skips what the structure rejects."""
    from structmat.structures.blockdiag import BlockDiagonal
    from structmat.structures.lowrank import LowRank
    from structmat.structures.monarch import Monarch
    from structmat.structures.sparse import NMSparse

    cases = []
    for b in ((4,) if quick else NBLOCKS):
        if b == 2:
            pass  # Monarch at nblocks=2 has as many parameters as dense: rejected by design (see the skip list)
        else:
            cases.append((f"monarch:nblocks={b}", lambda b=b: Monarch(in_f, out_f, nblocks=b, bias=False)))
    for b in ((4,) if quick else NBLOCKS):
        cases.append((f"blockdiag:nblocks={b}", lambda b=b: BlockDiagonal(in_f, out_f, nblocks=b, bias=False)))
    m = min(in_f, out_f)
    for r in ((m // 4,) if quick else (m // 4, m // 16)):
        cases.append((f"lowrank:rank={r}", lambda r=r: LowRank(in_f, out_f, rank=r, bias=False)))
    cases.append(("nm:n=2,m=4", lambda: NMSparse(in_f, out_f, n=2, m=4, bias=False)))
    return cases


def _layer_step(layer, x, g, mode: str):
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return layer._matmul(x)
        return fwd
    params = [p for p in layer.parameters()]
    return lambda: torch.autograd.grad(layer._matmul(x), [x, *params], g)


def _dense_step(W, x, g, mode: str):
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return F.linear(x, W)
        return fwd
    return lambda: torch.autograd.grad(F.linear(x, W), [x, W], g)


def _cold_graph_ms(make_step, nbytes: int) -> float | None:
    """Per-call ms of ``make_step()``'s calls (each on its own copy of the weights) replayed from one CUDA graph, the
    copies together at least COLD_BYTES: the weights come from HBM on every call."""
    import math

    k = int(min(256, max(2, math.ceil(COLD_BYTES / max(nbytes, 1)))))
    steps = [make_step() for _ in range(k)]

    def run_all():
        for step in steps:
            step()

    ms = _graph_ms(run_all, GRAPH_REP_MS)
    return None if ms is None else ms / k


def _time_layer(layer, x, g, mode: str, warmup: int, rep: int) -> float:
    return _bench_ms(_layer_step(layer, x, g, mode), warmup, rep)


def _time_dense(W, x, g, mode: str, warmup: int, rep: int) -> float:
    return _bench_ms(_dense_step(W, x, g, mode), warmup, rep)


def _time_semi_structured(in_f, out_f, n, dtype, warmup, rep):
    """2:4 through torch's semi-structured sparse tensor (cuSPARSELt/CUTLASS), forward only."""
    from torch.sparse import to_sparse_semi_structured

    W = torch.randn(out_f, in_f, device="cuda", dtype=dtype)
    mask = torch.tensor([1, 1, 0, 0], device="cuda", dtype=torch.bool).repeat(out_f, in_f // 4)
    Ws = to_sparse_semi_structured(W * mask)
    x = torch.randn(n, in_f, device="cuda", dtype=dtype)
    with torch.no_grad():
        F.linear(x, Ws)  # may raise for unsupported shapes
        return _bench_ms(lambda: F.linear(x, Ws), warmup, rep)


def run_grid(quick: bool = False, dtypes=("bf16",), subset_dtypes=("fp16", "fp32"), modes=("fwd", "fwdbwd"),
             warmup: int = 5, rep: int = 20, semi_structured: bool = True, log=print, budget_s: float = 1e9,
             checkpoint=None, graphs: bool = False, tokens=None, shapes=None) -> dict:
    import structmat.kernels as K

    if not torch.cuda.is_available():
        raise RuntimeError("the kernel benchmark needs a CUDA GPU (run it on an H100/H200)")
    torch.manual_seed(0)
    tokens_all = tokens or (QUICK_TOKENS if quick else TOKENS)
    shapes_all = shapes or (QUICK_SHAPES if quick else SHAPES)
    jobs = [(dt, s, n) for dt in dtypes for s in shapes_all for n in tokens_all]
    if not (quick or tokens or shapes):  # other dtypes on a subset: the square 4096 shape, decode and large batch
        jobs += [(dt, (4096, 4096), n) for dt in subset_dtypes for n in (16, 8192)]
    rows, semi = [], []
    skipped = ["monarch:nblocks=2 (as many parameters as dense: rejected by design)",
               "nm:n=2,m=4 in fwdbwd (its kernels are inference ones: decode at few tokens, the tile expansion "
               "above; training runs its PyTorch reference)"]
    t_start = time.time()
    result = dict(rows=rows, semi_structured_2_4=semi, skipped=skipped, complete=False)
    for dname, (in_f, out_f), n in jobs:
        if time.time() - t_start > budget_s:
            skipped.append(f"not run (time budget {budget_s:.0f} s spent): {dname} {in_f}->{out_f} tokens={n}")
            continue
        dtype = DTYPES[dname]
        W = torch.randn(out_f, in_f, device="cuda", dtype=dtype) * in_f**-0.5
        x = torch.randn(n, in_f, device="cuda", dtype=dtype)
        for mode in modes:
            xr = x.detach().requires_grad_(mode == "fwdbwd")
            Wr = W.detach().requires_grad_(mode == "fwdbwd")
            g = torch.randn(n, out_f, device="cuda", dtype=dtype)
            dense_ms = _time_dense(Wr, xr, g, mode, warmup, rep)
            dense_graph_ms = _graph_ms(_dense_step(Wr, xr, g, mode), GRAPH_REP_MS) if graphs else None
            cold = graphs and mode == "fwd" and n <= COLD_MAX_TOKENS
            dense_cold_ms = (_cold_graph_ms(lambda W=W, x=xr, g=g: _dense_step(W.clone(), x, g, mode),
                                            W.numel() * W.element_size())
                             if cold else None)
            dense_flops = 2.0 * n * in_f * out_f * (3 if mode == "fwdbwd" else 1)
            for label, make in structure_cases(in_f, out_f, quick):
                if label.startswith("nm") and mode != "fwd":
                    continue
                try:
                    layer = make().to(device="cuda", dtype=dtype)
                except ValueError as err:
                    skipped.append(f"{label} {in_f}->{out_f}: {err}")
                    continue
                layer.requires_grad_(mode == "fwdbwd")
                flops = layer._weight_flops(n) * (3 if mode == "fwdbwd" else 1)
                backends = {}
                kind = label.split(":")[0]
                for be in ("triton", "cublas", "dense", "reference"):
                    if be in ("triton", "cublas") and kind in ("lowrank", "nm"):
                        continue  # low-rank's fast path is cuBLAS (== reference), N:M's the decode kernel
                    with K.use_backend(be):
                        backends[be] = _time_layer(layer, xr, g, mode, warmup, rep)
                K.clear_cache()
                with K.use_backend("auto"):
                    ms = _time_layer(layer, xr, g, mode, warmup, rep)
                    graph_ms = _graph_ms(_layer_step(layer, xr, g, mode), GRAPH_REP_MS) if graphs else None
                    nbytes = sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])
                    cold_ms = (_cold_graph_ms(
                        lambda layer=layer, x=xr, g=g: _layer_step(copy.deepcopy(layer), x, g, mode), nbytes)
                               if cold else None)
                    choice = (K.LAST_CHOICE.get(kind) or "reference")
                    if kind == "lowrank" and choice not in ("dense", "decode"):
                        choice = "cublas"
                err = None
                if mode == "fwd":  # the math must not change with the backend: auto vs reference, fp32 norms
                    with torch.no_grad():
                        y_auto = layer._matmul(x).float()
                        with K.use_backend("reference"):
                            y_ref = layer._matmul(x).float()
                        err = float((y_auto - y_ref).norm() / y_ref.norm().clamp_min(1e-30))
                K.clear_cache()
                best = min(backends, key=backends.get)
                speedup = dense_ms / ms
                ideal = dense_flops / flops
                row = dict(dtype=dname, mode=mode, in_features=in_f, out_features=out_f, tokens=n, structure=label,
                           ms=ms, dense_ms=dense_ms, backends=backends, dispatch=choice, best=best,
                           tflops=flops / ms * 1e-9, dense_tflops=dense_flops / dense_ms * 1e-9, speedup=speedup,
                           ideal=ideal, pct_ideal=100.0 * speedup / ideal, rel_err_vs_reference=err,
                           graph_ms=graph_ms, dense_graph_ms=dense_graph_ms,
                           graph_speedup=dense_graph_ms / graph_ms if graph_ms and dense_graph_ms else None,
                           cold_graph_ms=cold_ms, dense_cold_graph_ms=dense_cold_ms,
                           cold_graph_speedup=dense_cold_ms / cold_ms if cold_ms and dense_cold_ms else None)
                rows.append(row)
                log(f"{dname} {mode:6s} {in_f:>5}->{out_f:<5} n={n:<5} {label:22s} {ms:8.4f} ms  dense {dense_ms:8.4f}"
                    f"  x{speedup:5.2f} (ideal {ideal:4.2f}, {row['pct_ideal']:5.1f}%)  {choice:9s} "
                    + " ".join(f"{k}={v:.4f}" for k, v in backends.items())
                    + (f"  graph x{row['graph_speedup']:.2f}" if row["graph_speedup"] else "")
                    + (f"  cold x{row['cold_graph_speedup']:.2f}" if row["cold_graph_speedup"] else ""))
                del layer
            del xr, Wr, g
        if semi_structured and dname == "bf16" and n in (16, 256, 2048, 8192, 16384):
            try:
                ms = _time_semi_structured(in_f, out_f, n, dtype, warmup, rep)
                dms = _time_dense(W, x, None, "fwd", warmup, rep)
                semi.append(dict(in_features=in_f, out_features=out_f, tokens=n, ms=ms, dense_ms=dms,
                                 speedup=dms / ms))
                log(f"2:4 semi-structured {in_f}->{out_f} n={n}: {ms:.4f} ms vs dense {dms:.4f} (x{dms / ms:.2f})")
            except Exception as err:  # unsupported shape / library missing: record it
                semi.append(dict(in_features=in_f, out_features=out_f, tokens=n, error=repr(err)[:200]))
        del W, x
        torch.cuda.empty_cache()
        result["seconds"] = time.time() - t_start
        if checkpoint is not None:
            checkpoint(result)
    result["complete"] = not any(s.startswith("not run") for s in skipped)
    result["seconds"] = time.time() - t_start
    return result


def run_info(args: dict) -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    return dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), git_sha=_git_sha(),
                device=torch.cuda.get_device_name(0), sm_count=props.multi_processor_count,
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), args=args, argv=sys.argv)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["dtype"] == "bf16"]
    shapes = sorted({(r["in_features"], r["out_features"]) for r in rows})
    panels = [(mode, "speedup") for mode in ("fwd", "fwdbwd")]
    if any(r.get("graph_speedup") for r in rows):  # the same rows replayed from CUDA graphs (no host cost)
        panels += [(mode, "graph_speedup") for mode in ("fwd", "fwdbwd")]
    fig, axes = plt.subplots(len(panels), max(1, len(shapes)), figsize=(4.2 * max(1, len(shapes)), 3.5 * len(panels)),
                             squeeze=False)
    for i, (mode, key) in enumerate(panels):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            sel = [r for r in rows if r["mode"] == mode and (r["in_features"], r["out_features"]) == shape
                   and r.get(key)]
            for label in sorted({r["structure"] for r in sel}):
                pts = sorted((r["tokens"], r[key]) for r in sel if r["structure"] == label)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax.axhline(1.0, color="k", ls="--", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"bf16 {mode} {shape[0]}->{shape[1]}" + (" (CUDA graph)" if key != "speedup" else ""),
                         fontsize=9)
            ax.set_xlabel("tokens")
            if j == 0:
                ax.set_ylabel("speed vs dense cuBLAS (x)")
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"structmat kernels on {result['run_info']['device']} ({result['run_info']['date']})")
    fig.tight_layout()
    from ..atomic import write_png

    return write_png(path, fig, dpi=110)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked (exit status 2 before anything runs); ``tokens``/``shapes`` come back as tuples."""
    ap = argparse.ArgumentParser(prog="structmat bench kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small subset (2 shapes, 3 token counts, nblocks=4)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON and PNG")
    ap.add_argument("--dtypes", default="bf16", help="comma list of full-grid dtypes (bf16,fp16,fp32)")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--rep", type=int, default=20, help="do_bench rep (ms)")
    ap.add_argument("--no-semi", action="store_true", help="skip the 2:4 semi-structured timings")
    ap.add_argument("--calibrate", action="store_true",
                    help="time each GEMM role on both engines first (ops.calibrate)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new grid points after this long")
    ap.add_argument("--graphs", action="store_true",
                    help="also time auto and dense replayed from CUDA graphs (GPU time without host launch cost)")
    ap.add_argument("--tokens", default=None, help="comma list of token counts instead of the grid's (e.g. 1,4,16)")
    ap.add_argument("--shapes", default=None,
                    help="comma list of INxOUT shapes instead of the grid's (e.g. 2048x8192,8192x2048)")
    args = ap.parse_args(argv)
    try:
        tokens = tuple(int(t) for t in args.tokens.split(",")) if args.tokens else None
        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")) if args.shapes else None
    except ValueError:
        ap.error("--tokens takes integers (1,4,16); --shapes takes INxOUT pairs (2048x8192,8192x2048)")
    if (tokens and min(tokens) < 1) or (shapes and any(len(s) != 2 or min(s) < 1 for s in shapes)):
        ap.error("--tokens must be >= 1 and --shapes INxOUT pairs of positive sizes")
    args.tokens, args.shapes = tokens, shapes
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():  # (before anything touches CUDA or writes a file)
        raise SystemExit("structmat bench kernels needs a CUDA GPU (run it on an H100/H200)")
    from structmat.eval.results import write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    jpath = out / f"kernels-{stamp}.json"
    info = run_info(vars(args))
    import structmat.kernels as K

    if args.calibrate and K.HAVE_TRITON:
        info["calibration_ms"] = K.ops.calibrate()
        print("calibration (ms):", json.dumps(info["calibration_ms"]))
    info["impl"] = dict(K.ops.IMPL) if K.HAVE_TRITON else None

    def checkpoint(res):  # (after every row, atomically: a run cut short keeps a whole file)
        write_json(jpath, dict(res, run_info=info))

    result = run_grid(quick=args.quick, dtypes=tuple(args.dtypes.split(",")), modes=tuple(args.modes.split(",")),
                      rep=args.rep, semi_structured=not args.no_semi, budget_s=args.budget_s, checkpoint=checkpoint,
                      graphs=args.graphs, tokens=args.tokens, shapes=args.shapes)
    result["run_info"] = info
    write_json(jpath, result)
    try:
        plot(result, out / f"kernels-{stamp}.png")
    except Exception as err:  # matplotlib missing: the JSON is the record
        print(f"no plot: {err!r}")
    print(f"wrote {jpath} ({len(result['rows'])} rows, {result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
