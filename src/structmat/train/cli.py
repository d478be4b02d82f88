"""``structmat train``: the flags of :class:`structmat.train.loop.TrainConfig` (or ``--config FILE.json``).

Wire it into ``structmat.cli.build_parser`` with ``add_train_parser(sub)``; also runnable as
``python -m structmat.train.cli ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .loop import TrainConfig

_HELP = {
    "out_dir": "output folder (checkpoints/, model/, results.json)",
    "preset": "model preset: 5m, 20m, 60m, 125m",
    "mlp": "structure spec for the MLP projections, e.g. lowrank:ratio=0.5 (None: dense)",
    "attn": "structure spec for the attention projections (None: dense)",
    "corpus": "corpus spec: stdlib, site-packages, a directory, hf:<name> (joined by +)",
    "mixer": "a sequence mixer in place of attention: deltanet, gated_deltanet, deltaproduct:n_h=2, ssm "
             "(keys n_h, heads, chunk, d_state, conv)",
    "neg_eigval": "mixer state-transition eigenvalues in [-1, 1] (beta in (0, 2)) instead of [0, 1]",
    "attn_every": "hybrid: every K-th layer keeps attention (default 0: all layers are mixers)",
    "mixer_backend": "delta-rule backend: auto (fla on CUDA bf16 where it can run, else chunked), fla, chunked, "
                     "recurrent",
    "decode_prompt": "after training, measure greedy decode tokens/s at batch 1 after a prompt this long (0 = off)",
}
_SKIP = {"plan", "model_overrides", "betas"}


def _help(name: str, default) -> str:
    return f"{_HELP.get(name, name.replace('_', ' '))} (default {default})"


def add_train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="pretrain a (structured) LLaMA-style model from scratch; resumable exactly",
                       description="Pretrain a (structured) LLaMA-style model from scratch. Every spec is checked "
                                   "against the model's shapes before the tokenizer is trained; a run resumes from "
                                   "the latest checkpoint in <out-dir>/checkpoints and says so.")
    p.add_argument("--config", help="a JSON file of TrainConfig fields (flags given explicitly override it)")
    p.add_argument("--plan-file", help="a JSON plan (Plan.to_dict() form); overrides --mlp/--attn")
    p.add_argument("--override", action="append", default=[], metavar="KEY=JSON",
                   help="a LlamaConfig field override, e.g. num_hidden_layers=2 (repeatable)")
    p.add_argument("--betas", type=float, nargs=2, default=None, metavar=("BETA1", "BETA2"),
                   help=f"AdamW betas (default {' '.join(map(str, TrainConfig().betas))})")
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_help(f.name, default))
            continue
        kind = {int: int, float: float}.get(type(default), str)
        if f.name in ("threads",):
            kind = int
        p.add_argument(flag, type=kind, default=None, help=_help(f.name, default))
    p.set_defaults(func=run_train)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict = {}
    if args.config:
        with open(args.config) as fh:
            values.update(json.load(fh))
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None and f.name not in _SKIP:
            values[f.name] = v
    if args.betas is not None:
        values["betas"] = tuple(args.betas)
    if args.plan_file:
        with open(args.plan_file) as fh:
            values["plan"] = json.load(fh)
    if args.override:
        overrides = dict(values.get("model_overrides") or {})
        for item in args.override:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"--override {item!r}: write KEY=VALUE")
            overrides[key] = json.loads(raw)
        values["model_overrides"] = overrides
    return TrainConfig.coerce(values)


def run_train(args: argparse.Namespace) -> int:
    from .loop import train

    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError, OSError, json.JSONDecodeError) as err:
        print(f"structmat train: {err}", file=sys.stderr)
        return 2
    res = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    fin = res["final"]
    print(f"step {fin['step']}: train loss {fin['train_loss']:.4f}, validation loss {fin['val_loss']:.4f} "
          f"(perplexity {fin['val_ppl']:.2f}), {fin['tokens']:,} tokens, {fin['flops']:.3e} FLOPs, "
          f"{fin['wall_s']:.1f} s; {res['model']['params']:,} params; results in {cfg.out_dir}/results.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="structmat")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
