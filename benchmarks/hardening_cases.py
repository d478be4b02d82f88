"""Run every fuzz/fault case of ``tests/test_hardening.py`` (issue 13) once, time each, and write
``benchmarks/results/hardening-cases-<UTC timestamp>.json``: per case its cause, outcome, seconds and the error
message it produced; per cause the case count and the slowest case; the process's peak resident memory.

    PYTHONPATH=src python benchmarks/hardening_cases.py [--out benchmarks/results] [--limit-s 5]

The one-time costs (importing transformers, writing the small model the cases copy) are paid before timing starts.
Exit status 1 if a case fails or takes longer than ``--limit-s``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import test_hardening as hardening  # noqa: E402
from structmat.eval.results import run_info, write_json  # noqa: E402


def run(limit_s: float) -> dict:
    torch.set_num_threads(1)
    warm = Path(tempfile.mkdtemp(prefix="structmat-hardening-warm-"))
    hardening.saved_copy(warm)  # pay the one-time model save and imports outside the timings
    shutil.rmtree(warm, ignore_errors=True)
    rows = []
    for case in hardening.CASES:
        tmp = Path(tempfile.mkdtemp(prefix="structmat-hardening-"))
        torch.manual_seed(0)
        start = time.perf_counter()
        try:
            hardening.run_case(case, tmp)
            outcome, detail = "pass", ""
        except AssertionError as err:
            outcome, detail = "fail", str(err)[:500]
        seconds = time.perf_counter() - start
        shutil.rmtree(tmp, ignore_errors=True)
        expected = "works" if case.error is None else f"{case.error.__name__} matching {case.match!r}"
        rows.append({"cause": case.cause, "case": case.name, "expected": expected, "outcome": outcome,
                     "seconds": round(seconds, 4), "detail": detail})
        print(f"{outcome:4s} {seconds:7.3f} s  [{case.cause:2d}] {case.name}", flush=True)
    by_cause = {}
    for cause in sorted({r["cause"] for r in rows}):
        mine = [r for r in rows if r["cause"] == cause]
        slowest = max(mine, key=lambda r: r["seconds"])
        by_cause[str(cause)] = {"cases": len(mine), "failed": sum(r["outcome"] != "pass" for r in mine),
                                "max_seconds": slowest["seconds"], "slowest_case": slowest["case"]}
    slowest = max(rows, key=lambda r: r["seconds"])
    return {
        "summary": {"cases": len(rows), "passed": sum(r["outcome"] == "pass" for r in rows),
                    "causes_covered": sorted(int(c) for c in by_cause), "max_seconds": slowest["seconds"],
                    "slowest_case": slowest["case"], "limit_seconds": limit_s,
                    "over_limit": [r["case"] for r in rows if r["seconds"] > limit_s],
                    "total_seconds": round(sum(r["seconds"] for r in rows), 2),
                    "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
        "by_cause": by_cause,
        "cases": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run and time every issue-13 hardening case.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the JSON result")
    parser.add_argument("--limit-s", type=float, default=5.0, help="the most seconds a case may take")
    args = parser.parse_args(argv)
    result = run(args.limit_s)
    result["run_info"] = run_info(vars(args), seed=0, device="cpu")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = write_json(Path(args.out) / f"hardening-cases-{stamp}.json", result)
    s = result["summary"]
    print(f"{s['passed']}/{s['cases']} cases pass, causes {s['causes_covered']}; slowest {s['max_seconds']:.3f} s "
          f"({s['slowest_case']}); total {s['total_seconds']} s; peak RSS {s['peak_rss_mib']} MiB; wrote {path}")
    return 0 if s["passed"] == s["cases"] and not s["over_limit"] else 1


if __name__ == "__main__":
    sys.exit(main())
