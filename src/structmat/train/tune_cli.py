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
}
_SKIP = {"task", "model", "teacher", "betas", "plan"}


def _add_fields(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a JSON file of TuneConfig fields (flags given explicitly override it)")
    for f in dataclasses.fields(TuneConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=_HELP.get(f.name, f"(default {default})"))
            continue
        kind = {int: int, float: float}.get(type(default), str)
        if f.name in ("threads",):
            kind = int
        if f.name in ("alpha",):
            kind = float
        p.add_argument(flag, type=kind, default=None, help=_HELP.get(f.name, f"(default {default})"))


def add_tune_parsers(sub) -> None:
    ft = sub.add_parser("finetune", help="fine-tune a pretrained causal LM through adapters of any structure "
                                         "(or --adapter full); resumable exactly")
    ft.add_argument("--model", required=True, help="an HF or structmat model directory")
    ft.add_argument("--teacher", default=None, help="(optional) a teacher, only for --init eora")
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
