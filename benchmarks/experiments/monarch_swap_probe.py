"""Monarch forward with the permutation moved from stage 1's store to stage 2's load (device machine).

Today (ops._mon_forward) stage 1 writes h in stage 2's (s, k, q) order with a chunked store, and stage 2 is a plain
strided-batched GEMM. Here stage 1 is a PLAIN block-diagonal GEMM writing h1 in its natural (k, s, q) order (one
cuBLAS strided-batched call, as ops._bd_forward) and stage 2 reads its A operand with a chunked K index (the TMA
kernel of tma_gemm.py): group s, K index kk = k*c + q -> h1[:, k*b*c + s*c + q]. With BLOCK_K | c every K-tile is
one contiguous TMA box, so stage 2 should run at the plain TMA kernel's rate.
Result (H200, 2026-12-01, benchmarks/results/monarch-swap-probe-20261201T011800Z.json): correct (40/40), but no
consistent gain: 4096^2 nb4 at 8192 tokens 0.252 ms swapped vs 0.261 (current triton) and 0.234 (current cublas);
not used by the package.

    python benchmarks/experiments/monarch_swap_probe.py --out DIR      # GPU: correctness + timing, JSON to DIR
    TRITON_INTERPRET=1 python benchmarks/experiments/monarch_swap_probe.py --smoke   # CPU check (fp16, tiny)

Sections (every case in its own try/except; the JSON is rewritten after every case):
  1. correctness, bf16, relative RMS vs float32 structures.monarch.monarch_multiply (< 1e-2): the swapped forward
     (stage 1 cuBLAS or TMA) and the current ops._mon_forward, for 4096->4096 nb4 at n = 8192, 1000, 77,
     4096->4096 nb8, 4096->16384 nb4 and 16384->4096 nb4 (n = 8192); then every TMA config forced on the
     chunked-K stage 2 (n = 1000; a config whose BLOCK_K does not divide c must make the wrapper return False);
  2. timing at n = 8192 and 16384 (do_bench median, and do_bench_cudagraph = GPU time without host launch cost):
     full forwards (swap s1 cuBLAS + s2 TMA, swap s1 TMA + s2 TMA, current triton, current cublas), each stage
     alone (stage 1: plain cuBLAS / plain TMA / chunked-store Triton (current) / b cuBLAS calls; stage 2:
     chunked-K TMA on h1, plain TMA and plain cuBLAS on the (s, k, q)-ordered h, b accumulating cuBLAS calls on
     h1), and dense F.linear of the merged weight. Speed vs dense = dense ms / variant ms.
--out may be a directory (monarch_swap_probe.json inside) or a .json path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "src"))
sys.path.insert(0, HERE)
import tma_gemm as T  # noqa: E402  (an experiment, not part of the package)
from _common import bench, bench_graph, print_summary, rel_rms, run_sections  # noqa: E402
from structmat.kernels import ops  # noqa: E402
from structmat.structures.monarch import Monarch, monarch_multiply  # noqa: E402

DT = torch.bfloat16
DEV = "cuda"
T0 = time.time()
TIME_BUDGET_S = 105  # stop starting new timing shapes after this (the whole run must stay under 2 minutes)


def elapsed() -> float:
    return time.time() - T0


# ----------------------------------------------------------------------------------------------------------------
# The products. Shapes: x (n, b*p), R (b, b*c, p), L (b, u, b*c); h1 (n, b*b*c) in (k, s, q) order,
# h (n, b*b*c) in (s, k, q) order, y (n, b*u).
# ----------------------------------------------------------------------------------------------------------------


def dims(R, L):
    b, bc, p = R.shape
    return b, bc, p, L.shape[1], bc // b


def s1_plain_cublas(x, R, h1=None):
    """Stage 1 as a plain block-diagonal GEMM (one strided-batched cuBLAS call): h1 in (k, s, q) order."""
    b, bc, p = R.shape
    n = x.shape[0]
    h1 = torch.empty(n, b * bc, device=x.device, dtype=x.dtype) if h1 is None else h1
    torch.bmm(x.view(n, b, p).transpose(0, 1), R.transpose(1, 2), out=h1.view(n, b, bc).transpose(0, 1))
    return h1


def s1_plain_tma(x, R, h1=None, **kw):
    """Stage 1 as a plain block-diagonal GEMM on the TMA kernel: h1 in (k, s, q) order."""
    b, bc, p = R.shape
    h1 = torch.empty(x.shape[0], b * bc, device=x.device, dtype=x.dtype) if h1 is None else h1
    if not T.linear_groups(x, R.view(b * bc, p), h1, b, bc, p, **kw):
        raise RuntimeError(f"TMA stage 1 refused: {T.check(x, R.view(b * bc, p), h1, b, bc, p)}")
    return h1


def s2_chunked_tma(h1, L, b, y=None, **kw):
    """Stage 2 reading h1 (k, s, q) with the chunked-K A index: group s, kk = k*c+q -> h1[:, k*b*c + s*c + q]."""
    _, u, bc = L.shape
    c = bc // b
    y = torch.empty(h1.shape[0], b * u, device=h1.device, dtype=h1.dtype) if y is None else y
    ok = T.linear_groups(h1, L.view(b * u, bc), y, b, u, bc, a_group_stride=c, a_chunk=c, a_chunk_stride=bc, **kw)
    if not ok:
        if "config" in kw:
            return None  # a forced config the wrapper refused (BLOCK_K does not divide c)
        why = T.check(h1, L.view(b * u, bc), y, b, u, bc, a_group_stride=c, a_chunk=c, a_chunk_stride=bc)
        raise RuntimeError(f"TMA chunked-K stage 2 refused: {why or f'no config with BLOCK_K | c={c}'}")
    return y


def s2_plain_tma(h, L, b, y=None):
    """Stage 2 on the (s, k, q)-ordered h (what the current stage 1 writes) with the plain TMA kernel."""
    _, u, bc = L.shape
    y = torch.empty(h.shape[0], b * u, device=h.device, dtype=h.dtype) if y is None else y
    if not T.linear_groups(h, L.view(b * u, bc), y, b, u, bc):
        raise RuntimeError("TMA plain stage 2 refused")
    return y


def s2_plain_cublas(h, L, b, y=None):
    """Stage 2 as today: one strided-batched cuBLAS call on the (s, k, q)-ordered h."""
    _, u, bc = L.shape
    n = h.shape[0]
    y = torch.empty(n, b * u, device=h.device, dtype=h.dtype) if y is None else y
    torch.bmm(h.view(n, b, bc).transpose(0, 1), L.transpose(1, 2), out=y.view(n, b, u).transpose(0, 1))
    return y


def s2_chunked_cublas(h1, L, b, y=None):
    """Stage 2 on h1 (k, s, q) with cuBLAS: b strided-batched calls over s, one per input block k, accumulating
    (K = c each; y read-modify-written b-1 times)."""
    _, u, bc = L.shape
    c = bc // b
    n = h1.shape[0]
    y = torch.empty(n, b * u, device=h1.device, dtype=h1.dtype) if y is None else y
    yv = y.view(n, b, u).transpose(0, 1)  # (s, n, u)
    for k in range(b):
        a = h1.as_strided((b, n, c), (c, h1.stride(0), 1), h1.storage_offset() + k * bc)  # [s] -> h1[:, k*bc+s*c:]
        w = L[:, :, k * c:(k + 1) * c].transpose(1, 2)  # (s, c, u)
        if k == 0:
            torch.bmm(a, w, out=yv)
        else:
            yv.baddbmm_(a, w)
    return y


def s1_current(x, R, engine):
    """Stage 1 as ops._mon_forward runs it: chunked (permuted) store into h in (s, k, q) order."""
    b, bc, p = R.shape
    c = bc // b
    h = torch.empty(x.shape[0], b * bc, device=x.device, dtype=x.dtype)
    ops._gemm("mon_s1", engine, x, (p * x.stride(1), x.stride(0), x.stride(1)), R,
              (R.stride(0), R.stride(2), R.stride(1)), h, (c, h.stride(0), 1), b, x.shape[0], bc, p, chunk=c,
              chunk_stride=bc)
    return h


def swap_forward(x, R, L, s1="cublas", **kw):
    """The swapped Monarch forward: plain stage 1 (cuBLAS or TMA) + chunked-K TMA stage 2. Returns y."""
    h1 = s1_plain_cublas(x, R) if s1 == "cublas" else s1_plain_tma(x, R)
    return s2_chunked_tma(h1, L, R.shape[0], **kw)


def to_sk(h1, b):
    """(k, s, q) -> (s, k, q) column order (a copy; only to build the inputs of the stage-2-alone baselines)."""
    n = h1.shape[0]
    return h1.view(n, b, b, -1).transpose(1, 2).reshape(n, -1).contiguous()


def make(in_f, out_f, nb, dev=None, dtype=None):
    dev, dtype = dev or DEV, dtype or DT
    m = Monarch(in_f, out_f, nblocks=nb, bias=False, device=dev, dtype=torch.float32)
    R = m.R.detach().to(dtype).contiguous()
    L = m.L.detach().to(dtype).contiguous()
    with torch.no_grad():
        Wd = m.to_dense().to(dtype).contiguous()  # (out, in)
    return R, L, Wd, m.c


# ----------------------------------------------------------------------------------------------------------------


class Report:
    def __init__(self, out: str | None):
        self.path = None
        if out:
            if os.path.isdir(out) or out.endswith("/") or not out.endswith(".json"):
                os.makedirs(out, exist_ok=True)
                self.path = os.path.join(out, "monarch_swap_probe.json")
            else:
                os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
                self.path = out
        self.data: dict = {"env": {}, "correctness": [], "timing": [], "errors": []}

    def save(self):
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self.data, f, indent=1, default=str)


CORRECT_SHAPES = [  # (in, out, nblocks, n)
    (4096, 4096, 4, 8192), (4096, 4096, 4, 1000), (4096, 4096, 4, 77), (4096, 4096, 8, 8192),
    (4096, 16384, 4, 8192), (16384, 4096, 4, 8192),
]
FORCED_SHAPES = [(4096, 4096, 4, 1000), (4096, 4096, 8, 1000)]  # every TMA config forced on stage 2
TIME_SHAPES = [(4096, 4096, 4), (4096, 4096, 8), (4096, 16384, 4), (16384, 4096, 4)]
TIME_NS = (8192, 16384)


def correctness(rep: Report):
    print("== correctness (bf16; relative RMS vs float32 monarch_multiply, threshold 1e-2)", flush=True)
    for in_f, out_f, nb, n in CORRECT_SHAPES:
        try:
            R, L, _, c = make(in_f, out_f, nb)
            b, bc, p, u, _ = dims(R, L)
            x = torch.randn(n, in_f, device=DEV, dtype=DT)
            ref = monarch_multiply(x.float(), R.float(), L.float())
        except Exception as e:
            rep.data["errors"].append({"case": f"build {in_f}->{out_f} nb{nb} n={n}", "trace": traceback.format_exc()})
            print(f"  FAIL build {in_f}->{out_f} nb{nb} n={n}: {e}", flush=True)
            continue
        variants = {"swap s1=cublas s2=tma-chunkedK": lambda: swap_forward(x, R, L, "cublas"),
                    "swap s1=tma s2=tma-chunkedK": lambda: swap_forward(x, R, L, "tma"),
                    "current triton": lambda: ops._mon_forward(x, R, L, "triton")[0],
                    "current cublas": lambda: ops._mon_forward(x, R, L, "cublas")[0]}
        for name, fn in variants.items():
            row = {"case": name, "in": in_f, "out": out_f, "b": b, "p": p, "u": u, "c": c, "n": n}
            try:
                ops.POISON = True  # ops' buffers start as NaN (an unwritten element shows)
                y = fn()
                torch.cuda.synchronize()
                err = rel_rms(y, ref)
                row.update(rel_rms=err, status="PASS" if err < 1e-2 else "FAIL")
                if name.startswith("swap"):
                    row["config"] = T.best_config(x, y, b, u, bc, a_chunk=c)  # (x: same rows and dtype as h1)
            except Exception as e:
                row.update(status="FAIL", error=f"{type(e).__name__}: {e}")
                rep.data["errors"].append({"case": name, "n": n, "trace": traceback.format_exc()[-3000:]})
            finally:
                ops.POISON = False
            print(f"  {row['status']:4s} {in_f:5d}->{out_f:<5d} nb{nb} c={c:<4d} n={n:<5d} {name:32s} "
                  f"rel_rms={row.get('rel_rms', float('nan')):.2e} {row.get('error', '')[:150]}", flush=True)
            rep.data["correctness"].append(row)
            rep.save()
        del x, ref
    # every config forced on the chunked-K stage 2 (the autotuner shows only the winner's output)
    for in_f, out_f, nb, n in FORCED_SHAPES:
        try:
            R, L, _, c = make(in_f, out_f, nb)
            x = torch.randn(n, in_f, device=DEV, dtype=DT)
            ref = monarch_multiply(x.float(), R.float(), L.float())
            h1 = s1_plain_cublas(x, R)
        except Exception as e:
            print(f"  FAIL build forced-config {in_f}->{out_f} nb{nb}: {e}", flush=True)
            continue
        for i, cfg in enumerate(T._CONFIGS):
            tag = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}"
            row = {"case": f"forced cfg{i} {tag} s2 chunkedK", "in": in_f, "out": out_f, "b": nb, "c": c, "n": n,
                   "config": cfg}
            try:
                y = torch.full((n, out_f), float("nan"), device=DEV, dtype=DT)
                ran = s2_chunked_tma(h1, L, nb, y=y, config=cfg)
                torch.cuda.synchronize()
                legal = c % cfg["BLOCK_K"] == 0 and (out_f // nb) % cfg["BLOCK_N"] == 0
                if ran is None:  # refused: right only when BLOCK_K (or BLOCK_N) does not divide
                    row.update(ran=False, status="PASS" if not legal else "FAIL", why="wrapper returned False")
                else:
                    err = rel_rms(y, ref)
                    row.update(ran=True, rel_rms=err, status="PASS" if (legal and err < 1e-2) else "FAIL")
            except Exception as e:
                row.update(status="FAIL", error=f"{type(e).__name__}: {e}")
                rep.data["errors"].append({"case": row["case"], "trace": traceback.format_exc()[-3000:]})
            print(f"  {row['status']:4s} {in_f}->{out_f} nb{nb} c={c} n={n} {row['case']:44s} "
                  f"rel_rms={row.get('rel_rms', float('nan')):.2e} {row.get('why', row.get('error', ''))[:150]}",
                  flush=True)
            rep.data["correctness"].append(row)
            rep.save()
        del x, ref, h1
    torch.cuda.empty_cache()


def timing(rep: Report):
    print("== timing (bf16; ms = do_bench median, graph = do_bench_cudagraph median; x dense = dense ms / ms)",
          flush=True)
    hdr = f"{'shape':22s} {'n':>6s} | {'variant':40s} | {'ms':>8s} {'x dense':>7s} | {'graph ms':>8s} {'x dense':>7s}"
    print(hdr)
    print("-" * len(hdr))
    for in_f, out_f, nb in TIME_SHAPES:
        for n in TIME_NS:
            shape = f"{in_f}->{out_f} nb{nb}"
            if elapsed() > TIME_BUDGET_S:
                print(f"{shape:22s} {n:6d} | skipped (time budget: {elapsed():.0f}s elapsed)", flush=True)
                rep.data["timing"].append({"shape": shape, "n": n, "skipped": "time budget"})
                continue
            try:
                R, L, Wd, c = make(in_f, out_f, nb)
                b = nb
                x = torch.randn(n, in_f, device=DEV, dtype=DT)
                h1 = s1_plain_cublas(x, R)
                h = to_sk(h1, b)
            except Exception as e:
                rep.data["errors"].append({"case": f"build {shape} n={n}", "trace": traceback.format_exc()})
                print(f"{shape:22s} {n:6d} | build ERROR {e}", flush=True)
                continue
            variants = [
                ("dense F.linear", lambda: F.linear(x, Wd)),
                ("FWD swap: s1 cuBLAS + s2 TMA chunkedK", lambda: swap_forward(x, R, L, "cublas")),
                ("FWD swap: s1 TMA + s2 TMA chunkedK", lambda: swap_forward(x, R, L, "tma")),
                ("FWD current _mon_forward triton", lambda: ops._mon_forward(x, R, L, "triton")),
                ("FWD current _mon_forward cublas", lambda: ops._mon_forward(x, R, L, "cublas")),
                ("s1 plain cuBLAS bmm (k,s,q)", lambda: s1_plain_cublas(x, R)),
                ("s1 plain TMA (k,s,q)", lambda: s1_plain_tma(x, R)),
                ("s1 current triton chunked store", lambda: s1_current(x, R, "triton")),
                ("s1 current cublas b calls", lambda: s1_current(x, R, "cublas")),
                ("s2 TMA chunkedK on h1 (k,s,q)", lambda: s2_chunked_tma(h1, L, b)),
                ("s2 TMA plain on h (s,k,q)", lambda: s2_plain_tma(h, L, b)),
                ("s2 cuBLAS bmm on h (s,k,q) [current]", lambda: s2_plain_cublas(h, L, b)),
                ("s2 cuBLAS b accumulating calls on h1", lambda: s2_chunked_cublas(h1, L, b)),
            ]
            dense = {}
            for name, fn in variants:
                row = {"shape": shape, "in": in_f, "out": out_f, "b": b, "c": c, "n": n, "variant": name}
                try:
                    fn()  # autotune / compile outside the timed region (and outside graph capture)
                    torch.cuda.synchronize()
                    row["ms"] = bench(fn)
                    try:
                        row["graph_ms"] = bench_graph(fn)
                    except Exception as e:
                        row["graph_error"] = f"{type(e).__name__}: {e}"
                    if name.startswith("dense"):
                        dense = {"ms": row["ms"], "graph_ms": row.get("graph_ms")}
                    for k in ("ms", "graph_ms"):
                        if dense.get(k) and row.get(k):
                            row[f"speed_vs_dense_{k}"] = dense[k] / row[k]
                    if "chunkedK" in name and "TMA" in name:  # (the swapped forwards' stage 2 included)
                        row["config"] = T.best_config(h1, x, b, out_f // b, b * c, a_chunk=c)
                    elif name == "s2 TMA plain on h (s,k,q)":
                        row["config"] = T.best_config(h, x, b, out_f // b, b * c)
                    elif name == "s1 plain TMA (k,s,q)":
                        row["config"] = T.best_config(x, h1, b, b * c, in_f // b)
                    nan = float("nan")
                    print(f"{shape:22s} {n:6d} | {name:40s} | {row['ms']:8.4f} "
                          f"{row.get('speed_vs_dense_ms', nan):7.3f} | "
                          f"{row.get('graph_ms', nan):8.4f} {row.get('speed_vs_dense_graph_ms', nan):7.3f}"
                          f"{'  ' + _cfg_str(row.get('config')) if row.get('config') else ''}", flush=True)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"
                    rep.data["errors"].append({"case": f"{shape} n={n} {name}",
                                               "trace": traceback.format_exc()[-3000:]})
                    print(f"{shape:22s} {n:6d} | {name:40s} | ERROR {row['error'][:120]}", flush=True)
                rep.data["timing"].append(row)
                rep.save()
            print(f"   [{shape} n={n} done at {elapsed():.0f}s]", flush=True)
            del x, h1, h, R, L, Wd
            torch.cuda.empty_cache()


def _cfg_str(cfg) -> str:
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']} "
            f"sub{cfg['SUBTILE']}") if cfg else ""


def smoke() -> bool:
    """CPU check under TRITON_INTERPRET=1 (fp16: the 3.9 interpreter mishandles bf16 dots): the chunked-K stage 2
    and the swapped forward at tiny shapes vs the float32 reference, the wrapper's refusals, and the unchanged
    plain / chunked-output paths."""
    assert T.INTERPRET, "run with TRITON_INTERPRET=1"
    torch.manual_seed(0)
    dt = torch.float16
    ok = True

    def report(name, good, detail=""):
        nonlocal ok
        ok &= bool(good)
        print(f"smoke {'PASS' if good else 'FAIL'} {name} {detail}", flush=True)

    cfg32 = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, SUBTILE=2)
    cfg16 = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2, SUBTILE=1)
    cfg64 = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=2, SUBTILE=2)
    # (in, out, nblocks, n): c = min(u, p) // b
    for in_f, out_f, nb, n in ((256, 256, 4, 37), (512, 512, 4, 45), (1024, 1024, 4, 33), (512, 1024, 4, 40),
                               (1024, 512, 4, 29), (1024, 1024, 8, 17), (512, 512, 4, 1)):
        m = Monarch(in_f, out_f, nblocks=nb, bias=False)
        R, L = m.R.detach().to(dt), m.L.detach().to(dt)
        b, bc, p, u, c = dims(R, L)
        x = torch.randn(n, in_f).to(dt)
        ref = monarch_multiply(x.float(), R.float(), L.float())
        ref_dense = x.float() @ m.to_dense().detach().float().T
        tag = f"{in_f}->{out_f} nb{nb} c={c} n={n}"
        report(f"reference==dense {tag}", rel_rms(ref, ref_dense) < 1e-3)
        h1 = s1_plain_cublas(x, R)
        ref_h1 = torch.bmm(x.float().view(n, b, p).transpose(0, 1), R.float().transpose(1, 2)).transpose(0, 1) \
            .reshape(n, -1)
        report(f"s1 plain bmm h1 {tag}", rel_rms(h1, ref_h1) < 1e-2)
        for cfg in (cfg16, cfg32, cfg64):
            y = torch.full((n, out_f), float("nan"), dtype=dt)
            got = s2_chunked_tma(h1, L, b, y=y, config=cfg)
            legal = c % cfg["BLOCK_K"] == 0 and u % cfg["BLOCK_N"] == 0
            if got is None:
                report(f"s2 chunkedK BK={cfg['BLOCK_K']} {tag}: refused", not legal,
                       "(expected: BLOCK_K does not divide c)" if not legal else "(UNEXPECTED refusal)")
            else:
                e = rel_rms(y, ref)
                report(f"s2 chunkedK BK={cfg['BLOCK_K']} {tag}", legal and e < 1e-2, f"rel_rms={e:.1e}")
        for s1 in ("cublas", "tma"):
            try:
                cfg = cfg16 if c % 32 else cfg32
                h1b = s1_plain_cublas(x, R) if s1 == "cublas" else s1_plain_tma(x, R, config=cfg)
                e1 = rel_rms(h1b, ref_h1)
                y = s2_chunked_tma(h1b, L, b, config=cfg)
                e = rel_rms(y, ref)
                report(f"swap forward s1={s1} {tag}", e < 1e-2 and e1 < 1e-2, f"rel_rms={e:.1e} (h1 {e1:.1e})")
            except Exception as ex:
                report(f"swap forward s1={s1} {tag}", False, f"{type(ex).__name__}: {ex}")
        # the stage-2-alone baselines and the cuBLAS chunked-K accumulation (same math, other layouts)
        h = to_sk(h1, b)
        e_sk = rel_rms(s2_plain_cublas(h, L, b), ref)
        e_acc = rel_rms(s2_chunked_cublas(h1, L, b), ref)
        y = torch.empty(n, out_f, dtype=dt)
        ran = T.linear_groups(h, L.view(b * u, bc), y, b, u, bc, config=cfg16)
        e_pt = rel_rms(y, ref) if ran else float("inf")
        e_cur = rel_rms(ops._mon_forward(x, R, L, "cublas")[0], ref)
        h_cur = s1_current(x, R, "cublas")
        report(f"baselines {tag}", max(e_sk, e_acc, e_pt, e_cur) < 1e-2 and torch.equal(h_cur, h),
               f"s2 bmm(h) {e_sk:.1e}, s2 b-accum(h1) {e_acc:.1e}, s2 TMA plain(h) {e_pt:.1e}, "
               f"current cublas {e_cur:.1e}, current s1 h == to_sk(h1): {torch.equal(h_cur, h)}")
    # precondition checks of the wrapper
    m = Monarch(512, 512, nblocks=4, bias=False)
    R, L = m.R.detach().to(dt), m.L.detach().to(dt)
    b, bc, p, u, c = dims(R, L)  # c = 32
    h1 = s1_plain_cublas(torch.randn(8, 512).to(dt), R)
    y = torch.empty(8, 512, dtype=dt)
    Lv = L.view(b * u, bc)
    report("refuse a_chunk not multiple of 16", not T.linear_groups(h1, Lv, y, b, u, bc, a_group_stride=c, a_chunk=24,
                                                                    a_chunk_stride=bc, config=cfg16))
    report("refuse A columns out of range", T.check(h1, Lv, y, b, u, bc, a_group_stride=c, a_chunk=c,
                                                     a_chunk_stride=2 * bc) == "A columns out of range")
    report("refuse BLOCK_K > a_chunk (forced)", not T.linear_groups(h1, Lv, y, b, u, bc, a_group_stride=c, a_chunk=c,
                                                                    a_chunk_stride=bc, config=cfg64))
    report("default interpreter config (BK=32 | c=32)", T.linear_groups(h1, Lv, y, b, u, bc, a_group_stride=c,
                                                                         a_chunk=c, a_chunk_stride=bc))
    report("check() accepts the Monarch stage-2 remap", T.check(h1, Lv, y, b, u, bc, a_group_stride=c, a_chunk=c,
                                                                 a_chunk_stride=bc) is None)
    # a_chunk == K (chunking off) and a_group_stride defaulting to K: the plain block-diagonal product
    xg = torch.randn(19, 3 * 64).to(dt)
    W = (torch.randn(3, 32, 64) / 8).to(dt)
    refg = torch.bmm(xg.float().view(19, 3, 64).transpose(0, 1), W.float().transpose(1, 2)).transpose(0, 1) \
        .reshape(19, -1)
    for kw in ({}, {"a_chunk": 64}, {"a_chunk": 64, "a_group_stride": 64, "a_chunk_stride": 999}):
        yg = torch.full((19, 96), float("nan"), dtype=dt)
        ran = T.linear_groups(xg, W.view(96, 64), yg, 3, 32, 64, config=cfg32, **kw)
        report(f"plain block-diagonal {kw}", ran and rel_rms(yg, refg) < 1e-2)
    # a_group_stride alone (no chunks): groups of A at an arbitrary column stride (here 2 groups, stride 96)
    xa = torch.randn(21, 2 * 96).to(dt)
    Wa = (torch.randn(2, 32, 64) / 8).to(dt)
    refa = torch.cat([xa[:, g * 96:g * 96 + 64].float() @ Wa[g].float().T for g in range(2)], dim=1)
    ya = torch.full((21, 64), float("nan"), dtype=dt)
    ran = T.linear_groups(xa, Wa.view(64, 64), ya, 2, 32, 64, a_group_stride=96, config=cfg32)
    report("a_group_stride=96 without chunks", ran and rel_rms(ya, refa) < 1e-2)
    print("SMOKE OK" if ok else "SMOKE FAILED", flush=True)
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="output directory or .json path")
    ap.add_argument("--smoke", action="store_true", help="CPU check under TRITON_INTERPRET=1")
    ap.add_argument("--skip-correctness", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        sys.exit(0 if smoke() else 1)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 reference
    rep = Report(args.out)
    props = torch.cuda.get_device_properties(0)
    rep.data["env"] = {"torch": torch.__version__, "triton": triton.__version__, "gpu": props.name,
                       "sms": props.multi_processor_count, "capability": torch.cuda.get_device_capability(0),
                       "desc_mode": T.DESC_MODE, "autotune": T.AUTOTUNE, "ops_impl": dict(ops.IMPL)}
    print(f"torch {torch.__version__}  triton {triton.__version__}  {props.name}  SMs={props.multi_processor_count}",
          flush=True)
    rep.save()
    sections = (timing,) if args.skip_correctness else (correctness, timing)
    run_sections(rep, sections, elapsed)
    rep.data["elapsed_s"] = elapsed()
    rep.save()
    print_summary(rep, elapsed())


if __name__ == "__main__":
    main()
