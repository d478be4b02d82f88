"""Speed of the generalized delta rule on a GPU: recurrent reference, chunked WY/UT form, fla, softmax attention.

Run on a CUDA GPU:  ``PYTHONPATH=src python -m structmat.bench.mixer_speed [--quick] [--out benchmarks/results]``

Every row is bf16 inputs, forward + backward (gradients w.r.t. q, k, v and beta; for attention q, k, v), at
B=4, H=16, Dk=Dv=128, over T = 512 .. 16384 (``--Ts`` for others), timed with CUDA events (median of ``--reps``
after warm-up):
  ``recurrent``  :func:`structmat.mixers.delta_rule` backend="recurrent" (the token loop; T <= --max-recurrent-T)
  ``chunked``    backend="chunked", chunk 64 (float32 internals; TF32 matmuls allowed via
                 ``torch.set_float32_matmul_precision("high")``, recorded in the JSON)
  ``fla``        backend="fla": flash-linear-attention's ``chunk_delta_rule`` through structmat's ``delta_rule``
  ``fla_direct`` fla's ``chunk_delta_rule`` called directly on the same tensors (the bar for ``fla``: the ratio
                 ``fla_overhead`` = fla / fla_direct is the cost of going through structmat)
  ``sdpa``       ``F.scaled_dot_product_attention(..., is_causal=True)`` (PyTorch's fastest available backend)
``--columns`` picks among them (default: all that can run here; fla's need flash-linear-attention installed).
All are measured in the same run on the same device. Before timing, agreement with the recurrent reference on this
GPU is checked (chunked: float32 and bf16; fla: bf16; relative RMS). Writes ``mixer-speed-<UTC date-time>.json``
and ``.png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from structmat.mixers import delta_rule, fla_backend, l2norm

TS = (512, 1024, 2048, 4096, 8192, 16384)
COLUMNS = ("recurrent", "chunked", "fla", "fla_direct", "sdpa")


def _time_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def _delta_inputs(B, T, H, D, dtype, dev, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    q = l2norm(torch.randn(B, T, H, D, device=dev, generator=g)).to(dtype).requires_grad_()
    k = l2norm(torch.randn(B, T, H, D, device=dev, generator=g)).to(dtype).requires_grad_()
    v = torch.randn(B, T, H, D, device=dev, generator=g).to(dtype).requires_grad_()
    beta = (2 * torch.rand(B, T, H, device=dev, generator=g)).to(dtype).requires_grad_()  # eigenvalues in [-1, 1]
    do = torch.randn(B, T, H, D, device=dev, generator=g).to(dtype)
    return q, k, v, beta, do


def _rrms(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def agreement(dev, columns, heads: int = 16, dim: int = 128) -> dict:
    """chunked (float32, bf16) and fla (bf16) vs recurrent on this GPU: outputs, final state and input gradients
    (relative RMS); the gated case, as in the layers (fla's gated backward may be refused: then noted, not run)."""
    res = {}
    runs = [(b, name, dtype) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
            for b in ("chunked", "fla") if b in columns and not (b == "fla" and dtype == torch.float32)]
    for backend, name, dtype in runs:
        # heads and head dim as timed: fla's Triton kernels are compiled and autotuned per (H, K, V, ...), which
        # costs minutes on a fresh machine, so the check shares the timed shapes' kernels
        q, k, v, beta, do = _delta_inputs(1, 300, heads, dim, dtype, dev, seed=1)
        beta = beta.detach().float().requires_grad_()
        lg = (-0.1 * torch.rand(1, 300, heads, device=dev)).requires_grad_()
        gated = lg if backend == "chunked" or not fla_backend._gated_backward_refused() else None
        outs = {}
        for b in ("recurrent", backend):
            o, S = delta_rule(q, k, v, beta, gated, output_final_state=True, backend=b, chunk_size=64)
            wrt = [q, k, v, beta] + ([lg] if gated is not None else [])
            gr = torch.autograd.grad((o.float() * do.float()).sum() + S.sum(), wrt)
            outs[b] = [o, S, *gr]
        names = ["o", "S", "dq", "dk", "dv", "dbeta", "dlog_gate"]
        key = f"{backend}_{name}" + ("" if gated is not None else "_ungated")
        res[key] = {n: _rrms(a, b) for n, a, b in zip(names, outs[backend], outs["recurrent"])}
        res[key]["finite"] = all(bool(torch.isfinite(t).all()) for t in outs[backend])
    return res


def _fla_version():
    try:
        from importlib.metadata import version

        return {"flash-linear-attention": version("flash-linear-attention"), "fla-core": version("fla-core")}
    except Exception:  # not installed: nothing to record
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="structmat bench mixer-speed", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="T in 512, 2048, 4096 only")
    p.add_argument("--Ts", default=None, help="comma-separated sequence lengths (default 512..16384; add 32768,65536 "
                   "to find the crossover with attention)")
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2, help="fla and fla_direct are timed alternately this many times "
                   "each (best round kept, every round recorded)")
    p.add_argument("--max-recurrent-T", type=int, default=4096)
    p.add_argument("--columns", default=None,
                   help=f"comma-separated subset of {','.join(COLUMNS)} (default: all that can run here)")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    if a.columns:
        columns = tuple(c.strip() for c in a.columns.split(","))
        bad = [c for c in columns if c not in COLUMNS]
        if bad:
            p.error(f"--columns: unknown {bad}; choose from {','.join(COLUMNS)}")
    else:
        columns = tuple(c for c in COLUMNS if fla_backend.fla_available() or not c.startswith("fla"))
    if a.rounds < 1 or a.reps < 1:
        p.error("--rounds and --reps must be >= 1")
    if not torch.cuda.is_available():
        print("mixer_speed needs a CUDA GPU", file=sys.stderr)
        return 2
    if any(c.startswith("fla") for c in columns) and not fla_backend.fla_available():
        print("--columns fla/fla_direct need flash-linear-attention: pip install 'structmat[gpu]'", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    torch.set_float32_matmul_precision("high")
    agree = agreement(dev, columns, a.H, a.D)
    print("agreement (vs recurrent, rel. RMS):", json.dumps(agree))
    Ts = (512, 2048, 4096) if a.quick else TS
    if a.Ts:
        Ts = tuple(int(t) for t in a.Ts.split(","))
        if any(t < 1 for t in Ts):
            p.error(f"--Ts: lengths must be >= 1, got {a.Ts!r}")
    B, H, D = a.B, a.H, a.D
    rows = []
    for T in Ts:
        q, k, v, beta, do = _delta_inputs(B, T, H, D, torch.bfloat16, dev)
        row = {"T": T}

        def run_delta(backend):
            o, _ = delta_rule(q, k, v, beta, backend=backend, chunk_size=a.chunk)
            torch.autograd.backward(o, do)
            q.grad = k.grad = v.grad = beta.grad = None

        if "chunked" in columns:
            torch.cuda.reset_peak_memory_stats()
            row["chunked_ms"] = _time_ms(lambda: run_delta("chunked"), 2, a.reps)
            row["chunked_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30

        def run_fla_direct():
            o = fla_backend.call_fla_direct(q, k, v, beta)
            torch.autograd.backward(o, do)
            q.grad = k.grad = v.grad = beta.grad = None

        # fla and fla_direct alternate over --rounds rounds (the spread is kept): their ratio is the claim
        fla_runs = [(c, fn) for c, fn in (("fla_direct", run_fla_direct), ("fla", lambda: run_delta("fla")))
                    if c in columns]
        for c, fn in fla_runs * a.rounds:
            row.setdefault(f"{c}_rounds_ms", []).append(_time_ms(fn, 3, a.reps))
        for c, _ in fla_runs:
            row[f"{c}_ms"] = min(row[f"{c}_rounds_ms"])
        if "recurrent" in columns and T <= a.max_recurrent_T:
            try:
                row["recurrent_ms"] = _time_ms(lambda: run_delta("recurrent"), 1, 3)
            except torch.cuda.OutOfMemoryError:
                row["recurrent_ms"] = None
                row["recurrent_note"] = "out of memory"
            torch.cuda.empty_cache()
        qa, ka, va = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        doa = do.transpose(1, 2).contiguous()

        def run_sdpa():
            o = F.scaled_dot_product_attention(qa, ka, va, is_causal=True)
            torch.autograd.backward(o, doa)
            qa.grad = ka.grad = va.grad = None

        if "sdpa" in columns:
            row["sdpa_ms"] = _time_ms(run_sdpa, 3, a.reps)
        for name in ("chunked", "fla"):
            if row.get(f"{name}_ms") and row.get("recurrent_ms"):
                row[f"{name}_speedup_vs_recurrent"] = row["recurrent_ms"] / row[f"{name}_ms"]
            if row.get(f"{name}_ms") and row.get("sdpa_ms"):
                row[f"{name}_speedup_vs_sdpa"] = row["sdpa_ms"] / row[f"{name}_ms"]
        if row.get("fla_ms") and row.get("fla_direct_ms"):
            row["fla_overhead"] = row["fla_ms"] / row["fla_direct_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, beta, do, qa, ka, va, doa
        torch.cuda.empty_cache()

    def crossover(name):  # the first T from which `name` beats attention at every measured length
        for i, r in enumerate(rows):
            if all(rr.get(f"{name}_speedup_vs_sdpa", 0) > 1 for rr in rows[i:]):
                return r["T"]
        return None

    crossovers = {name: crossover(name) for name in ("chunked", "fla") if name in columns and "sdpa" in columns}
    timed = [c for c in COLUMNS if c in columns]

    def cell(v, fmt):
        return "-" if v is None else format(v, fmt)

    print("\n| T | " + " | ".join(f"{c} ms" for c in timed) + " | fla / fla_direct | chunked vs sdpa | fla vs sdpa |")
    print("|---|" + "---|" * (len(timed) + 3))
    for r in rows:
        print(f"| {r['T']} | " + " | ".join(cell(r.get(f"{c}_ms"), ".2f") for c in timed) +
              f" | {cell(r.get('fla_overhead'), '.3f')} | {cell(r.get('chunked_speedup_vs_sdpa'), '.2f')}x"
              f" | {cell(r.get('fla_speedup_vs_sdpa'), '.2f')}x |")
    print(f"crossover (faster than sdpa from this T on): {crossovers}")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        sha = None
    payload = {
        "rows": rows, "columns": list(columns), "crossover_T_vs_sdpa": crossovers, "agreement_rel_rms": agree,
        "setup": {"B": B, "H": H, "Dk": D, "Dv": D, "dtype": "bfloat16", "mode": "fwd+bwd", "chunk": a.chunk,
                  "n_h": 1, "gate": None, "beta_range": "(0, 2)", "float32_matmul_precision": "high",
                  "timing": f"CUDA events, median of {a.reps} (recurrent: median of 3); fla and fla_direct: "
                            f"{a.rounds} alternating rounds, best kept",
                  "recurrent_max_T": a.max_recurrent_T,
                  "agreement_inputs": {"B": 1, "T": 300, "H": a.H, "D": a.D},
                  "fla": _fla_version()},
        "run_info": {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "git_sha": sha or os.environ.get("STRUCTMAT_GIT_SHA"), "python": sys.version.split()[0],
                     "torch": torch.__version__, "device": torch.cuda.get_device_name(), "args": vars(a)},
    }
    jpath = out / f"mixer-speed-{stamp}.json"
    from structmat.eval.results import write_json

    write_json(jpath, payload)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in (("recurrent_ms", "recurrent (reference)"), ("chunked_ms", "chunked WY/UT"),
                           ("fla_ms", "fla through structmat"), ("fla_direct_ms", "fla called directly"),
                           ("sdpa_ms", "softmax attention (SDPA)")):
            pts = [(r["T"], r[key]) for r in rows if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("ms, fwd+bwd, bf16")
        ax.set_title(f"delta rule, B={B} H={H} D={D}, {torch.cuda.get_device_name()}", fontsize=8)
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        from structmat.atomic import write_png

        write_png(out / f"mixer-speed-{stamp}.png", fig, dpi=120)
    except ImportError:
        print("matplotlib missing: no PNG")
    print(f"wrote {jpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
