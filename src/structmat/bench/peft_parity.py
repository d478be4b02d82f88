"""peft parity: structmat's LoRA (``lowrank`` delta, zero init) against peft's LoRA on the same causal LM.

Both start from the same adapter (peft's kaiming-uniform A copied into structmat's V; B = U = 0), train with the same
AdamW settings on the same batches (same seed), and are compared on: the logits at init, the loss curves, the
logits after a save/load through the other library's files (structmat -> peft format -> peft, peft -> structmat),
and tokens/s of the training steps (same process, same machine, alternating steps so load changes hit both).

    PYTHONPATH=src python -m structmat.bench.peft_parity --model runs/lm5m/model --steps 100 --out benchmarks/results

Writes ``peft-parity-<UTC>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rel(a, b) -> float:
    import torch

    return float(torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a causal LM directory (structmat train's model/ or HF)")
    p.add_argument("--corpus", default="stdlib")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-files", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)

    import peft
    import torch

    from ..adapters import adapt, adapter_modules, adapter_parameters, load_peft_lora, save_peft_lora
    from ..data.corpus import corpus_from_spec, split_files, token_stream
    from ..eval.results import run_info, write_json
    from ..train.data import PackedBatches
    from ..train.tune import load_any

    if args.threads:
        torch.set_num_threads(args.threads)
    base, tok, kind = load_any(args.model)
    if kind != "causal":
        raise SystemExit(f"peft_parity: {args.model} is not a causal LM")
    base.eval()
    train_docs, _ = split_files(corpus_from_spec(args.corpus))
    stream = token_stream(train_docs[: args.max_files], tok)

    torch.manual_seed(args.seed)
    config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, lora_dropout=0.0)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    ours = copy.deepcopy(base)
    pattern = r".*\.(" + "|".join(TARGETS) + ")"
    adapt(ours, {pattern: f"lowrank:rank={args.rank}"}, alpha=args.alpha)
    with torch.no_grad():  # the same start: peft's A (kaiming uniform) as our V, B = U = 0
        for name, a in adapter_modules(ours).items():
            layer = theirs.base_model.model.get_submodule(name)
            a.delta.V.copy_(layer.lora_A["default"].weight)
            a.delta.U.copy_(layer.lora_B["default"].weight)
    probe = stream[: 4 * args.seq_len].view(4, args.seq_len)
    with torch.no_grad():
        init_diff = _rel(ours(input_ids=probe).logits, theirs(input_ids=probe).logits)

    curves = {"structmat": [], "peft": []}
    seconds = {"structmat": 0.0, "peft": 0.0}
    models = {"structmat": ours, "peft": theirs}
    params = {"structmat": adapter_parameters(ours), "peft": [q for q in theirs.parameters() if q.requires_grad]}
    opts = {k: torch.optim.AdamW(v, lr=args.lr, weight_decay=0.0) for k, v in params.items()}
    batches = {k: PackedBatches(stream, args.seq_len, args.batch_size, seed=args.seed) for k in models}
    for m in models.values():
        m.train()
    for step in range(args.steps):
        for key in ("structmat", "peft") if step % 2 == 0 else ("peft", "structmat"):
            batch = batches[key].next()
            t0 = time.perf_counter()
            loss = models[key](input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params[key], 1.0)
            opts[key].step()
            opts[key].zero_grad(set_to_none=True)
            seconds[key] += time.perf_counter() - t0
            curves[key].append(float(loss.detach()))
    for m in models.values():
        m.eval()
    with torch.no_grad():
        trained_diff = _rel(ours(input_ids=probe).logits, theirs(input_ids=probe).logits)
        with tempfile.TemporaryDirectory() as d:
            save_peft_lora(ours, Path(d) / "ours")
            reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(Path(d) / "ours")).eval()
            ours_in_peft = _rel(reloaded(input_ids=probe).logits, ours(input_ids=probe).logits)
            theirs.save_pretrained(Path(d) / "theirs")
            mine = copy.deepcopy(base)
            load_peft_lora(mine, Path(d) / "theirs")
            theirs_in_ours = _rel(mine.eval()(input_ids=probe).logits, theirs(input_ids=probe).logits)
    tokens = args.steps * args.batch_size * args.seq_len
    diffs = [abs(a - b) for a, b in zip(curves["structmat"], curves["peft"])]
    summary = {
        "logits_rel_diff_at_init": init_diff, "logits_rel_diff_after_training": trained_diff,
        "structmat_lora_loaded_in_peft_rel_diff": ours_in_peft, "peft_lora_loaded_in_structmat_rel_diff": theirs_in_ours,
        "loss_first": {k: v[0] for k, v in curves.items()}, "loss_last": {k: v[-1] for k, v in curves.items()},
        "max_abs_loss_diff": max(diffs), "mean_abs_loss_diff": sum(diffs) / len(diffs),
        "tokens_per_s": {k: tokens / s for k, s in seconds.items()},
        "speed_ratio_structmat_over_peft": seconds["peft"] / seconds["structmat"],
        "trainable_params": {k: sum(q.numel() for q in v) for k, v in params.items()},
        "device": "cpu", "peft_version": peft.__version__,
    }
    print(summary, flush=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out)
    print(f"wrote {write_json(out / f'peft-parity-{stamp}.json', {'summary': summary, 'curves': curves, 'run_info': run_info(vars(args), seed=args.seed, device='cpu')})}")
    print(f"wrote {_plot(curves, out / f'peft-parity-{stamp}.png')}")
    return 0


def _plot(curves: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import write_png

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for key, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, lw=1, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("LoRA: structmat vs peft (same init, data, seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return write_png(path, fig)


if __name__ == "__main__":
    sys.exit(main())
