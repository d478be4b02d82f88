"""Probe the Hopper persistent TMA GEMM (benchmarks/experiments/tma_gemm.py) against cuBLAS on short-K problems.

Run on the GPU machine:  python benchmarks/experiments/tma_probe.py --out $OUT
(Result, H200 2026-12-01: correct, but 0.92-1.03x cuBLAS on every shape: not used by the package; see
benchmarks/NOTES.md, run 6.)

Sections (each case in its own try/except; the JSON is rewritten after every section):
  1. correctness vs a float32 torch reference (relative RMS error < 1e-2): block-diagonal G=4, Monarch stage 1
     (chunked output remap), plain GEMM, ragged M (1, 77, 1000), fp16, device-side descriptors;
  2. timing (triton.testing.do_bench, median; plus do_bench_cudagraph = GPU time without the host launch cost)
     vs cuBLAS: strided-batched torch.bmm for block-diagonal, a loop of
     b strided-batched calls for Monarch stage 1 (what ops.py does under engine="cublas"), F.linear for plain
     GEMM, and a dense F.linear of the full (M, G*K) x (G*N, G*K) product as the reference rate;
  3. extras: flatten=False (is the epilogue overlap worth it?), device-side vs host-side descriptors, host
     microseconds per call at tiny M (launch overhead);
  4. warp_specialize=True in a subprocess (Hopper auto-WS can crash the compiler; a crash must not lose the rest).
--out may be a directory (tma_probe.json is written inside) or a file path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tma_gemm as T  # noqa: E402  (an experiment, not part of the package)
from _common import bench, bench_graph, print_summary, rel_rms, run_sections  # noqa: E402

DT = torch.bfloat16
T0 = time.time()


def elapsed() -> float:
    return time.time() - T0


def tflops(flop: float, ms: float) -> float:
    return flop / (ms * 1e-3) / 1e12 if ms and ms == ms and ms > 0 else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Problem builders: (run_tma(**kw) -> bool, output tensor, float32 reference thunk, cuBLAS thunk)
# ----------------------------------------------------------------------------------------------------------------


def make_blockdiag(M, G, K, N, dtype=DT, dev="cuda"):
    x = torch.randn(M, G * K, device=dev, dtype=dtype)
    W = torch.randn(G, N, K, device=dev, dtype=dtype) / K ** 0.5
    y = torch.empty(M, G * N, device=dev, dtype=dtype)
    W2 = W.view(G * N, K)

    def run(**kw):
        return T.linear_groups(x, W2, y, G, N, K, **kw)

    def ref():
        return torch.bmm(x.float().view(M, G, K).transpose(0, 1), W.float().transpose(1, 2)).transpose(0, 1) \
            .reshape(M, G * N)

    def cublas():
        torch.bmm(x.view(M, G, K).transpose(0, 1), W.transpose(1, 2), out=y.view(M, G, N).transpose(0, 1))

    return dict(x=x, W=W, y=y, run=run, ref=ref, cublas=cublas, flop=2.0 * M * G * K * N,
                check=lambda: T.check(x, W2, y, G, N, K), best=lambda: T.best_config(x, y, G, N, K))


def make_monarch1(M, b, c, K, dtype=DT, dev="cuda"):
    # stage 1: group k: x_k (M, K) @ R_k^T, R_k (b*c, K); column (s, q) -> h[:, s*b*c + k*c + q]
    N = b * c
    x = torch.randn(M, b * K, device=dev, dtype=dtype)
    R = torch.randn(b, N, K, device=dev, dtype=dtype) / K ** 0.5
    h = torch.empty(M, b * N, device=dev, dtype=dtype)
    R2 = R.view(b * N, K)

    def run(**kw):
        return T.linear_groups(x, R2, h, b, N, K, group_stride=c, chunk=c, chunk_stride=b * c, **kw)

    def ref():
        y = torch.bmm(x.float().view(M, b, K).transpose(0, 1), R.float().transpose(1, 2))  # [k, M, (s, q)]
        return y.view(b, M, b, c).permute(1, 2, 0, 3).reshape(M, b * N)  # [M, s, k, q]

    xk = x.view(M, b, K).transpose(0, 1)
    hv = h.view(M, b, b, c)  # [M, s, k, q]
    Rv = R.view(b, b, c, K)  # [k, s, q, K]

    def cublas():
        for s in range(b):
            torch.bmm(xk, Rv[:, s].transpose(1, 2), out=hv[:, s].transpose(0, 1))

    return dict(x=x, W=R, y=h, run=run, ref=ref, cublas=cublas, flop=2.0 * M * b * K * N,
                check=lambda: T.check(x, R2, h, b, N, K, c, c, b * c), best=lambda: T.best_config(x, h, b, N, K, c))


def make_gemm(M, K, N, dtype=DT, dev="cuda"):
    x = torch.randn(M, K, device=dev, dtype=dtype)
    W = torch.randn(N, K, device=dev, dtype=dtype) / K ** 0.5
    y = torch.empty(M, N, device=dev, dtype=dtype)

    def run(**kw):
        return T.linear_groups(x, W, y, 1, N, K, **kw)

    def ref():
        return x.float() @ W.float().T

    def cublas():
        F.linear(x, W)

    return dict(x=x, W=W, y=y, run=run, ref=ref, cublas=cublas, flop=2.0 * M * K * N,
                check=lambda: T.check(x, W, y, 1, N, K), best=lambda: T.best_config(x, y, 1, N, K))


# ----------------------------------------------------------------------------------------------------------------


class Report:
    def __init__(self, out: str | None):
        self.path = None
        if out:
            if os.path.isdir(out) or out.endswith("/"):
                os.makedirs(out, exist_ok=True)
                self.path = os.path.join(out, "tma_probe.json")
            else:
                os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
                self.path = out
        self.data: dict = {"env": {}, "correctness": [], "timing": [], "extras": [], "ws": None, "errors": []}

    def save(self):
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self.data, f, indent=1, default=str)


def check_case(rep: Report, name: str, prob: dict, **kw):
    row = {"case": name, **{k: v for k, v in kw.items() if k != "config"}}
    if "config" in kw:
        row["config"] = kw["config"]
    try:
        prob["y"].fill_(float("nan"))
        ran = prob["run"](**kw)
        torch.cuda.synchronize()
        row["ran"] = bool(ran)
        if not ran:
            row.update(status="FAIL", why=f"linear_groups returned False (check: {prob['check']()})")
        else:
            err = rel_rms(prob["y"], prob["ref"]())
            row.update(rel_rms=err, status="PASS" if err < 1e-2 else "FAIL")
    except Exception as e:  # keep going
        row.update(status="FAIL", error=f"{type(e).__name__}: {e}")
        rep.data["errors"].append({"case": name, "trace": traceback.format_exc()[-3000:]})
    print(f"  {row['status']:4s} {name:48s} rel_rms={row.get('rel_rms', float('nan')):.2e} "
          f"{row.get('why', row.get('error', ''))}", flush=True)
    rep.data["correctness"].append(row)


def correctness(rep: Report):
    print("== correctness (relative RMS vs float32 torch, threshold 1e-2)", flush=True)
    cases = [
        ("blockdiag G=4 M=8192 K=1024 N=1024", lambda: make_blockdiag(8192, 4, 1024, 1024), {}),
        ("monarch-s1 b=4 c=256 M=8192 K=1024", lambda: make_monarch1(8192, 4, 256, 1024), {}),
        ("gemm M=8192 K=1024 N=4096", lambda: make_gemm(8192, 1024, 4096), {}),
        ("blockdiag G=4 M=1 K=1024 N=1024", lambda: make_blockdiag(1, 4, 1024, 1024), {}),
        ("blockdiag G=4 M=77 K=1024 N=1024", lambda: make_blockdiag(77, 4, 1024, 1024), {}),
        ("blockdiag G=4 M=1000 K=1024 N=1024", lambda: make_blockdiag(1000, 4, 1024, 1024), {}),
        ("monarch-s1 b=4 c=256 M=77 K=1024", lambda: make_monarch1(77, 4, 256, 1024), {}),
        ("gemm M=1000 K=1024 N=4096", lambda: make_gemm(1000, 1024, 4096), {}),
        ("fp16 blockdiag G=4 M=1000 (fixed cfg)", lambda: make_blockdiag(1000, 4, 1024, 1024, torch.float16),
         {"config": T._CONFIGS[0]}),
        ("device-desc blockdiag G=4 M=1000 (fixed cfg)", lambda: make_blockdiag(1000, 4, 1024, 1024),
         {"config": T._CONFIGS[0], "desc": "device"}),
        ("device-desc monarch-s1 M=77 (fixed cfg)", lambda: make_monarch1(77, 4, 256, 1024),
         {"config": T._CONFIGS[6], "desc": "device"}),
    ]
    # every config, forced (the autotuner only shows the winner's output): ragged M, plain and remapped stores
    for i, cfg in enumerate(T._CONFIGS):
        tag = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}"
        cases.append((f"cfg{i} {tag} blockdiag M=1000", lambda: make_blockdiag(1000, 4, 1024, 1024), {"config": cfg}))
        cases.append((f"cfg{i} {tag} monarch-s1 M=1000", lambda: make_monarch1(1000, 4, 256, 1024), {"config": cfg}))
    for name, build, kw in cases:
        try:
            prob = build()
        except Exception as e:
            rep.data["correctness"].append({"case": name, "status": "FAIL", "error": f"build: {e}"})
            print(f"  FAIL {name}: build: {e}", flush=True)
            continue
        check_case(rep, name, prob, **kw)
        del prob
    torch.cuda.empty_cache()
    rep.save()


def timing(rep: Report):
    print("== timing (median ms; speedup = cuBLAS ms / TMA ms; dense = F.linear of the full (M,G*K)x(G*N,G*K))",
          flush=True)
    hdr = (f"{'case':34s} {'M':>6s} | {'tma ms':>8s} {'TF/s':>6s} | {'cublas ms':>9s} {'TF/s':>6s} | "
           f"{'speedup':>7s} | {'dense ms':>8s} {'TF/s':>6s} | {'tma/dense rate':>14s} | "
           f"{'graph: tma':>10s} {'cublas':>7s} | config")
    print(hdr)
    print("-" * len(hdr))
    shapes = []
    for M in (8192, 16384):
        for K, N in ((1024, 1024), (1024, 4096), (4096, 1024)):
            shapes.append(("blockdiag G=4", M, 4, K, N))
        shapes.append(("monarch-s1 b=4 c=256", M, 4, 1024, 1024))
        for K, N in ((1024, 4096), (4096, 1024)):
            shapes.append(("gemm", M, 1, K, N))
    for kind, M, G, K, N in shapes:
        name = f"{kind} K={K} N={N}"
        row = {"case": name, "M": M, "G": G, "K": K, "N": N}
        try:
            if kind.startswith("blockdiag"):
                prob = make_blockdiag(M, G, K, N)
            elif kind.startswith("monarch"):
                prob = make_monarch1(M, 4, 256, K)
            else:
                prob = make_gemm(M, K, N)
            row["flop"] = prob["flop"]
            ok = prob["run"]()  # autotunes on first call for this key
            torch.cuda.synchronize()
            if not ok:
                raise RuntimeError("linear_groups returned False")
            row["config"] = prob["best"]()
            row["tma_ms"] = bench(lambda: prob["run"]())
            row["cublas_ms"] = bench(prob["cublas"])
            try:  # CUDA-graph timing: pure GPU time, no host launch cost (tells host-bound from GPU-bound)
                row["tma_graph_ms"] = bench_graph(lambda: prob["run"]())
                row["cublas_graph_ms"] = bench_graph(prob["cublas"])
            except Exception as e:
                row["graph_error"] = f"{type(e).__name__}: {e}"
            row["tma_tflops"] = tflops(row["flop"], row["tma_ms"])
            row["cublas_tflops"] = tflops(row["flop"], row["cublas_ms"])
            row["speedup_vs_cublas"] = row["cublas_ms"] / row["tma_ms"]
            if G > 1:  # dense reference rate: the same M, G*K, G*N as one full matrix
                x = prob["x"]
                Wd = torch.randn(prob["y"].shape[1], x.shape[1], device=x.device, dtype=x.dtype)  # (G*N, G*K)
                row["dense_ms"] = bench(lambda: F.linear(x, Wd))
                row["dense_tflops"] = tflops(2.0 * x.shape[0] * Wd.shape[0] * Wd.shape[1], row["dense_ms"])
                del Wd
            else:
                row["dense_ms"], row["dense_tflops"] = row["cublas_ms"], row["cublas_tflops"]
            row["tma_rate_vs_dense"] = row["tma_tflops"] / row["dense_tflops"]
            row["cublas_rate_vs_dense"] = row["cublas_tflops"] / row["dense_tflops"]
            cfg = row["config"] or {}
            cs = f"{cfg.get('BLOCK_M')}x{cfg.get('BLOCK_N')}x{cfg.get('BLOCK_K')} w{cfg.get('num_warps')} " \
                 f"s{cfg.get('num_stages')} sub{cfg.get('SUBTILE')}" if cfg else "?"
            print(f"{name:34s} {M:6d} | {row['tma_ms']:8.4f} {row['tma_tflops']:6.1f} | {row['cublas_ms']:9.4f} "
                  f"{row['cublas_tflops']:6.1f} | {row['speedup_vs_cublas']:7.3f} | {row['dense_ms']:8.4f} "
                  f"{row['dense_tflops']:6.1f} | {row['tma_rate_vs_dense']:14.3f} | "
                  f"{row.get('tma_graph_ms', float('nan')):10.4f} {row.get('cublas_graph_ms', float('nan')):7.4f} | "
                  f"{cs}", flush=True)
            del prob
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            rep.data["errors"].append({"case": name, "M": M, "trace": traceback.format_exc()[-3000:]})
            print(f"{name:34s} {M:6d} | ERROR {row['error'][:150]}", flush=True)
        rep.data["timing"].append(row)
        rep.save()
        torch.cuda.empty_cache()


def extras(rep: Report):
    print("== extras", flush=True)
    M, G, K, N = 16384, 4, 1024, 1024
    try:
        prob = make_blockdiag(M, G, K, N)
        prob["run"]()
        cfg = prob["best"]() or T._CONFIGS[0]
        base = bench(lambda: prob["run"](config=cfg))
        for label, kw in (("flatten=False", dict(config=cfg, flatten=False)),
                          ("desc=device", dict(config=cfg, desc="device"))):
            row = {"case": f"blockdiag G=4 M={M} K=N=1024 {label}", "config": cfg}
            try:
                prob["y"].fill_(float("nan"))
                prob["run"](**kw)
                row["rel_rms"] = rel_rms(prob["y"], prob["ref"]())
                row["ms"] = bench(lambda: prob["run"](**kw))
                row["baseline_ms"] = base
                row["slowdown_vs_default"] = row["ms"] / base
                print(f"  {row['case']:55s} {row['ms']:.4f} ms vs default {base:.4f} ms "
                      f"(x{row['slowdown_vs_default']:.3f}), rel_rms={row['rel_rms']:.1e}", flush=True)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
                print(f"  {row['case']}: ERROR {row['error'][:200]}", flush=True)
            rep.data["extras"].append(row)
        del prob
    except Exception as e:
        rep.data["errors"].append({"case": "extras", "trace": traceback.format_exc()[-3000:]})
        print(f"  extras ERROR {e}", flush=True)
    rep.save()

    # Host cost per call at tiny M (GPU work negligible: the loop is host-bound). Back-to-back launches, one sync.
    try:
        prob = make_blockdiag(16, 4, 1024, 1024)
        prob["run"]()  # tune
        fns = {
            "tma host-desc (tuned path)": lambda: prob["run"](),
            "tma device-desc (fixed cfg)": lambda: prob["run"](config=T._CONFIGS[6], desc="device"),
            "tma host-desc (fixed cfg)": lambda: prob["run"](config=T._CONFIGS[6]),
            "cublas bmm": prob["cublas"],
        }
        for label, fn in fns.items():
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            n = 300
            t = time.perf_counter()
            for _ in range(n):
                fn()
            host = (time.perf_counter() - t) / n * 1e6
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) / n * 1e6
            row = {"case": f"host us/call M=16 blockdiag G=4 K=N=1024: {label}", "host_us": host, "wall_us": wall}
            print(f"  {row['case']:75s} host {host:7.1f} us  (wall incl. drain {wall:7.1f} us)", flush=True)
            rep.data["extras"].append(row)
        del prob
    except Exception as e:
        rep.data["errors"].append({"case": "host overhead", "trace": traceback.format_exc()[-3000:]})
        print(f"  host overhead ERROR {e}", flush=True)
    rep.save()


def ws_only(out_path: str):
    """Subprocess body: warp_specialize=True vs False with the same fixed configs."""
    res = []
    for name, build in (("blockdiag G=4 M=16384 K=N=1024", lambda: make_blockdiag(16384, 4, 1024, 1024)),
                        ("gemm M=16384 K=1024 N=4096", lambda: make_gemm(16384, 1024, 4096))):
        prob = build()
        for cfg in (T._CONFIGS[0], T._CONFIGS[3]):
            for ws in (False, True):
                row = {"case": name, "config": cfg, "warp_specialize": ws}
                try:
                    prob["y"].fill_(float("nan"))
                    t = time.time()
                    prob["run"](config=cfg, warp_specialize=ws)
                    torch.cuda.synchronize()
                    row["first_call_s"] = time.time() - t
                    row["rel_rms"] = rel_rms(prob["y"], prob["ref"]())
                    row["ms"] = bench(lambda: prob["run"](config=cfg, warp_specialize=ws))
                    row["tflops"] = tflops(prob["flop"], row["ms"])
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                res.append(row)
                print(f"  ws={ws!s:5s} {name:32s} {cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']}: "
                      f"{row.get('ms', float('nan')):.4f} ms rel_rms={row.get('rel_rms', float('nan')):.1e} "
                      f"{row.get('error', '')[:200]}", flush=True)
                with open(out_path, "w") as f:
                    json.dump(res, f, indent=1, default=str)
        del prob


def smoke():
    """CPU self-test of this script's builders and references under TRITON_INTERPRET=1 (fp16: the interpreter's
    bf16 tl.dot is broken). Checks the kernel, the float32 reference and the cuBLAS-equivalent calls agree."""
    assert T.INTERPRET, "run with TRITON_INTERPRET=1"
    cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, SUBTILE=2)
    ok = True
    for name, prob in (("blockdiag", make_blockdiag(37, 3, 64, 64, torch.float16, "cpu")),
                       ("monarch-s1", make_monarch1(37, 2, 32, 64, torch.float16, "cpu")),
                       ("gemm", make_gemm(45, 64, 96, torch.float16, "cpu"))):
        prob["y"].fill_(float("nan"))
        ran = prob["run"](config=cfg)
        e_tma = rel_rms(prob["y"], prob["ref"]())
        prob["y"].fill_(float("nan"))
        out = prob["cublas"]()
        got = prob["y"] if out is None and name != "gemm" else F.linear(prob["x"], prob["W"])
        e_ref = rel_rms(got, prob["ref"]())
        ok &= ran and e_tma < 1e-2 and e_ref < 1e-2
        print(f"smoke {name}: ran={ran} kernel rel_rms={e_tma:.1e} torch-equivalent rel_rms={e_ref:.1e} "
              f"check={prob['check']()}")
    print("SMOKE OK" if ok else "SMOKE FAILED")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="output directory or .json path")
    ap.add_argument("--no-ws", action="store_true", help="skip the warp_specialize subprocess")
    ap.add_argument("--ws-only", default=None, help=argparse.SUPPRESS)  # internal: subprocess mode
    ap.add_argument("--smoke", action="store_true", help="CPU self-test under TRITON_INTERPRET=1")
    args = ap.parse_args()
    if args.smoke:
        smoke()
        return
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 reference
    if args.ws_only:
        ws_only(args.ws_only)
        return
    rep = Report(args.out)
    props = torch.cuda.get_device_properties(0)
    rep.data["env"] = {"torch": torch.__version__, "triton": triton.__version__, "gpu": props.name,
                       "sms": props.multi_processor_count, "capability": torch.cuda.get_device_capability(0),
                       "desc_mode": T.DESC_MODE, "autotune": T.AUTOTUNE, "configs": T._CONFIGS}
    print(f"torch {torch.__version__}  triton {triton.__version__}  {props.name}  SMs={props.multi_processor_count}"
          f"  cc={torch.cuda.get_device_capability(0)}", flush=True)
    rep.save()
    run_sections(rep, (correctness, timing, extras), elapsed)
    rep.save()

    if not args.no_ws:
        print("== warp_specialize=True (subprocess; Hopper auto-WS may crash or be a no-op)", flush=True)
        ws_path = (os.path.splitext(rep.path)[0] + "_ws.json") if rep.path else "/tmp/tma_probe_ws.json"
        budget = max(30.0, 170.0 - elapsed())
        try:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--ws-only", ws_path], timeout=budget,
                               capture_output=True, text=True)
            print(p.stdout[-4000:], flush=True)
            if p.returncode != 0:
                print(f"  ws subprocess exit code {p.returncode}; stderr tail:\n{p.stderr[-2000:]}", flush=True)
            ws = {"returncode": p.returncode, "stderr_tail": p.stderr[-2000:]}
        except subprocess.TimeoutExpired:
            ws = {"returncode": None, "error": f"timed out after {budget:.0f}s"}
            print(f"  ws subprocess timed out after {budget:.0f}s", flush=True)
        try:
            with open(ws_path) as f:
                ws["rows"] = json.load(f)
        except Exception:
            ws["rows"] = []
        rep.data["ws"] = ws
        rep.save()

    print_summary(rep, elapsed())


if __name__ == "__main__":
    main()
