"""The adapter table: fine-tune one causal LM with every adapter kind at about equal trainable parameters, plus
full fine-tuning, on a corpus it was not trained on; report held-out perplexity, trainable parameters, optimizer
state and tokens/s.

Every method adapts the same layers (every linear layer of the blocks); its size is chosen per layer to match LoRA
rank ``--rank`` (r (in + out) parameters): PiSSA and rsLoRA are LoRA with another init / scaling; Compacter (kron)
takes the Kronecker rank whose factors hold about as many numbers; LoLDU (ldu) the same rank; S2FT rows the number
of rows; sparse + low rank (splr) half the rank plus the other half as sparse entries; NOLA/RandLoRA (randbasis)
r(in+out)/2 bases, i.e. 2 x that many mixing coefficients = LoRA's r(in+out) (the bases themselves are fixed random
numbers regenerated from the seed, shared by the layers of one shape, never trained or stored).

    PYTHONPATH=src python -m structmat.bench.adapter_table --model runs/lm5m/model --corpus site-packages \\
        --steps 150 --out benchmarks/results

Writes ``adapter-table-<UTC>.json`` and ``.md`` under ``--out``; each run's own folder under ``--work``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from pathlib import Path
from typing import Any, Callable

METHODS = ("lora", "pissa", "rslora", "kron", "randbasis", "ldu", "rows", "splr", "full")


def _sizes(model, targets: str) -> dict[str, tuple[int, int]]:
    from ..adapters.core import _shape, adaptable_modules

    return {n: _shape(m) for n, m in adaptable_modules(model).items() if re.fullmatch(targets, n)}


def _kron_rank(in_f: int, out_f: int, params: int) -> str:
    from ..structures.kronecker import nearest_sqrt_divisor

    m1, n1 = nearest_sqrt_divisor(out_f), nearest_sqrt_divisor(in_f)
    per_rank = m1 * n1 + (out_f // m1) * (in_f // n1)
    return f"kron:rank={max(1, round(params / per_rank))}"


def method_plans(sizes: dict[str, tuple[int, int]], rank: int) -> dict[str, tuple[dict[str, str], dict[str, Any]]]:
    """method -> (exact plan name -> delta spec, tune options)."""
    def per_layer(fn: Callable[[int, int, int], str]) -> dict[str, str]:
        return {re.escape(n): fn(i, o, rank * (i + o)) for n, (i, o) in sizes.items()}

    lowrank = per_layer(lambda i, o, p: f"lowrank:rank={rank}")
    return {
        "lora": (lowrank, {"init": "zero", "alpha": 2.0 * rank}),
        "pissa": (lowrank, {"init": "pissa", "alpha": 2.0 * rank}),
        "rslora": (lowrank, {"init": "zero", "alpha": 2.0 * rank, "rslora": True}),
        "kron": (per_layer(lambda i, o, p: _kron_rank(i, o, p)), {"init": "zero"}),
        "randbasis": (per_layer(lambda i, o, p: f"randbasis:rank={rank},bases={max(1, p // 2)}"), {"init": "zero"}),
        "ldu": (per_layer(lambda i, o, p: f"ldu:rank={rank}"), {"init": "zero"}),
        "rows": (per_layer(lambda i, o, p: f"rows:k={max(1, round(p / i))}"), {"init": "zero"}),
        "splr": (per_layer(lambda i, o, p: f"splr:rank={max(1, rank // 2)},"
                                           f"density={max(1, p // 2) / (i * o):.6f}"), {"init": "zero"}),
        "full": ({}, {}),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a causal LM directory (structmat train's model/ or HF)")
    p.add_argument("--corpus", default="site-packages")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--targets", default=r".*layers\.\d+\..*")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="adapters' learning rate")
    p.add_argument("--full-lr", type=float, default=3e-4, help="full fine-tuning's learning rate")
    p.add_argument("--randbasis-lr", type=float, default=1e-2, help="NOLA coefficients' learning rate")
    p.add_argument("--max-files", type=int, default=300)
    p.add_argument("--eval-files", type=int, default=24)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", default="runs/adapter-table")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)

    from ..eval.results import markdown_table, run_info, write_json
    from ..atomic import write_atomic
    from ..train.tune import load_any, tune

    model, _, kind = load_any(args.model)
    if kind != "causal":
        raise SystemExit(f"adapter_table: {args.model} is not a causal LM")
    sizes = _sizes(model, args.targets)
    del model
    plans = method_plans(sizes, args.rank)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"adapter_table: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    rows = []
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out)
    json_path = out / f"adapter-table-{stamp}.json"
    info = run_info(vars(args))
    for name in methods:
        plan, opts = plans[name]
        lr = args.full_lr if name == "full" else args.randbasis_lr if name == "randbasis" else args.lr
        cfg = {"out_dir": f"{args.work}/{name}", "task": "finetune", "model": args.model, "corpus": args.corpus,
               "adapter": "full" if name == "full" else "lowrank:rank=1", "targets": args.targets,
               "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": lr,
               "warmup": max(1, args.steps // 10), "max_files": args.max_files, "eval_files": args.eval_files,
               "eval_window": args.seq_len, "eval_every": args.steps, "ckpt_every": 0, "resume": False,
               "threads": args.threads, "plan": plan or None, **opts}
        print(f"--- {name}", flush=True)
        res = tune(cfg)
        rows.append({"method": name, "trainable_params": res["params"]["trainable"],
                     "trainable_fraction_of_linear": res["params"]["trainable"] / res["params"]["linear"],
                     "ppl_before": res["validation"][0]["ppl"], "ppl": res["final"]["ppl"],
                     "optimizer_state_bytes": res["optimizer_state_bytes"], "tokens_per_s": res["tokens_per_s"],
                     "wall_s": res["final"]["wall_s"], "lr": lr, "spec_example": next(iter(plan.values()), "all"),
                     "data": res["data"]})
        print(f"{name}: ppl {rows[-1]['ppl_before']:.2f} -> {rows[-1]['ppl']:.2f}, "
              f"{rows[-1]['trainable_params']:,} params, {rows[-1]['tokens_per_s']:.0f} tok/s", flush=True)
        write_json(json_path, {"rows": rows, "run_info": info})  # after every row: a killed run keeps its rows
    header = ("method", "example spec", "trainable params", "% of linear", "held-out ppl", "optimizer state",
              "tokens/s")
    table = markdown_table(header, [(r["method"], r["spec_example"], f"{r['trainable_params']:,}",
                                     f"{100 * r['trainable_fraction_of_linear']:.2f}", f"{r['ppl']:.2f}",
                                     f"{r['optimizer_state_bytes'] / 2 ** 20:.2f} MiB", f"{r['tokens_per_s']:,.0f}")
                                    for r in rows])
    print(f"\nbefore fine-tuning: held-out perplexity {rows[0]['ppl_before']:.2f}\n{table}")
    print(f"wrote {write_json(json_path, {'rows': rows, 'run_info': info})}")
    write_atomic(out / f"adapter-table-{stamp}.md", (table + "\n").encode())
    print(f"wrote {_plot(rows, out / f'adapter-table-{stamp}.png')}")
    return 0


def _plot(rows: list[dict], path: Path) -> Path:
    """Held-out perplexity against trainable parameters, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import write_png

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.scatter([r["trainable_params"] for r in rows], [r["ppl"] for r in rows])
    for r in rows:
        ax.annotate(r["method"], (r["trainable_params"], r["ppl"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.axhline(rows[0]["ppl_before"], color="gray", ls=":", label="before fine-tuning")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("held-out perplexity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return write_png(path, fig)


if __name__ == "__main__":
    sys.exit(main())
