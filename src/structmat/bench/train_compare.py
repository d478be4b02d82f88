"""``structmat bench train-compare``: dense vs structured MLPs trained from scratch, same token budget, then the
equal-wall-time comparison.

Variants (MLP = gate/up/down projections at ~50% of the dense MLP parameters; attention stays dense):

* ``dense``;
* ``lowrank`` (``lowrank:ratio=0.5``), ``monarch`` (``monarch:ratio=0.5``), ``blockdiag-dense`` (``blockdiag:nblocks=2``
  switched to dense -- reverse sparsification -- after ``--densify-at`` of the steps);
* each structured variant again with self-guided training (``-sg``: a dense guide decaying to 0 over the first
  ``--guide-frac`` of the steps).

Sequence-mixer variants (named with ``--only``; attention replaced, MLPs dense): ``deltanet`` (DeltaNet, eigenvalues
in [-1, 1]), ``deltanet-hybrid4`` (the same, every 4th layer keeps attention), ``gated_deltanet``, ``deltaproduct2``;
compare them with ``dense`` (attention) at the same tokens, e.g. ``--only dense,deltanet,deltanet-hybrid4
--decode-prompt 2048`` (adds greedy decode tokens/s at batch 1 after a 2048-token prompt).

Every run uses the same data order, schedule and hyper-parameters; only the MLP (or the mixer) differs. With ``--equal-wall`` each
structured variant (without ``-sg``) is trained once more for as many steps as fit in the dense run's wall time
(its own measured step time, a fresh cosine schedule of that length; fewer steps than dense when it is slower). Results: one JSON (every run's summary, its
validation curve and a thinned training curve, run_info) and one PNG (loss vs tokens, FLOPs, wall time) under
``--out``; the runs' own folders (models, results.json, loss.png) under ``--work-dir``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any

MLP_SPECS = {"lowrank": "lowrank:ratio=0.5", "monarch": "monarch:ratio=0.5", "blockdiag-dense": "blockdiag:nblocks=2"}


def variants(steps: int, guide_frac: float, densify_at: float) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"dense": {}}
    for name, spec in MLP_SPECS.items():
        base: dict[str, Any] = {"mlp": spec}
        if name == "blockdiag-dense":
            base["densify_step"] = max(1, int(round(densify_at * steps)))
        out[name] = base
    for name, spec in MLP_SPECS.items():
        out[f"{name}-sg"] = {**out[name], "guide_steps": max(1, int(round(guide_frac * steps)))}
    return out


MIXER_VARIANTS = {
    "deltanet": {"mixer": "deltanet", "neg_eigval": True},
    "deltanet-hybrid4": {"mixer": "deltanet", "neg_eigval": True, "attn_every": 4},
    "gated_deltanet": {"mixer": "gated_deltanet", "neg_eigval": True},
    "deltaproduct2": {"mixer": "deltaproduct:n_h=2", "neg_eigval": True},
}


def _summary(res: dict[str, Any]) -> dict[str, Any]:
    fin = res["final"]
    hist = res["history"]
    k = max(1, len(hist) // 200)
    mlp_params = res.get("mlp_params")
    return {
        "val_loss": fin["val_loss"], "val_ppl": fin["val_ppl"], "train_loss": fin["train_loss"],
        "params": res["model"]["params"], "mlp_params": mlp_params, "steps": fin["step"], "tokens": fin["tokens"],
        "flops": fin["flops"], "wall_s": fin["wall_s"], "tokens_per_s": fin["tokens"] / max(fin["wall_s"], 1e-9),
        "config": {k2: res["config"].get(k2) for k2 in ("mlp", "guide_steps", "densify_step", "steps", "lr", "mixer",
                                                         "neg_eigval", "attn_every", "mixer_backend")},
        "decode": fin.get("decode"),
        "validation": res["validation"], "history": hist[::k] + ([hist[-1]] if hist and (len(hist) - 1) % k else []),
    }


def _mlp_params(model_dir: str) -> int:
    from ..io import load_pretrained

    model = load_pretrained(model_dir)
    return sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)


def format_table(runs: dict[str, dict[str, Any]], dense_mlp: int | None) -> str:
    from ..eval.results import markdown_table

    rows = []
    for name, r in runs.items():
        share = f"{r['mlp_params'] / dense_mlp:.0%}" if dense_mlp and r.get("mlp_params") else "?"
        dec = (r.get("decode") or {}).get("decode_tokens_per_s")
        rows.append((name, f"{r['val_ppl']:.2f}", f"{r['val_loss']:.4f}", f"{r['params'] / 1e6:.1f}M", share,
                     f"{r['tokens'] / 1e6:.1f}M", f"{r['tokens_per_s']:,.0f}", f"{r['wall_s']:.0f}",
                     "-" if dec is None else f"{dec:,.0f}"))
    return markdown_table(("run", "val ppl", "val loss", "params", "MLP params", "tokens", "tokens/s", "wall s",
                           "decode tok/s (batch 1)"), rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="structmat bench train-compare", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--preset", default="60m")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--corpus", default="stdlib")
    p.add_argument("--guide-frac", type=float, default=0.3)
    p.add_argument("--densify-at", type=float, default=0.75)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all; '-' for none, e.g. "
                   "with --merge --equal-wall)")
    p.add_argument("--equal-wall", action="store_true", help="also train the structured variants for dense's wall time")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="runs/train-compare")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--decode-prompt", type=int, default=0, help="after each run: greedy decode tokens/s at batch 1 "
                   "after a prompt this long (0 = off)")
    p.add_argument("--mixer-backend", default="auto", help="delta-rule backend of the mixer variants")
    p.add_argument("--merge", default=None, help="an earlier train-compare JSON whose runs (e.g. dense) this report "
                   "includes and compares against; runs named again here are retrained")
    a = p.parse_args(argv)

    from ..atomic import write_atomic
    from ..eval.results import run_info, write_json
    from ..train.loop import train
    from ..train.plots import plot_runs

    table = variants(a.steps, a.guide_frac, a.densify_at)
    names = list(table) if a.only is None else [n.strip() for n in a.only.split(",") if n.strip()]
    table.update({k: {**v, "mixer_backend": a.mixer_backend} for k, v in MIXER_VARIANTS.items()})
    unknown = [n for n in names if n not in table and n != "-"]
    if unknown:
        print(f"unknown variant(s) {unknown}; choose from {list(table)}", file=sys.stderr)
        return 2
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_json = Path(a.out) / f"train-compare-{a.preset}-{stamp}.json"
    common = dict(preset=a.preset, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr,
                  warmup=a.warmup, vocab_size=a.vocab_size, corpus=a.corpus, eval_every=a.eval_every,
                  eval_batches=a.eval_batches, ckpt_every=0, compile=a.compile, seed=a.seed, resume=False,
                  progress=not a.no_progress, cache_dir=a.cache_dir, decode_prompt=a.decode_prompt)
    runs: dict[str, dict[str, Any]] = {}
    full: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {"benchmark": "train-compare", "args": vars(a), "variants": {n: table[n] for n in names if n in table},
                              "runs": runs, "equal_wall": {}}

    if a.merge:
        prev = json.loads(Path(a.merge).read_text())
        if prev.get("benchmark") != "train-compare":
            print(f"{a.merge} is not a train-compare report", file=sys.stderr)
            return 2
        for name, r in prev["runs"].items():
            if name not in names:
                runs[name] = {**r, "from": Path(a.merge).name}
                full[name] = r
        report["merged_from"] = Path(a.merge).name

    def save() -> None:
        dense_mlp = runs.get("dense", {}).get("mlp_params")
        report["run_info"] = run_info(vars(a), seed=a.seed)
        report["table"] = format_table(runs, dense_mlp) if runs else ""
        if report["equal_wall"]:
            report["table"] += ("\n\nEqual wall time (each structured MLP trained for the dense run's wall time):\n\n"
                                + format_table({**{"dense": runs["dense"]},
                                                **{f"{k}@wall": v for k, v in report["equal_wall"].items()}},
                                               dense_mlp))
        write_json(out_json, report)
        if full:
            plot_runs(full, out_json.with_suffix(".png"), title=f"{a.preset}: dense vs structured MLP (~50% MLP "
                                                                 f"params), {a.steps} steps")

    def run(label: str, overrides: dict[str, Any]) -> dict[str, Any]:
        cfg = {**common, **overrides, "out_dir": str(Path(a.work_dir) / label)}
        res = train(cfg)
        res["mlp_params"] = _mlp_params(res["model"]["dir"])
        full[label] = res
        return _summary(res)

    for name in [n for n in names if n != "-"]:
        runs[name] = run(name, table[name])
        print(f"{name}: val ppl {runs[name]['val_ppl']:.2f}, {runs[name]['tokens_per_s']:,.0f} tokens/s, "
              f"{runs[name]['wall_s']:.0f} s", flush=True)
        save()
    if a.equal_wall and "dense" in runs:
        dense_wall = runs["dense"]["wall_s"]
        for name in [n for n in MLP_SPECS if n in runs]:
            per_step = runs[name]["wall_s"] / runs[name]["steps"]
            steps = max(a.warmup + 1, int(dense_wall / per_step))  # fewer steps than dense if it is slower
            over = dict(table[name])
            over["steps"] = steps
            over["warmup"] = a.warmup
            if "densify_step" in over:
                over["densify_step"] = max(1, int(round(a.densify_at * steps)))
            r = run(f"{name}@wall", over)
            report["equal_wall"][name] = {**r, "dense_wall_s": dense_wall, "dense_val_ppl": runs["dense"]["val_ppl"]}
            print(f"{name} for dense's wall time ({steps} steps): val ppl {r['val_ppl']:.2f} vs dense "
                  f"{runs['dense']['val_ppl']:.2f}", flush=True)
            save()
    save()
    print(report["table"])
    write_atomic(out_json.with_suffix(".md"), (report["table"] + "\n").encode())
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
