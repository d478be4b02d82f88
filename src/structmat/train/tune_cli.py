"""``structmat finetune`` and ``structmat heal``: the flags of :class:`structmat.train.tune.TuneConfig`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .tune import TuneConfig

_HELP = {
    "out_dir": "output folder (checkpoints/, adapter/, results.json, curves.png)",
    "adapter": "delta spec (lowrank:rank=8, kron:rank=4, randbasis:rank=8,bases=64, ldu:rank=8, rows:k=16, "
               "splr:rank=4,density=0.01, ...) or 'full' (full fine-tuning)",
    "targets": "full regex of the layers that get adapters",
    "init": "zero | pissa | eora (eora: training-free start from the teacher's weights)",
    "adapter_budget": "low rank: place ranks per layer by the knapsack, this fraction of the linear params",
    "loss": "auto | lm | kl | cosine | mse (auto: lm for finetune, kl for causal heal, cosine for encoder heal)",
    "hidden_weight": "heal: add this x the per-block hidden-state error relative to the teacher's (0: off)",
    "corpus": "corpus spec: stdlib, site-packages, a directory (joined by +)",
    "tokenizer": "a model directory whose tokenizer to use (default: the teacher's, else the model's)",
    "alpha": "delta scale alpha/r (alpha/sqrt(r) with --rslora); default: scale 1",
    "rslora": "rsLoRA scaling alpha/sqrt(r) instead of alpha/r",
    "extra_trainable": "regex of other parameter names that train too, counted as trainable (e.g. '.*norm.*')",
    "lr_mult": "flat: one lr for every factor; mup: the structures' per-factor multipliers",
    "val_fraction": "held-out share of the corpus files (split by file-name hash)",
    "max_files": "causal: training files tokenized",
    "texts": "encoders: training text chunks",
    "min_lr_ratio": "the cosine schedule ends at this x lr",
    "calib_samples": "--init eora / --adapter-budget: calibration sequences (texts for encoders)",
    "eval_every": "evaluate every N steps (0: only at the start and the end)",
    "eval_texts": "encoders: held-out text chunks for the fidelity metrics",
    "eval_max_length": "encoders: tokens per held-out text",
    "eval_files": "causal: held-out files for perplexity",
    "eval_window": "causal: perplexity window in tokens",
    "eval_tokens": "causal: evaluate on only the first N held-out tokens (0: all of --eval-files; bounds a CPU's "
                   "evaluation)",
    "ckpt_every": "checkpoint every N steps (0: none); a rerun with the same settings resumes exactly",
    "keep_checkpoints": "how many checkpoints to keep",
    "resume": "resume from the last checkpoint in --out-dir when one matches the settings",
    "merge": "merge the adapters at the end and save the merged model too (N:M / Monarch bases keep their structure)",
    "threads": "CPU threads for torch",
    "device": "where models, calibration, training and evaluation run: cpu, cuda, cuda:N",
    "max_seconds": "> 0: stop training after this many seconds of step time (the lr schedule ends there)",
    "progress": "a progress bar on stderr",
    "stop_after": "testing aid: stop after this many steps, as if killed after a checkpoint",
}
_SKIP = {"task", "model", "teacher", "betas", "plan"}


def _help(name: str, default) -> str:
    text = _HELP.get(name, "")
    if default is None or "default" in text:
        return text or "(optional)"
    return f"{text} (default {default})".strip()


def _add_fields(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a JSON file of TuneConfig fields (flags given explicitly override it)")
    for f in dataclasses.fields(TuneConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=_help(f.name, default))
            continue
        kind = {int: int, float: float}.get(type(default), str)
        if f.name in ("threads",):
            kind = int
        if f.name in ("alpha",):
            kind = float
        p.add_argument(flag, type=kind, default=None, help=_help(f.name, default))


def add_tune_parsers(sub) -> None:
    ft = sub.add_parser("finetune", help="fine-tune a pretrained causal LM through adapters of any structure "
                                         "(or --adapter full); resumable exactly")
    ft.add_argument("--model", required=True, help="an HF or structmat model directory")
    ft.add_argument("--teacher", default=None, help="(optional) the original weights, for --init eora or --adapter-budget")
    _add_fields(ft)
    ft.set_defaults(func=run_tune, task="finetune")
    heal = sub.add_parser("heal", help="recover a compressed model by distilling the original into adapters (KL on "
                                       "logits for causal LMs, cosine/MSE on embeddings for encoders)")
    heal.add_argument("--student", dest="model", required=True, help="the compressed model directory")
    heal.add_argument("--teacher", required=True, help="the original model (directory, hub id or 'minilm')")
    _add_fields(heal)
    heal.set_defaults(func=run_tune, task="heal")


def config_from_args(args: argparse.Namespace) -> TuneConfig:
    values: dict = {}
    if args.config:
        with open(args.config) as fh:
            values.update(json.load(fh))
    values.update(task=args.task, model=args.model)
    if args.teacher is not None:
        values["teacher"] = args.teacher
    for f in dataclasses.fields(TuneConfig):
        v = getattr(args, f.name, None)
        if v is not None and f.name not in _SKIP:
            values[f.name] = v
    return TuneConfig.coerce(values)


def run_tune(args: argparse.Namespace) -> int:
    from .tune import tune

    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError, OSError, json.JSONDecodeError) as err:
        print(f"structmat {args.task}: {err}", file=sys.stderr)
        return 2
    res = tune(cfg)
    fin, params = res["final"], res["params"]
    metric = ", ".join(f"{k} {v:.4f}" for k, v in fin.items() if k not in ("step", "wall_s"))
    print(f"step {fin['step']}: {metric}; {params['trainable']:,} trainable params"
          + (f" ({100 * params['adapter_fraction_of_linear']:.2f}% of the linear params)" if "adapter" in params else "")
          + f", {fin['wall_s']:.1f} s; results in {cfg.out_dir}/results.json")
    return 0
