"""Shared by the experiment scripts: put the repository's ``src`` on the path; timing and error helpers."""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))


def wall_us(fn, n: int = 300, warmup: int = 20) -> float:
    """Microseconds per call of ``fn`` over ``n`` calls, synchronised once at the end: host time when the calls
    are host-bound (few tokens), GPU time otherwise."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


REP_MS = 20


def bench(fn) -> float:
    """Median ms of ``fn`` (``triton.testing.do_bench``, L2 flushed between calls)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=REP_MS, return_mode="median")


def bench_graph(fn) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph: GPU time without the host's launch cost."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=REP_MS, return_mode="median")


def rel_rms(out, ref) -> float:
    import torch

    out = out.float()
    if not torch.isfinite(out).all():
        return float("inf")  # NaN poison left somewhere: an element was never written
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def print_summary(rep, seconds: float) -> None:
    """The probes' last line: how many correctness cases passed and where the JSON is."""
    n_pass = sum(r.get("status") == "PASS" for r in rep.data["correctness"])
    print(f"== done in {seconds:.0f}s: correctness {n_pass}/{len(rep.data['correctness'])} PASS; "
          f"JSON: {rep.path}", flush=True)


def run_sections(rep, sections, elapsed) -> None:
    """Run each probe section; a failing one is recorded in the report and the rest still run."""
    import traceback

    for section in sections:
        try:
            section(rep)
        except Exception:
            rep.data["errors"].append({"case": section.__name__, "trace": traceback.format_exc()[-3000:]})
            traceback.print_exc()
        print(f"   [{section.__name__} done at {elapsed():.0f}s]", flush=True)


def set_knobs(module, settings: dict) -> dict:
    """Set module-level settings (a kernel module's tuning knobs): a dict attribute is updated with the given dict,
    a one-element list attribute gets the value, any other attribute is replaced; returns what was replaced (for
    :func:`restore_knobs`)."""
    import copy

    saved = {}
    for name, value in settings.items():
        attr = getattr(module, name)
        saved[name] = copy.deepcopy(attr)
        if isinstance(attr, dict):
            attr.update(value)
        elif isinstance(attr, list):
            attr[0] = value
        else:
            setattr(module, name, value)
    return saved


def restore_knobs(module, saved: dict) -> None:
    for name, value in saved.items():
        attr = getattr(module, name)
        if isinstance(attr, dict):
            attr.clear()
            attr.update(value)
        elif isinstance(attr, list):
            attr[:] = value
        else:
            setattr(module, name, value)


def write_prefill_result(result: dict, out: str, prefix: str) -> None:
    """An experiment's end: ``models_vs_dense`` from ``result["models"]`` (name -> tokens/s per interleaved round;
    each model's best round against dense's best), the JSON written as ``<out>/<prefix>-<UTC>.json``, both printed."""
    import json
    from datetime import datetime, timezone
    from pathlib import Path

    best = {k: max(v) for k, v in result["models"].items()}
    result["models_vs_dense"] = {k: v / best["dense"] for k, v in best.items()}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(out) / f"{prefix}-{stamp}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result["models_vs_dense"], indent=1))
    print("wrote", path)
