"""``tune(config) -> dict``: fine-tune a pretrained model through adapters, or heal a compressed one by distillation.

* ``task="finetune"``: a causal LM (HF directory or a structmat directory) learns the next token on the corpus.
* ``task="heal"``: the compressed *student* learns to reproduce the original *teacher*: KL(teacher || student) on
  the next-token distributions for causal LMs; for encoders, 1 - cosine of the mean-pooled sentence embeddings
  (``loss="cosine"``, what the fidelity metric measures) or the MSE of the last hidden states (``loss="mse"``).

Only adapters train (``adapter`` is any delta spec, e.g. ``lowrank:rank=8``; ``init`` zero / pissa / eora, eora from
the teacher's weights and calibration statistics) unless ``adapter="full"`` (every parameter trains: full
fine-tuning). ``adapter_budget`` (low rank only) spends a fraction of the linear parameters where it removes the
most calibration error: each layer's rank is chosen by the exact knapsack of the budget solver over the whitened
error curves of ``W_original - W_student``, weighted by the layer's output sensitivity.

The loop reuses :mod:`structmat.train.loop`: AdamW, linear warmup + cosine, clipping, atomic checkpoints
(safetensors + JSON, never pickle) that resume exactly, a tqdm bar, ``results.json`` and a PNG of the curves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import adapt, merge, save_adapter
from ..adapters.core import _weight_of, adaptable_modules
from ..atomic import write_png
from .loop import (checkpoint_paths, coalesce_groups, coerce_config, list_checkpoints, load_checkpoint, lr_factor,
                   param_groups, save_checkpoint, set_lr, _restore)

TASKS = ("finetune", "heal")
LOSSES = ("auto", "lm", "kl", "cosine", "mse")
DEFAULT_TARGETS = r".*(layer|layers|h)\.\d+\..*"


@dataclass
class TuneConfig:
    out_dir: str = "runs/tune"
    task: str = "finetune"            # finetune | heal
    model: str = ""                   # finetune: the model; heal: the compressed student (structmat or HF dir)
    teacher: str | None = None        # heal: the original model (HF dir, hub id or "minilm")
    tokenizer: str | None = None      # default: the teacher's, else the model's
    adapter: str = "lowrank:rank=8"   # delta spec, or "full" (full fine-tuning)
    targets: str = DEFAULT_TARGETS    # full regex of the layers that get adapters
    plan: dict | None = None          # an explicit plan pattern -> delta spec (overrides adapter for those layers)
    init: str = "zero"                # zero | pissa | eora
    alpha: float | None = None
    rslora: bool = False
    adapter_budget: float = 0.0       # > 0 (low rank): ranks per layer from the knapsack, this fraction of linear params
    extra_trainable: str | None = None  # regex of other parameter names that train too (e.g. ".*LayerNorm.*")
    lr_mult: str = "flat"             # flat: one lr for every factor; mup: the structures' per-factor multipliers
    loss: str = "auto"                # auto: lm (finetune), kl (heal causal), cosine (heal encoder)
    hidden_weight: float = 0.0        # heal: + this x the per-layer hidden-state error (every block's output)
    corpus: str = "stdlib"
    val_fraction: float = 0.1         # held-out files (split by file-name hash, as everywhere in structmat)
    max_files: int = 400              # causal: training files tokenized (in split order)
    texts: int = 4096                 # encoders: training text chunks
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 200
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    calib_samples: int = 128          # eora / adapter_budget: calibration sequences (texts for encoders)
    eval_every: int = 50
    eval_texts: int = 256             # encoders: held-out chunks for fidelity
    eval_max_length: int = 128        # encoders: tokens per held-out text (the fidelity protocol's 128)
    eval_files: int = 16              # causal: held-out files for perplexity
    eval_window: int = 256
    eval_tokens: int = 0              # causal: only the first N held-out tokens (0: all of eval_files; a CPU's bound)
    ckpt_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = True
    merge: bool = False               # merge the adapters at the end and save the merged model too
    seed: int = 0
    threads: int | None = None
    device: str | None = None         # where models, calibration, training and evaluation run (cpu, cuda, cuda:N)
    max_seconds: float = 0.0          # > 0: training stops after this much step time; the schedule ends there too
    progress: bool = True
    stop_after: int = 0               # testing aid: return after this many steps (as if killed after a checkpoint)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.task not in TASKS:
            raise ValueError(f"tune config: task must be one of {TASKS}, got {self.task!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"tune config: loss must be one of {LOSSES}, got {self.loss!r}")
        if not self.model:
            raise ValueError("tune config: model is required (--model, or --student for heal)")
        if self.task == "heal" and not self.teacher:
            raise ValueError("tune config: heal needs teacher= (the original model the student was compressed from)")
        if self.init not in ("zero", "pissa", "eora"):
            raise ValueError(f"tune config: init must be zero, pissa or eora, got {self.init!r}")
        if self.adapter == "full" and (self.init != "zero" or self.adapter_budget):
            raise ValueError("tune config: adapter=full trains every weight of the model itself; init= and "
                             "adapter_budget= shape adapters, so drop them (or give an adapter spec)")
        if self.init == "eora" and not self.teacher:
            raise ValueError("tune config: init=eora needs teacher= (the original weights)")
        if self.lr_mult not in ("flat", "mup"):
            raise ValueError(f"tune config: lr_mult must be flat or mup, got {self.lr_mult!r}")
        if not 0 <= self.adapter_budget < 1:
            raise ValueError(f"tune config: adapter_budget must lie in [0, 1), got {self.adapter_budget}")
        if self.adapter_budget and not self.teacher:
            raise ValueError("tune config: adapter_budget places adapters where the model differs most from "
                             "teacher= (the original weights); give teacher=, or a fixed adapter without the budget")
        if self.adapter_budget and not self.adapter.startswith("lowrank"):
            raise ValueError(f"tune config: adapter_budget places low-rank adapters; use adapter=lowrank:rank=... "
                             f"with it (got {self.adapter!r})")
        for key in ("seq_len", "batch_size", "steps", "keep_checkpoints", "calib_samples", "eval_texts", "eval_max_length",
                    "eval_files", "max_files", "texts"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"tune config: {key} must be an int >= 1, got {v!r}")
        for key in ("warmup", "eval_every", "ckpt_every", "stop_after", "eval_tokens"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"tune config: {key} must be an int >= 0, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"tune config: lr must be > 0, got {self.lr}")
        if not (isinstance(self.hidden_weight, (int, float)) and math.isfinite(self.hidden_weight)
                and self.hidden_weight >= 0):
            raise ValueError(f"tune config: hidden_weight must be a finite number >= 0, got {self.hidden_weight!r}")
        if not (isinstance(self.max_seconds, (int, float)) and math.isfinite(self.max_seconds)
                and self.max_seconds >= 0):
            raise ValueError(f"tune config: max_seconds must be a finite number >= 0, got {self.max_seconds!r}")
        if self.device is not None:
            try:
                dev = torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"tune config: device {self.device!r} is not a device; use cpu, cuda or cuda:N") \
                    from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"tune config: device {self.device!r} asked for, but this torch has no CUDA device")
        if self.hidden_weight and self.task != "heal":
            raise ValueError("tune config: hidden_weight distils the teacher's hidden states; it needs task=heal")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def coerce(cls, config: "TuneConfig | dict[str, Any]") -> "TuneConfig":
        return coerce_config(cls, config, "tune config")


def _resume_key(cfg: TuneConfig) -> str:
    d = cfg.to_dict()
    for k in ("out_dir", "threads", "device", "eval_every", "ckpt_every", "keep_checkpoints", "resume", "progress",
              "stop_after", "merge"):
        d.pop(k)
    if not d["hidden_weight"]:
        d.pop("hidden_weight")  # off: the key of the runs written before the option existed
    if not d["max_seconds"]:
        d.pop("max_seconds")
    if not d["eval_tokens"]:
        d.pop("eval_tokens")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------------- loading
def load_any(name: str):
    """(model, tokenizer or None, kind) from a structmat directory, an HF directory / hub id, or ``minilm``."""
    from ..data.models import is_causal, load_model
    from ..io import load_pretrained

    path = Path(name)
    if (path / "structmat.json").is_file():
        model = load_pretrained(path).eval()
        tok = None
        if (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            from tokenizers import Tokenizer  # structmat train saves a bare tokenizers file (its EOS is known there)

            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        else:
            with contextlib.suppress(Exception):
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return model, tok, "causal" if is_causal(model) else "encoder"
    loaded = load_model(name)
    return loaded.model, loaded.tokenizer, loaded.kind


class _Objective:
    """The loss of one batch, and how batches are drawn (token windows for causal LMs, padded texts for encoders)."""

    def __init__(self, cfg: TuneConfig, kind: str, teacher: nn.Module | None, pad_id: int):
        self.cfg, self.kind, self.teacher, self.pad_id = cfg, kind, teacher, pad_id
        loss = cfg.loss
        if loss == "auto":
            loss = "lm" if cfg.task == "finetune" else ("kl" if kind == "causal" else "cosine")
        if kind == "causal" and loss not in ("lm", "kl"):
            raise ValueError(f"tune: a causal LM trains with loss lm or kl, not {loss!r}")
        if kind == "encoder" and loss not in ("cosine", "mse"):
            raise ValueError(f"tune: an encoder has no next-token objective; heal it with loss cosine or mse "
                             f"(got {loss!r}, task {cfg.task!r})")
        if loss in ("kl", "cosine", "mse") and teacher is None:
            raise ValueError(f"tune: loss {loss!r} distils a teacher; give teacher=")
        self.loss = loss

    def __call__(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        hidden = self.cfg.hidden_weight > 0
        if self.kind == "causal":
            if self.loss == "lm":
                return model(input_ids=batch, labels=batch).loss
            with torch.no_grad():
                t_out = self.teacher(input_ids=batch, output_hidden_states=hidden)
                target = t_out.logits.float().log_softmax(-1)
            s_out = model(input_ids=batch, output_hidden_states=hidden)
            logp = s_out.logits.float().log_softmax(-1)
            loss = F.kl_div(logp, target, log_target=True, reduction="none").sum(-1).mean()
            return loss + self._hidden_term(s_out, t_out, None) if hidden else loss
        mask = (batch != self.pad_id).long()
        width = int(mask.sum(1).max())  # texts are padded to seq_len: drop the columns no text reaches
        batch, mask = batch[:, :width], mask[:, :width]
        with torch.no_grad():
            t_out = self.teacher(input_ids=batch, attention_mask=mask, output_hidden_states=hidden)
        s_out = model(input_ids=batch, attention_mask=mask, output_hidden_states=hidden)
        t, s = t_out.last_hidden_state.float(), s_out.last_hidden_state.float()
        m = mask.unsqueeze(-1).float()
        if self.loss == "mse":
            loss = (((s - t) ** 2) * m).sum() / (m.sum() * t.shape[-1]) / t.pow(2).mean().clamp_min(1e-12)
        else:
            es, et = (s * m).sum(1) / m.sum(1), (t * m).sum(1) / m.sum(1)
            loss = (1 - F.cosine_similarity(es, et, dim=-1)).mean()
        return loss + self._hidden_term(s_out, t_out, m) if hidden else loss

    def _hidden_term(self, s_out, t_out, m: torch.Tensor | None) -> torch.Tensor:
        """``hidden_weight`` x the mean over blocks of each block output's squared error relative to the teacher's
        (on real tokens): a signal at every depth, not only through the final embedding."""
        terms = []
        for s, t in zip(s_out.hidden_states[1:], t_out.hidden_states[1:]):
            s, t = s.float(), t.float()
            if m is None:
                terms.append((s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12))
            else:
                terms.append((((s - t) ** 2) * m).sum() / (((t ** 2) * m).sum()).clamp_min(1e-12))
        return self.cfg.hidden_weight * torch.stack(terms).mean()


def _encoder_stream(tokenizer, texts: list[str], seq_len: int) -> tuple[torch.Tensor, int]:
    """Texts tokenized and padded to ``seq_len``, flattened: PackedBatches then hands out whole texts."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return enc["input_ids"].reshape(-1), int(tokenizer.pad_token_id)


# ------------------------------------------------------------------------------------------- adapter placement
def budget_ranks(student: nn.Module, teacher: nn.Module, names: list[str], stats: dict, budget: float,
                 sensitivity: dict[str, float] | None = None, step: int = 4) -> dict[str, int]:
    """Low-rank adapter ranks per layer that minimize the summed (sensitivity-weighted) calibration output error of
    ``W_teacher - (W_student + delta)`` with at most ``budget`` x the linear parameters of the layers: the whitened
    error curve of each layer's compression error (one eigendecomposition each), priced at ranks 0, step, 2*step,
    ..., then the budget solver's exact multiple-choice knapsack."""
    from ..project import lowrank_error_curve
    from ..project.budget_solver import Candidate, solve_budget

    student_layers, teacher_layers = adaptable_modules(student), adaptable_modules(teacher)
    candidates: dict[str, list[Candidate]] = {}
    total = 0
    for name in names:
        w_t = _weight_of(teacher_layers[name]).to(torch.float64)
        w_s = _weight_of(student_layers[name]).to(torch.float64)
        out_f, in_f = w_t.shape
        total += out_f * in_f
        err = w_t - w_s
        h = stats[name].gram.to(torch.float64)
        curve = lowrank_error_curve(err, stats[name], "whitened", guard=False) if float(err.abs().max()) > 0 \
            else torch.zeros(min(out_f, in_f) + 1, dtype=torch.float64)
        err_norm = float(((err @ h) * err).sum())
        weight = 1.0 if sensitivity is None else sensitivity.get(name, 1.0)
        options = []
        for r in range(0, min(out_f, in_f) // 2 + 1, step):
            cost = r * (in_f + out_f)
            value = weight * float(curve[r]) ** 2 * err_norm  # sensitivity x ||(E - delta) X||^2
            options.append(Candidate(layer=name, spec=f"lowrank:rank={r}" if r else "none", method="eora",
                                     params=cost, flops=2 * cost, error=value, dense_params=out_f * in_f))
        candidates[name] = options
    chosen = solve_budget(candidates, budget * total, key="params")
    return {name: int(c.spec.split("=")[1]) for name, c in chosen.items() if c.spec != "none"}


# ------------------------------------------------------------------------------------------------------- evaluate
def heldout_kl(model: nn.Module, teacher: nn.Module, tokens: torch.Tensor, window: int, batch_size: int = 4) -> float:
    """Mean KL(teacher || model) per token of the next-token distributions on consecutive windows of ``tokens``."""
    n = tokens.numel() // window
    if n == 0:
        raise ValueError(f"heldout_kl: {tokens.numel()} tokens, less than one window of {window}")
    seqs = tokens[: n * window].view(n, window)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            batch = seqs[start:start + batch_size].to(_device_of(model))
            t = teacher(input_ids=batch).logits.float().log_softmax(-1)
            s = model(input_ids=batch).logits.float().log_softmax(-1)
            kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
            total += float(kl.sum())
            count += kl.numel()
    return total / count


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _schedule_step(step: int, wall: float, cfg: TuneConfig) -> float:
    """Where the lr schedule stands: the step, or -- under a time cap -- the step the elapsed share of
    ``max_seconds`` corresponds to, whichever is further (so the cosine still ends decayed when time runs out)."""
    if not cfg.max_seconds:
        return step
    return max(step, cfg.steps * min(1.0, wall / cfg.max_seconds))


def _evaluate(cfg: TuneConfig, kind: str, model: nn.Module, tokenizer, val_docs, reference,
              teacher: nn.Module | None = None) -> dict[str, float]:
    from ..eval.fidelity import encoder_fidelity
    from ..eval.perplexity import perplexity

    was = model.training
    model.eval()
    with torch.no_grad():
        if kind == "causal":
            m = perplexity(model, reference, window=cfg.eval_window, device=_device_of(model))
            out = {"ppl": m["ppl"], "nll": m["nll"]}
            if teacher is not None:
                out["kl"] = heldout_kl(model, teacher, reference, cfg.eval_window)
            model.train(was)
            return out
        m = encoder_fidelity(reference, model, tokenizer)
    model.train(was)
    return {"cosine": m["cosine"], "top1_agreement": m["top1_agreement"]}


def _plot(results: dict[str, Any], path: Path) -> Path:

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist, val = results["history"], results["validation"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if hist:
        ys = [h["loss"] for h in hist]
        k = max(1, len(ys) // 50)
        smooth = [sum(ys[max(0, j - k + 1):j + 1]) / len(ys[max(0, j - k + 1):j + 1]) for j in range(len(ys))]
        axes[0].plot([h["step"] for h in hist], smooth, lw=1)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel(f"training loss ({results['objective']}, smoothed)")
    key = "cosine" if results["kind"] != "causal" else "kl" if results["objective"] == "kl" else "ppl"
    if val:
        axes[1].plot([v["step"] for v in val], [v[key] for v in val], "o-", ms=3)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel({"ppl": "held-out perplexity", "kl": "held-out KL(teacher || model)",
                        "cosine": "held-out cosine to the teacher"}[key])
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"structmat {results['config']['task']}: {results['config']['adapter']}")
    fig.tight_layout()
    return write_png(path, fig, dpi=110)


# ------------------------------------------------------------------------------------------------------------ run
def tune(config: TuneConfig | dict[str, Any]) -> dict[str, Any]:
    """Run per ``config``, resuming from the latest checkpoint under ``<out_dir>/checkpoints``; return the results
    (also written to ``<out_dir>/results.json``, with ``curves.png``, the adapter in ``<out_dir>/adapter``)."""
    cfg = TuneConfig.coerce(config)
    old = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _tune(cfg)
    finally:
        torch.set_num_threads(old)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _tune(cfg: TuneConfig) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from ..compress import calibrate, output_sensitivity
    from ..data.corpus import corpus_from_spec, manifest, split_files, text_chunks, token_stream
    from ..data.models import calibration_batches, Loaded
    from ..eval.fidelity import fidelity_reference
    from ..eval.results import run_info, write_json
    from ..io import save_pretrained
    from .data import PackedBatches

    out = Path(cfg.out_dir).expanduser()
    ckpt_dir = out / "checkpoints"
    _seed(cfg.seed)
    device = torch.device(cfg.device or "cpu")
    model, tokenizer, kind = load_any(cfg.model)
    model.to(device)
    teacher = None
    if cfg.teacher:
        teacher, t_tok, t_kind = load_any(cfg.teacher)
        teacher.to(device).eval().requires_grad_(False)
        tokenizer = t_tok if t_tok is not None else tokenizer
        if t_kind != kind:
            raise ValueError(f"tune: the teacher is a {t_kind} model but the student a {kind} one")
    if cfg.tokenizer:
        tokenizer = load_any(cfg.tokenizer)[1]
    if tokenizer is None:
        raise ValueError(f"tune: no tokenizer found next to {cfg.model}; give tokenizer= (a model directory)")

    docs = corpus_from_spec(cfg.corpus)
    train_docs, val_docs = split_files(docs, cfg.val_fraction)
    if not train_docs or not val_docs:
        raise ValueError(f"tune: corpus {cfg.corpus!r} split into {len(train_docs)} training and {len(val_docs)} "
                         f"held-out files at val_fraction={cfg.val_fraction}; both must be non-empty")
    if kind == "causal":
        stream = token_stream(train_docs[: cfg.max_files], tokenizer)
        pad_id = -1
        val_ref = token_stream(val_docs[: cfg.eval_files], tokenizer)
        if cfg.eval_tokens:  # (a cheaper, noisier estimate: the stream's first tokens)
            if cfg.eval_tokens < cfg.eval_window:
                raise ValueError(f"tune: eval_tokens={cfg.eval_tokens} is less than one eval_window of "
                                 f"{cfg.eval_window} tokens; give at least {cfg.eval_window}")
            val_ref = val_ref[: cfg.eval_tokens]
    else:
        stream, pad_id = _encoder_stream(tokenizer, text_chunks(train_docs, cfg.texts, seed=cfg.seed + 1),
                                         cfg.seq_len)
        val_ref = fidelity_reference(teacher if teacher is not None else model, tokenizer,
                                     text_chunks(val_docs, cfg.eval_texts), max_length=cfg.eval_max_length)
    batches = PackedBatches(stream, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    objective = _Objective(cfg, kind, teacher, pad_id)

    # --- adapters (built identically on every (re)start; a resumed run then loads the trained state)
    names = [n for n in adaptable_modules(model) if re.fullmatch(cfg.targets, n)]
    if not names and cfg.adapter != "full":
        raise ValueError(f"tune: targets {cfg.targets!r} match no linear layer; names look like "
                         f"{list(adaptable_modules(model))[:4]}")
    # "linear params": the weights of the in-scope layers of the original model (the teacher's when there is one)
    scope = adaptable_modules(teacher if teacher is not None else model)
    linear_params = sum(_weight_of(scope[n]).numel() for n in names if n in scope) or 1
    stats = None
    setup: dict[str, Any] = {}
    t0 = time.perf_counter()
    if cfg.adapter == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        report = None
    else:
        needs_stats = cfg.init == "eora" or cfg.adapter_budget > 0
        if needs_stats:
            loaded = Loaded(teacher, tokenizer, kind, str(cfg.teacher))
            calib = [{k: v.to(device) for k, v in b.items()}
                     for b in calibration_batches(loaded, train_docs, cfg.calib_samples, cfg.seq_len)]
            stats = calibrate(teacher, names, calib)
        plan: dict[str, Any]
        if cfg.adapter_budget > 0:
            sens = output_sensitivity(teacher, names, calib)
            ranks = budget_ranks(model, teacher, names, stats, cfg.adapter_budget, sens)
            if not ranks:
                raise ValueError(f"tune: adapter_budget={cfg.adapter_budget} buys no rank-4 adapter on any layer "
                                 "(or no layer differs from the teacher); raise the budget")
            plan = {re.escape(n): f"lowrank:rank={r}" for n, r in ranks.items()}
            setup["ranks"] = ranks
        elif cfg.plan:
            plan = dict(cfg.plan)
        else:
            plan = {re.escape(n): cfg.adapter for n in names}
        _seed(cfg.seed)
        report = adapt(model, plan, init=cfg.init, alpha=cfg.alpha, rslora=cfg.rslora, stats=stats,
                       reference=teacher)
        setup["adapt"] = report.to_dict()
    if cfg.extra_trainable:
        extra = [n for n, p in model.named_parameters() if re.fullmatch(cfg.extra_trainable, n)]
        if not extra:
            raise ValueError(f"tune: extra_trainable {cfg.extra_trainable!r} matches no parameter name")
        for n, p in model.named_parameters():
            if n in extra:
                p.requires_grad_(True)
        setup["extra_trainable"] = len(extra)
    setup["seconds"] = time.perf_counter() - t0
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, cfg.weight_decay)
    if cfg.lr_mult == "flat":
        for g in groups:
            g["lr_mult"] = 1.0
    # one group per (lr_mult, weight decay), and the fused step on CUDA: a step of small adapters is host-bound
    optimizer = torch.optim.AdamW(coalesce_groups(groups), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda" or None)

    step, wall, history, val_history, resumed_from, stopped = 0, 0.0, [], [], None, None
    existing = list_checkpoints(ckpt_dir) if cfg.resume else []
    if existing:
        step = existing[-1]
        state, tensors = load_checkpoint(ckpt_dir, step)
        if state.get("config_key") != _resume_key(cfg):
            raise ValueError(f"checkpoint {step} in {ckpt_dir} was written with different settings; use another "
                             "out_dir, or resume=False to start over")
        _restore(state, tensors, model, optimizer)
        batches.load_state_dict(state["data"])
        wall, history, val_history, resumed_from = float(state["wall_s"]), state["history"], state["val_history"], step

    def checkpoint() -> None:
        save_checkpoint(ckpt_dir, step, model, optimizer, {
            "config_key": _resume_key(cfg), "config": cfg.to_dict(), "data": batches.state_dict(), "wall_s": wall,
            "history": history, "val_history": val_history})
        for old in list_checkpoints(ckpt_dir)[:-cfg.keep_checkpoints]:
            for p in reversed(checkpoint_paths(ckpt_dir, old)):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def validate() -> None:
        metrics = _evaluate(cfg, kind, model, tokenizer, val_docs, val_ref, teacher)
        val_history.append({"step": step, "wall_s": wall, **metrics})
        # one line per evaluation as it happens: a run killed from outside keeps its curve (a resumed run appends)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "validation.jsonl", "a") as fh:
            fh.write(json.dumps(val_history[-1]) + "\n")
        if not cfg.progress:
            print(f"{cfg.task} step {step} ({wall:.1f} s): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)

    if not val_history:
        validate()  # step 0: the starting point (after the adapter init, e.g. EoRA alone)
    tokens_step = cfg.batch_size * cfg.seq_len
    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress, desc=cfg.task, unit="step")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while step < cfg.steps:
        if cfg.max_seconds and wall >= cfg.max_seconds:
            stopped = f"time cap of {cfg.max_seconds:g} s of training reached at step {step} of {cfg.steps}"
            break
        if cfg.stop_after and resumed_from is None and step >= cfg.stop_after:
            bar.close()
            return {"stopped_at": step}
        t_start = time.perf_counter()
        set_lr(optimizer, cfg.lr, lr_factor(_schedule_step(step, wall, cfg), cfg.warmup, cfg.steps, cfg.min_lr_ratio))
        batch = batches.next().to(device, non_blocking=True)
        loss = objective(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"tune: the loss is {float(loss)} at step {step + 1}; lower lr")
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)) if cfg.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t_start
        wall += dt
        step += 1
        history.append({"step": step, "loss": float(loss.detach()), "grad_norm": grad_norm, "wall_s": wall,
                        "tokens": step * tokens_step})
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}", tok_s=f"{tokens_step / max(dt, 1e-9):,.0f}")
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            validate()
        if cfg.ckpt_every and step % cfg.ckpt_every == 0:
            checkpoint()
    bar.close()
    if not val_history or val_history[-1]["step"] != step:
        validate()

    from .galore import state_bytes

    results: dict[str, Any] = {
        "config": cfg.to_dict(), "kind": kind, "objective": objective.loss,
        "run_info": run_info(cfg.to_dict(), seed=cfg.seed, device=str(device)),
        "setup": setup, "resumed_from": resumed_from, "stopped": stopped,
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "params": {"trainable": sum(p.numel() for p in trainable), "model": sum(p.numel() for p in model.parameters()),
                   "linear": linear_params},
        "optimizer_state_bytes": state_bytes(optimizer),
        "tokens_per_s": (len(history) * tokens_step / wall) if wall else None,
        "data": {"train": manifest(train_docs), "validation": manifest(val_docs)},
        "history": history, "validation": val_history,
        "final": {"step": step, "wall_s": wall, **(val_history[-1] if val_history else {})},
    }
    if report is not None:
        results["params"]["adapter"] = report.adapter_params
        results["params"]["adapter_fraction_of_linear"] = report.adapter_params / linear_params
        save_adapter(model, out / "adapter", base_model=cfg.model)
    if cfg.merge and report is not None:
        merged = merge(model, stats=stats)
        results["merge"] = merged.to_dict()
        results["merged"] = _evaluate(cfg, kind, model, tokenizer, val_docs, val_ref, teacher)
        with contextlib.suppress(ValueError):  # only transformers models can be saved as a model directory
            if getattr(model, "config", None) is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(out / "model")  # (first: the model's atomic save carries it in)
            save_pretrained(model, out / "model")
    write_json(out / "results.json", results)
    _plot(results, out / "curves.png")
    return results


__all__ = ["TuneConfig", "tune", "budget_ranks", "load_any", "TASKS"]
