"""``train(config) -> dict``: pretrain a (structured) LLaMA-style causal LM from scratch, resumable exactly.

* AdamW; each structured layer's ``param_groups()`` gives its factors' learning-rate multipliers (lr = base lr x
  lr_mult); dense parameters have lr_mult 1; biases and norm weights (every 1-D parameter) have no weight decay.
* linear warmup then cosine decay to ``min_lr_ratio`` x lr; gradient clipping; gradient accumulation; bf16 autocast
  on CUDA only; optional ``torch.compile``; a tqdm bar with loss and tokens/s; validation perplexity every
  ``eval_every`` steps and at the end.
* Checkpoints ``<out>/checkpoints/step-XXXXXXX.{safetensors,json}``: the tensors (model, optimizer state keyed by
  parameter name, torch CPU/CUDA RNG, numpy RNG key; full tensors even under FSDP) in safetensors, everything else
  (optimizer hyper-parameters, schedule step, python/numpy RNG, data position, history) in JSON, which is written
  LAST and records the sha256 of the tensor file and of its own body: a checkpoint exists iff its JSON file does, and
  a damaged or edited one raises ``ValueError``. Both writes are atomic. Nothing is unpickled. One run at a time per
  output folder (``<out>/.lock``); temporary files of killed writes are removed at the next start; a resumed run
  says so ("resumed from step N").
* Results: ``<out>/results.json`` (loss vs step/tokens/FLOPs/wall time, validation, params, corpus manifest,
  run_info), ``<out>/loss.png`` (loss vs tokens, FLOPs and wall time) and the final model in ``<out>/model``
  (``structmat.save_pretrained`` + ``tokenizer.json``).
* Methods (:mod:`structmat.train.methods`): self-guided training (``guide_steps``), reverse sparsification
  (``densify_step``); optimizers AdamW or GaLore/Fira (:mod:`structmat.train.galore`, ``optimizer="galore"``).
* Distributed (:mod:`structmat.train.distributed`): under ``torchrun``, DDP or FSDP2; ``batch_size`` is per process.

FLOPs: forward per token = every structured layer's ``flops(1)`` + 2*in*out for each dense linear (lm_head and
self-guided guides included) + the attention scores and mixing ``4 * seq_len * hidden`` per layer (full, not
causal-halved); a training token is counted as 3x the forward; the total is accumulated step by step, since a phase
switch changes the per-token cost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..atomic import write_atomic
from ..surgery import Plan, linear_modules, structured_modules
from ..validate import loads_json
from .galore import GaLoreAdamW, without_embeddings
from .galore import state_bytes as optimizer_state_bytes
from .models import DEFAULT_VOCAB

CKPT_FORMAT = "structmat-train-checkpoint"
CKPT_VERSION = 3  # 2: optimizer state keyed by parameter name (FSDP-safe); 3: the JSON carries its own sha256
_CKPT_NAME = re.compile(r"step-(\d{7,})\.json")


def coerce_config(cls, config, label: str):
    """A config dataclass from itself or a dict; unknown keys and other types are refused with the valid names."""
    if isinstance(config, cls):
        return config
    if not isinstance(config, dict):
        raise TypeError(f"{label} must be a {cls.__name__} or a dict, got {type(config).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(config) - names
    if unknown:
        raise ValueError(f"{label}: unknown key(s) {sorted(unknown)}; valid: {sorted(names)}")
    return cls(**config)

@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    # model
    preset: str = "5m"
    vocab_size: int = DEFAULT_VOCAB
    mlp: str | None = None            # structure spec for gate/up/down, e.g. "lowrank:ratio=0.5"
    attn: str | None = None           # structure spec for q/k/v/o
    plan: dict | None = None          # a full plan (Plan.to_dict() form); overrides mlp/attn
    model_overrides: dict = field(default_factory=dict)
    # data
    corpus: str = "stdlib"
    val_fraction: float = 0.1
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    # optimisation
    steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    optimizer: str = "adamw"          # adamw | galore (low-rank gradient projection, structmat.train.galore)
    galore_rank: int = 128
    galore_gap: int = 200             # steps between projector refreshes
    galore_scale: float = 0.25
    galore_residual: str = "none"     # none | fira (add the scaled out-of-subspace residual, Fira-style)
    # methods (structmat.train.methods)
    guide_steps: int = 0              # self-guided training: a dense guide decays to 0 over these steps (0 = off)
    densify_step: int = 0             # reverse sparsification: structured -> dense after this step (0 = off)
    # sequence mixers in place of attention (structmat.mixers.hf.replace_attention)
    mixer: str | None = None          # deltanet | gated_deltanet | deltaproduct:n_h=2 | ssm (None: attention)
    neg_eigval: bool = False          # eigenvalues in [-1, 1] (beta in (0, 2)) instead of [0, 1]
    attn_every: int = 0               # hybrid: every K-th layer keeps attention (0: every layer is a mixer)
    mixer_backend: str = "auto"       # auto | fla | chunked | recurrent (auto: fla on CUDA bf16 where it can run)
    decode_prompt: int = 0            # after training: decode tokens/s at batch 1 after a prompt this long (0 = off)
    decode_tokens: int = 64
    # running
    parallel: str = "ddp"             # under torchrun (WORLD_SIZE > 1): ddp | fsdp
    seed: int = 0
    device: str | None = None
    compile: bool = False
    threads: int | None = None
    eval_every: int = 200
    eval_batches: int = 20
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    resume: bool = True
    progress: bool = True
    cache_dir: str | None = None      # default ~/.cache/structmat (tokenizers/ and streams/ under it)
    throttle_s: float = 0.0           # sleep after each step (a testing aid for the kill-and-resume test)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for key in ("seq_len", "batch_size", "grad_accum", "steps", "eval_batches", "keep_checkpoints"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"train config: {key} must be an int >= 1, got {v!r}")
        for key in ("warmup", "eval_every", "ckpt_every", "guide_steps", "densify_step", "galore_rank",
                    "galore_gap"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"train config: {key} must be an int >= 0 (0 = off), got {v!r}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train config: need lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr}, "
                             f"{self.min_lr_ratio}")
        if self.optimizer not in ("adamw", "galore"):
            raise ValueError(f"train config: optimizer must be adamw or galore, got {self.optimizer!r}")
        if self.optimizer == "galore" and (self.galore_rank < 1 or self.galore_gap < 1):
            raise ValueError("train config: galore needs galore_rank >= 1 and galore_gap >= 1")
        if self.galore_residual not in ("none", "fira"):
            raise ValueError(f"train config: galore_residual must be none or fira, got {self.galore_residual!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"train config: parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.guide_steps and self.densify_step and self.densify_step < self.guide_steps:
            raise ValueError(f"train config: densify_step ({self.densify_step}) must come after the self-guided phase "
                             f"ends (guide_steps={self.guide_steps})")
        if self.guide_steps > self.steps or (self.densify_step and self.densify_step >= self.steps):
            raise ValueError(f"train config: need guide_steps <= steps and densify_step < steps, got "
                             f"guide_steps={self.guide_steps}, densify_step={self.densify_step}, steps={self.steps}")
        if self.guide_steps and self.mlp is None and self.attn is None and self.plan is None:
            raise ValueError("train config: guide_steps (self-guided training) needs structured layers: give mlp, "
                             "attn or plan")
        if self.mixer is not None:
            from .models import parse_mixer

            try:
                parse_mixer(self.mixer)
            except ValueError as err:
                raise ValueError(f"train config: {err}") from None
        if not isinstance(self.attn_every, int) or self.attn_every < 0 or self.attn_every == 1:
            raise ValueError(f"train config: attn_every must be 0 or an int >= 2 (every K-th layer keeps attention), "
                             f"got {self.attn_every!r}")
        if (self.attn_every or self.neg_eigval) and self.mixer is None:
            raise ValueError("train config: attn_every and neg_eigval apply to a mixer; give mixer (e.g. deltanet)")
        from ..mixers import BACKENDS

        if self.mixer_backend not in BACKENDS:
            raise ValueError(f"train config: mixer_backend must be one of {BACKENDS}, got {self.mixer_backend!r}")
        if self.decode_prompt < 0 or self.decode_tokens < 2:
            raise ValueError(f"train config: need decode_prompt >= 0 and decode_tokens >= 2, got "
                             f"{self.decode_prompt}, {self.decode_tokens}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"train config: val_fraction must lie in (0, 1), got {self.val_fraction}")

    @classmethod
    def coerce(cls, config: "TrainConfig | dict[str, Any]") -> "TrainConfig":
        return coerce_config(cls, config, "train config")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def check_model(self) -> None:
        """Build the model on the meta device (no memory, no data): every spec is checked against the preset's real
        layer shapes before the tokenizer or any data work starts."""
        from ..validate import check_model_config
        from .models import PRESETS, llama_config, structured_llama

        plan = self.build_plan()
        if self.preset not in PRESETS:
            raise ValueError(f"train config: unknown model preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        try:  # transformers validates a config with its own exception classes
            config = llama_config(self.preset, self.vocab_size, self.seq_len, **self.model_overrides)
        except Exception as err:
            raise ValueError(f"train config: the model config is invalid ({type(err).__name__}: "
                             f"{str(err).strip().splitlines()[-1]}); fix model_overrides/vocab_size/seq_len") from None
        check_model_config(config, "train config")
        known = set(type(config)().to_dict())
        unknown = sorted(set(self.model_overrides) - known)
        if unknown:
            raise ValueError(f"train config: model_overrides has unknown LlamaConfig field(s) {unknown}; e.g. "
                             "num_hidden_layers, hidden_size, intermediate_size, num_attention_heads")
        with torch.device("meta"):
            m = structured_llama(self.preset, self.vocab_size, plan, seed=self.seed, max_seq_len=self.seq_len,
                                 **self.model_overrides)
            self.add_mixer(m)

    def add_mixer(self, model: nn.Module) -> nn.Module:
        """Put the configured mixer in place of attention (nothing when ``mixer`` is None)."""
        if self.mixer is None:
            return model
        from .models import mixer_llama

        return mixer_llama(model, self.mixer, self.neg_eigval, self.attn_every, self.mixer_backend)

    def build_plan(self) -> Plan | None:
        from .models import make_plan

        if self.plan is not None:
            return Plan.coerce(self.plan)
        if self.mlp is None and self.attn is None:
            return None
        return make_plan(self.mlp, self.attn)


# --------------------------------------------------------------------------------------------- optimizer & schedule
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: each structured layer's ``param_groups()`` (lr_mult per factor; its weight_decay if it names
    one, else ``weight_decay``), then the dense parameters: matrices with decay, 1-D (biases, norms) without."""
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for name, layer in structured_modules(model).items():
        for g in layer.param_groups():
            params = [p for p in g["params"] if p.requires_grad and id(p) not in seen]
            if not params:
                continue
            seen.update(id(p) for p in params)
            groups.append({"params": params, "name": f"{name}.{g.get('name', '')}",
                           "lr_mult": float(g.get("lr_mult", 1.0)),
                           "weight_decay": float(g.get("weight_decay", weight_decay))})
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            (decay if p.ndim >= 2 else no_decay).append(p)
    if decay:
        groups.append({"params": decay, "name": "dense", "lr_mult": 1.0, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "name": "dense.no_decay", "lr_mult": 1.0, "weight_decay": 0.0})
    return groups


def coalesce_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One AdamW group per distinct (lr_mult, weight_decay): the same updates (AdamW is per parameter), but an
    optimizer step is a few multi-tensor launches instead of a dozen per structured factor -- with adapters on
    SmolLM2's 210 layers, 420 one-tensor groups made the optimizer a large share of a host-bound step."""
    merged: dict[tuple[float, float], dict[str, Any]] = {}
    for g in groups:
        key = (float(g.get("lr_mult", 1.0)), float(g.get("weight_decay", 0.0)))
        if key not in merged:
            merged[key] = {**g, "params": [], "name": f"lr_mult={key[0]:g},weight_decay={key[1]:g}"}
        merged[key]["params"].extend(g["params"])
    return list(merged.values())


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``; ``step`` is 0-based."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = base_lr * g["lr_mult"] * factor


# ------------------------------------------------------------------------------------------------------------ FLOPs
def forward_flops_per_token(model: nn.Module, seq_len: int) -> int:
    total = sum(layer.flops(1) for layer in structured_modules(model).values())
    for m in linear_modules(model).values():
        total += 2 * m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
    cfg = model.config
    layers = getattr(getattr(model, "model", model), "layers", [])
    mixers = [l.self_attn.mixer for l in layers if hasattr(getattr(l, "self_attn", None), "mixer")]
    total += 4 * seq_len * cfg.hidden_size * (cfg.num_hidden_layers - len(mixers))  # scores and mixing, causal
    for m in mixers:  # the recurrence, counted in its token-by-token form: per head and Householder factor a read
        # (S^T k) and a rank-1 write, per token one read S^T q -- 2 Dk Dv FLOPs each; a diagonal SSM: 6 per state
        if hasattr(m, "nh"):
            total += m.n_heads * (4 * m.nh + 2) * m.head_dim * m.head_dim
        else:
            total += 6 * m.out_proj.in_features * getattr(m.ssm, "d_state", 1)
    return int(total)


# ------------------------------------------------------------------------------------------------------ checkpoints
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_safe(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def checkpoint_paths(ckpt_dir: Path, step: int) -> tuple[Path, Path]:
    return ckpt_dir / f"step-{step:07d}.safetensors", ckpt_dir / f"step-{step:07d}.json"


def list_checkpoints(ckpt_dir: Path) -> list[int]:
    """Steps of the complete checkpoints (those whose JSON exists), ascending."""
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for p in ckpt_dir.glob("step-*.json"):
        match = _CKPT_NAME.fullmatch(p.name)
        if match and p.is_file():  # a stray directory or file named like a checkpoint is not one
            steps.append(int(match.group(1)))
    return sorted(steps)


def remove_checkpoint(ckpt_dir: Path, step: int) -> None:
    """Delete checkpoint ``step``: its JSON first (it commits the checkpoint), then the tensors; files only."""
    for p in reversed(checkpoint_paths(ckpt_dir, step)):
        if p.is_file() or p.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def clean_temporary_files(folder: Path) -> list[Path]:
    """Remove what killed atomic writes left in ``folder`` (``.<name>.<random>.tmp``); returns the removed paths."""
    removed = []
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            if p.is_file():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
    return removed


@contextlib.contextmanager
def run_lock(out: Path):
    """Hold ``<out>/.lock`` for the run: a second run in the same folder stops with an error instead of mixing its
    checkpoints with ours. The lock is released by the OS when the process dies (kill -9 included)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / ".lock"
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows: no advisory locks; one run per folder is then up to the user)
        yield
        return
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise ValueError(f"out_dir {out} is in use by another training run (pid {holder} holds {path}); wait "
                             "for it to finish or use another out_dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _body_digest(state: dict[str, Any]) -> str:
    body = {k: v for k, v in state.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state dicts, keyed by parameter name; a collective under FSDP (every
    rank must call it; rank 0 gets the tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(ckpt_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict[str, Any], write: bool = True) -> Path:
    """Write checkpoint ``step``: tensors to safetensors, then the JSON that commits it. ``model`` is the unwrapped
    module (sharded in place under FSDP); under distributed training every rank calls this, ``write`` on rank 0."""
    from safetensors.torch import save as st_save

    msd, osd = _full_state(model, optimizer)
    tpath, jpath = checkpoint_paths(ckpt_dir, step)
    if not write:
        return jpath
    tensors: dict[str, torch.Tensor] = {}
    for k, v in msd.items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous().clone()  # clone: tied weights are shared tensors
    for name, st in osd["state"].items():
        for k, v in st.items():
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"optimizer state {name}.{k} is not a tensor; cannot checkpoint it")
            tensors[f"optim.{name}.{k}"] = v.detach().cpu().contiguous().clone()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    tensors["rng.numpy.key"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py_state = random.getstate()
    state = {
        "format": CKPT_FORMAT, "version": CKPT_VERSION, "step": step,
        "optimizer": {"param_groups": _json_safe(osd["param_groups"]),
                      "state_keys": {name: sorted(st) for name, st in osd["state"].items()}},
        "rng": {"python": [py_state[0], list(py_state[1]), py_state[2]],
                "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]},
        **extra,
    }
    data = st_save(tensors, metadata={"format": "pt"})
    write_atomic(tpath, data)
    state["tensors"] = {"file": tpath.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state["sha256"] = _body_digest(state)  # an edited JSON is refused, not half-used
    write_atomic(jpath, (json.dumps(state) + "\n").encode())  # last: the commit
    return jpath


def load_checkpoint(ckpt_dir: Path, step: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON state, tensors) of a checkpoint, verified; ``ValueError`` naming the file if anything is wrong."""
    from safetensors.torch import load as st_load

    tpath, jpath = checkpoint_paths(ckpt_dir, step)
    try:
        state = loads_json(jpath.read_bytes(), jpath.name, "delete it")
        if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
            raise ValueError("not a structmat training checkpoint")
        if state.get("version") != CKPT_VERSION:
            raise ValueError(f"checkpoint version {state.get('version')!r}, this structmat reads {CKPT_VERSION} (written "
                             "by another structmat version)")
        if state.get("sha256") != _body_digest(state):
            raise ValueError("its content does not match its sha256 (edited or damaged)")
        _check_state_fields(state, step)
    except (OSError, ValueError) as err:
        raise ValueError(f"checkpoint {jpath} is corrupt or unreadable ({err}); delete it to resume from an earlier "
                         "one, or start over (resume=False)") from None
    try:
        data = tpath.read_bytes()
    except OSError as err:
        raise ValueError(f"checkpoint {jpath}: its tensor file {tpath} cannot be read ({err})") from None
    if len(data) != state["tensors"].get("bytes") or hashlib.sha256(data).hexdigest() != state["tensors"].get("sha256"):
        raise ValueError(f"checkpoint {tpath} is corrupt: its size/sha256 do not match {jpath.name} (a damaged or "
                         "replaced file); delete this checkpoint to resume from an earlier one, or start over")
    try:
        tensors = st_load(data)
    except Exception as err:
        raise ValueError(f"checkpoint {tpath} is corrupt: safetensors cannot read it ({err})") from None
    return state, tensors


_STATE_FIELDS = {"step": int, "tensors": dict, "optimizer": dict, "rng": dict, "data": dict, "wall_s": (int, float),
                 "history": list, "val_history": list, "config_key": str}


def _check_state_fields(state: dict[str, Any], step: int) -> None:
    for key, kind in _STATE_FIELDS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise ValueError(f"field {key!r} is missing or not a {getattr(kind, '__name__', 'number')}")
    if state["step"] != step:
        raise ValueError(f"it records step {state['step']} but is named step {step}")


def _restore(state: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module,
             optimizer: torch.optim.Optimizer) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(model_sd)), sorted(set(model_sd) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]} "
                         "(was the preset or plan changed?)")
    groups = state["optimizer"]["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    names: dict[int, set[str]] = {}  # a tied parameter has several names
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), set()).add(n)
    mine = [[names.get(id(p), set()) for p in g["params"]] for g in optimizer.param_groups]
    if len(mine) != len(groups) or any(len(a) != len(b["params"]) or any(n not in s for n, s in zip(b["params"], a))
                                       for a, b in zip(mine, groups)):
        raise ValueError("checkpoint optimizer groups do not fit this model's parameters (was the preset, plan, "
                         "optimizer or a method setting changed?)")
    # Under FSDP every rank scatters each tensor in dict order, so the order must be the model's on every rank.
    model_sd = {k: model_sd[k] for k in model.state_dict()}
    keys = state["optimizer"]["state_keys"]
    opt_state = {name: {k: tensors[f"optim.{name}.{k}"] for k in keys[name]}
                 for g in groups for name in g["params"] if name in keys}
    try:
        # not strict: a parameter may legitimately have no state yet (a dense weight created by a switch)
        set_state_dict(model, optimizer, model_state_dict=model_sd,
                       optim_state_dict={"state": opt_state, "param_groups": groups},
                       options=StateDictOptions(full_state_dict=True, strict=False))
    except (ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"checkpoint state does not fit this model/optimizer ({err})") from None
    # set_state_dict initializes missing state with a zero-gradient step; a parameter that had no state must not
    # have any now, or its first real update would use step 2's bias correction
    for g, saved in zip(optimizer.param_groups, groups):
        for p, name in zip(g["params"], saved["params"]):
            if name not in opt_state:
                optimizer.state.pop(p, None)
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    py = state["rng"]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, pos, has_gauss, cached = state["rng"]["numpy"]
    np.random.set_state((name, tensors["rng.numpy.key"].numpy().astype(np.uint32), pos, has_gauss, cached))


# ------------------------------------------------------------------------------------------------------------ train
def _evaluate(model: nn.Module, forward, val_stream, cfg: TrainConfig, device, autocast, world: int = 1) -> float:
    """Mean validation loss over ``eval_batches`` global batches (``batch_size * world`` sequences each, so the
    number does not depend on the world size); every process computes the same value."""
    from .data import validation_batches

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in validation_batches(val_stream, cfg.seq_len, cfg.batch_size * world, cfg.eval_batches):
            batch = batch.to(device)
            with autocast():
                out = forward(input_ids=batch, labels=batch)
            n = batch.numel() - batch.shape[0]
            total += float(out.loss) * n
            count += n
    model.train()
    return total / count


def train(config: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    """Train per ``config`` (a :class:`TrainConfig` or its dict), resuming from the latest checkpoint in
    ``<out_dir>/checkpoints`` when ``resume``; return the results dict (also written to ``<out_dir>/results.json``)."""
    cfg = TrainConfig.coerce(config)
    cfg.check_model()  # every spec against the real shapes, before the tokenizer and the data
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(old_threads)


def _train(cfg: TrainConfig) -> dict[str, Any]:
    from . import distributed

    info, device = distributed.setup(cfg.parallel, cfg.device)
    try:
        if info.active and info.mode == "fsdp" and (cfg.guide_steps or cfg.densify_step or cfg.optimizer == "galore"):
            raise ValueError("parallel=fsdp shards parameters, so it cannot swap modules mid-run (guide_steps, "
                             "densify_step) or take SVDs of whole gradients (optimizer=galore); use parallel=ddp")
        out = Path(cfg.out_dir).expanduser()
        with run_lock(out) if info.main else contextlib.nullcontext():
            if info.main:
                clean_temporary_files(out)
                clean_temporary_files(out / "checkpoints")
            return _run(cfg, info, device)
    finally:
        distributed.teardown(info)


def _run(cfg: TrainConfig, info, device: torch.device) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from ..data.corpus import corpus_from_spec, manifest, split_files
    from ..eval.results import run_info, write_json
    from ..io import save_pretrained
    from ..surgery import densify
    from . import distributed
    from .data import PackedBatches, cached_token_stream
    from .methods import apply_phase, detach_guides, guide_alpha, model_phase, rebuild_optimizer, set_guide_alpha
    from .models import count_params, structured_llama
    from .plots import plot_runs
    from .tokenizer import EOS, bpe_tokenizer, default_cache_root, tokenizer_sha

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peak_gpu_bytes is this run's, also when runs share a process

    out = Path(cfg.out_dir).expanduser()
    ckpt_dir = out / "checkpoints"
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_root()

    # --- data (rank 0 trains the tokenizer and fills the caches first; the others then read them)
    if not info.main:
        distributed.barrier(info)
    docs = corpus_from_spec(cfg.corpus)
    train_docs, val_docs = split_files(docs, cfg.val_fraction)
    if not train_docs or not val_docs:
        raise ValueError(f"corpus {cfg.corpus!r}: {len(docs)} documents split into {len(train_docs)} training and "
                         f"{len(val_docs)} validation files at val_fraction={cfg.val_fraction}; both must be non-empty")
    tok = bpe_tokenizer(train_docs, cfg.vocab_size, cache_dir=cache_root / "tokenizers")
    train_stream = cached_token_stream(train_docs, tok, cache_root / "streams")
    val_stream = cached_token_stream(val_docs, tok, cache_root / "streams")
    if info.main:
        distributed.barrier(info)
    # Every process walks the same order of global batches and takes its own slice of each.
    batches = PackedBatches(train_stream, cfg.seq_len, cfg.batch_size * info.world, seed=cfg.seed)
    rows = slice(info.rank * cfg.batch_size, (info.rank + 1) * cfg.batch_size)

    # --- model and optimizer, built identically on every (re)start in the form the run has at its step
    overrides = dict(cfg.model_overrides)
    overrides.setdefault("eos_token_id", tok.token_to_id(EOS))

    def build(at_step: int, on: torch.device) -> nn.Module:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        m = structured_llama(cfg.preset, tok.get_vocab_size(), cfg.build_plan(), seed=cfg.seed,
                             max_seq_len=cfg.seq_len, **overrides)
        cfg.add_mixer(m)
        apply_phase(m, model_phase(at_step, cfg.guide_steps, cfg.densify_step), m.config.initializer_range)
        return m.to(on)

    def make_optimizer(m: nn.Module) -> torch.optim.Optimizer:
        groups = param_groups(m, cfg.weight_decay)
        if cfg.optimizer == "galore":
            return GaLoreAdamW(without_embeddings(m, groups), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                               weight_decay=cfg.weight_decay, rank=cfg.galore_rank, update_proj_gap=cfg.galore_gap,
                               scale=cfg.galore_scale, residual=cfg.galore_residual)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)

    def make_forward(m: nn.Module) -> nn.Module:
        f = m if info.mode == "fsdp" else distributed.wrap(m, info, device)  # FSDP2 sharded ``m`` in place
        return torch.compile(f) if cfg.compile else f

    existing = list_checkpoints(ckpt_dir) if cfg.resume else []
    step = existing[-1] if existing else 0
    model = build(step, device)
    model.train()
    if info.active and info.mode == "fsdp":
        distributed.wrap(model, info, device)  # shards in place; the optimizer must see the sharded parameters
    optimizer = make_optimizer(model)
    forward = make_forward(model)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                else contextlib.nullcontext)
    flops_token = forward_flops_per_token(model, cfg.seq_len)
    tokens_step = cfg.batch_size * info.world * cfg.grad_accum * cfg.seq_len

    wall, flops, history, val_history, resumed_from = 0.0, 0.0, [], [], None
    if existing:
        state, tensors = load_checkpoint(ckpt_dir, step)
        if state.get("config_key") != _resume_key(cfg):
            raise ValueError(f"checkpoint {step} in {ckpt_dir} was written with different settings; use "
                             "another out_dir, or resume=False to start over")
        try:
            _restore(state, tensors, model, optimizer)
            batches.load_state_dict(state["data"])
            wall, history, val_history = float(state["wall_s"]), state["history"], state["val_history"]
            flops = float(history[-1]["flops"]) if history else 0.0
        except (KeyError, TypeError, IndexError, AttributeError) as err:
            raise ValueError(f"checkpoint {step} in {ckpt_dir} does not hold a usable state ({type(err).__name__}: "
                             f"{err}); delete it to resume from an earlier one, or start over (resume=False)") from None
        resumed_from = step
        if info.main:
            print(f"structmat train: resumed from step {step} ({checkpoint_paths(ckpt_dir, step)[1]})",
                  file=sys.stderr, flush=True)

    def checkpoint() -> None:
        save_checkpoint(ckpt_dir, step, model, optimizer, {
            "config_key": _resume_key(cfg), "config": cfg.to_dict(), "scheduler": {"step": step},
            "data": batches.state_dict(), "wall_s": wall, "history": history, "val_history": val_history,
            "world_size": info.world}, write=info.main)
        if info.main:
            for old in list_checkpoints(ckpt_dir)[:-cfg.keep_checkpoints]:
                remove_checkpoint(ckpt_dir, old)
        distributed.barrier(info)

    def validate() -> None:
        vl = _evaluate(model, forward, val_stream, cfg, device, autocast, info.world)
        val_history.append({"step": step, "tokens": step * tokens_step, "flops": flops, "loss": vl,
                            "ppl": math.exp(min(vl, 700.0)), "wall_s": wall})

    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress or not info.main, desc="train", unit="step")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr_f = lr_factor(step, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        set_lr(optimizer, cfg.lr, lr_f)
        alpha = guide_alpha(step, cfg.guide_steps)
        if cfg.guide_steps:
            set_guide_alpha(model, alpha)
        loss_sum = 0.0
        for _ in range(cfg.grad_accum):
            batch = batches.next()[rows].to(device, non_blocking=True)
            with autocast():
                loss = forward(input_ids=batch, labels=batch).loss / cfg.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
        loss_sum = distributed.mean(loss_sum, info, device)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"training loss is {loss_sum} at step {step + 1}: the run diverged; lower lr, "
                                     "raise warmup, or resume from an earlier checkpoint with other settings")
        grad_norm = None
        if cfg.grad_clip > 0:
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        wall += dt
        flops += 3 * flops_token * tokens_step
        step += 1
        row = {"step": step, "loss": loss_sum, "lr": cfg.lr * lr_f, "grad_norm": grad_norm,
               "tokens": step * tokens_step, "flops": flops, "wall_s": wall}
        if cfg.guide_steps:
            row["guide_alpha"] = alpha
        history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{tokens_step / max(dt, 1e-9):,.0f}")
        # Phase switches happen after the step that reaches them, before any checkpoint of that step.
        switched = False
        if cfg.guide_steps and step == cfg.guide_steps:
            switched = bool(detach_guides(model))
        if cfg.densify_step and step == cfg.densify_step:
            switched = bool(densify(model)) or switched
        if switched:
            optimizer = rebuild_optimizer(optimizer, lambda: make_optimizer(model))
            params = [p for g in optimizer.param_groups for p in g["params"]]
            forward = make_forward(model)
            flops_token = forward_flops_per_token(model, cfg.seq_len)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            validate()
        if cfg.ckpt_every and step % cfg.ckpt_every == 0:
            checkpoint()
        if cfg.throttle_s:
            time.sleep(cfg.throttle_s)
    bar.close()
    if not cfg.eval_every:
        validate()

    model_dir = out / "model"
    if info.active:  # gather full weights (a collective under FSDP), save from a plain copy on rank 0
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        final = None
        if info.main:
            final = build(step, torch.device("cpu"))
            final.load_state_dict(full)
    else:
        final = model
    structured = structured_modules(model)
    plan = cfg.build_plan()
    results = {
        "config": cfg.to_dict(),
        "run_info": run_info(cfg.to_dict(), seed=cfg.seed, device=device),
        "distributed": {"world_size": info.world, "mode": info.mode},
        "model": {"preset": cfg.preset, "params": count_params(final if final is not None else model),
                  "mixer": getattr(model.config, "structmat_mixer", None),
                  "vocab_size": tok.get_vocab_size(), "structured_layers": len(structured),
                  "structured_params": sum(m.param_count() for m in structured.values()),
                  "plan": None if plan is None else plan.to_dict(),
                  "forward_flops_per_token": flops_token, "dir": str(model_dir)},
        "data": {"train": manifest(train_docs, n_tokens=int(train_stream.numel())),
                 "validation": manifest(val_docs, n_tokens=int(val_stream.numel())),
                 "tokenizer_sha256": tokenizer_sha(tok), "position": batches.state_dict()},
        "resumed_from": resumed_from,
        "history": history,
        "validation": val_history,
        "final": {"step": step, "tokens": step * tokens_step, "flops": flops,
                  "wall_s": wall, "tokens_per_s": (history[-1]["tokens"] / wall) if history and wall else None,
                  "train_loss": history[-1]["loss"] if history else None,
                  "val_loss": val_history[-1]["loss"] if val_history else None,
                  "val_ppl": val_history[-1]["ppl"] if val_history else None,
                  "optimizer_state_bytes": optimizer_state_bytes(optimizer),
                  "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None},
    }
    if info.main and cfg.decode_prompt:
        from ..eval.speed import decode_tokens_per_s

        with autocast():
            results["final"]["decode"] = decode_tokens_per_s(final, cfg.decode_prompt, cfg.decode_tokens,
                                                             tok.get_vocab_size(), seed=cfg.seed)
    if info.main:
        save_pretrained(final, model_dir)
        write_atomic(model_dir / "tokenizer.json", tok.to_str().encode())
        write_json(out / "results.json", results)
        plot_runs({out.name: results}, out / "loss.png", title=f"structmat train: {cfg.preset}")
    distributed.barrier(info)
    return results


def _resume_key(cfg: TrainConfig) -> str:
    """What must not change between a run and its resumption (everything but the running/logging knobs)."""
    d = cfg.to_dict()
    for k in ("out_dir", "device", "compile", "threads", "eval_every", "eval_batches", "ckpt_every",
              "keep_checkpoints", "resume", "progress", "cache_dir", "throttle_s", "parallel"):
        d.pop(k)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
