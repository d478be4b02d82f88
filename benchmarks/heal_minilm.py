"""Recovery of a compressed MiniLM: heal the budget solver's 50% model with adapters of at most 2% of the linear
parameters, distilling the original (cosine of the sentence embeddings), and report

* the compressed model alone, EoRA alone (training-free, the same adapters at step 0) and the cosine-vs-steps curve;
* the merge: every N:M (2:4) base of the budget mix re-projected with SparseGPT on the calibration statistics stays
  exactly 2:4 (violations counted), and the merged model's cosine.

Usage (CPU; the student comes from ``structmat compress --model minilm --target-params 0.5 --out DIR``):

    PYTHONPATH=src python benchmarks/heal_minilm.py --student DIR --steps 600 --out benchmarks/results

On a GPU, ``--device cuda --max-seconds S`` trains for at most S seconds of step time (the lr schedule ends there);
``--teacher FOLDER`` takes MiniLM from a model folder (e.g. the package's ``model/`` copied elsewhere) instead of the
installed package. ``benchmarks/experiments/gpu_round_minilm_call4.sh`` is the GPU round.

Writes ``heal-minilm-<UTC>.json`` and ``.png`` under ``--out`` (the tune run's own files under ``--work``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="the compressed MiniLM directory (structmat compress)")
    p.add_argument("--teacher", default="minilm",
                   help="the original MiniLM: 'minilm' (the installed package) or its model folder")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N")
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="> 0: stop training after this many seconds of step time (the lr schedule ends there)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=0.02, help="adapter params as a fraction of the linear params")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64, help="training tokens per text (evaluation: 128)")
    p.add_argument("--extra-trainable", default=None, help="regex of other parameters that train (counted)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--texts", type=int, default=8192, help="training text chunks")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=None, help="checkpoint every N steps (default: --eval-every; 0: none)")
    p.add_argument("--loss", default="cosine")
    p.add_argument("--hidden-weight", type=float, default=0.0,
                   help="+ this x the per-block hidden-state error relative to the teacher's")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration texts (EoRA, rank placement)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", default="runs/heal-minilm", help="the tune run's folder (checkpoints: resumable)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="", help="appended to the file names (runs started in the same second)")
    p.add_argument("--no-png", dest="png", action="store_false", help="JSON only (the PNG can be drawn from it)")
    args = p.parse_args(argv)

    import torch

    from structmat.eval.results import run_info, write_json
    from structmat.train.tune import tune

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    # The compressed model alone: structmat compress evaluated it with the same protocol and held-out texts.
    alone, kinds = _student_alone(Path(args.student))
    res = tune({"out_dir": args.work, "task": "heal", "model": args.student, "teacher": args.teacher, "init": "eora",
                "adapter": "lowrank:rank=8", "adapter_budget": args.budget, "loss": args.loss, "steps": args.steps,
                "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr, "warmup": args.warmup,
                "texts": args.texts, "eval_every": args.eval_every, "extra_trainable": args.extra_trainable,
                "eval_texts": 256,
                "ckpt_every": args.eval_every if args.ckpt_every is None else args.ckpt_every,
                "hidden_weight": args.hidden_weight, "calib_samples": args.calib_samples, "merge": True,
                "threads": args.threads, "device": args.device, "max_seconds": args.max_seconds,
                "min_lr_ratio": args.min_lr_ratio, "seed": args.seed, "progress": sys.stderr.isatty()})
    curve = [{"step": v["step"], "cosine": v["cosine"], "top1_agreement": v["top1_agreement"], "wall_s": v["wall_s"]}
             for v in res["validation"]]
    nm_rows = [r for r in res["merge"]["layers"] if r["base"].startswith("nm")]
    summary = {
        "student_alone": {"cosine": alone.get("cosine"), "top1_agreement": alone.get("top1_agreement"),
                          "structures": kinds},
        "eora_alone": curve[0],
        "healed": curve[-1], "best": max(curve, key=lambda c: c["cosine"]),
        "merged": res["merged"],
        "nm_bases_merged": len(nm_rows), "nm_violations": sum(r["nm_violations"] or 0 for r in nm_rows),
        "nm_2_4_bases_merged": sum(r["base"].startswith("nm:n=2,m=4") for r in nm_rows),
        "adapter_params": res["params"]["adapter"], "trainable_params": res["params"]["trainable"],
        "linear_params": res["params"]["linear"], "adapter_fraction": res["params"]["adapter_fraction_of_linear"],
        "trainable_fraction": res["params"]["trainable"] / res["params"]["linear"], "ranks": res["setup"].get("ranks"),
        "target_cosine": 0.95, "met": curve[-1]["cosine"] >= 0.95,
        "wall_s_total": time.time() - start, "tokens_per_s": res["tokens_per_s"],
        "steps_done": curve[-1]["step"], "stopped": res.get("stopped"), "peak_memory_bytes": res.get("peak_memory_bytes"),
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "ranks"}, indent=1), flush=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out)
    payload = {"summary": summary, "curve": curve, "merge": res["merge"], "config": res["config"],
               "adapt": res["setup"].get("adapt"), "history": res["history"], "data": res["data"],
               "command": " ".join(["python", "benchmarks/heal_minilm.py", *(argv or sys.argv[1:])]),
               "run_info": run_info(vars(args), seed=args.seed, device=args.device or "cpu")}
    name = f"heal-minilm-{stamp}" + (f"-{args.tag}" if args.tag else "")
    print(f"wrote {write_json(out / f'{name}.json', payload)}")
    if args.png:
        print(f"wrote {_plot(summary, curve, out / f'{name}.png')}")
    return 0


def _student_alone(student: Path) -> tuple[dict, dict[str, int]]:
    """(the compressed model's quality as ``structmat compress`` measured it, its structure counts); empty when its
    compress.json is missing or holds no evaluation (then the JSON says so by the missing numbers)."""
    found = [f for f in (student / "compress.json", student.parent / "compress.json") if f.is_file()]
    if not found:  # one target: next to the model; several: in the parent folder
        print(f"no compress.json next to {student}: the compressed model alone is not reported", flush=True)
        return {}, {}
    report = next((r for r in json.loads(found[0].read_text())["results"]
                   if Path(r["dir"]).resolve() == student.resolve()), {})
    kinds: dict[str, int] = {}
    for row in report.get("report", {}).get("layers", []):
        kind = row["spec"].split(":")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    alone = report.get("quality", {})
    if alone:
        print(f"compressed student alone: cosine {alone['cosine']:.4f}, top-1 {alone['top1_agreement']:.3f}; "
              f"structures {kinds}", flush=True)
    return alone, kinds


def replot(json_path: str | Path) -> Path:
    """Draw the PNG of a result JSON written with ``--no-png`` (next to it, same name)."""
    payload = json.loads(Path(json_path).read_text())
    return _plot(payload["summary"], payload["curve"], Path(json_path).with_suffix(".png"))


def _plot(summary: dict, curve: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from structmat.atomic import write_png

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    ax.plot([c["step"] for c in curve], [c["cosine"] for c in curve], "o-", ms=3,
            label=f"heal (adapters {100 * summary['adapter_fraction']:.2f}% of linear params)")
    if summary["student_alone"]["cosine"] is not None:
        ax.axhline(summary["student_alone"]["cosine"], color="gray", ls=":", label="compressed, no adapter")
    ax.axhline(summary["target_cosine"], color="red", ls="--", lw=1, label="target 0.95")
    ax.scatter([0], [summary["eora_alone"]["cosine"]], color="C1", zorder=3, label="EoRA alone (step 0)")
    ax.scatter([curve[-1]["step"]], [summary["merged"]["cosine"]], color="C2", marker="s", zorder=3,
               label="merged into the bases")
    ax.set_xlabel("heal steps")
    ax.set_ylabel("held-out cosine to the original MiniLM")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return write_png(path, fig)


if __name__ == "__main__":
    sys.exit(main())
