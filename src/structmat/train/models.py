"""LLaMA-style causal LMs (HF ``LlamaForCausalLM``: RMSNorm, SwiGLU, rotary) built from a preset, structured at init.

Presets (tied input/output embeddings; the parameter counts are computed by :func:`count_params` on the built model
with ``vocab_size=16384``, the default of ``structmat train``; the embedding is ``vocab_size * hidden`` of it):

=======  ======  ======  =====  =====  ==========  ============  ================
preset   hidden  layers  heads  kv     ffn (SwiGLU) total params  non-embedding
=======  ======  ======  =====  =====  ==========  ============  ================
5m       192     4       4      4      512         4,916,928     1,771,200
20m      384     8       6      6      1024        20,453,760    14,162,304
60m      512     16      8      8      1408        59,785,728    51,397,120
125m     768     12      12     12     3072        125,848,320   113,265,408
=======  ======  ======  =====  =====  ==========  ============  ================

:func:`structured_llama` builds the dense model, then replaces every linear layer a :class:`~structmat.surgery.Plan`
matches by a FRESH structured layer (``structmat.build``: muP-style per-factor init, bias zero) -- never by a
projection of the random dense weight, which would be a poor, expensive and differently-scaled start.

:func:`mixer_llama` then puts a structmat sequence mixer (DeltaNet, Gated DeltaNet, DeltaProduct, diagonal SSM) in
place of attention in every layer, or in all but every K-th layer (a hybrid); ``structmat train --mixer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..structures import build as _build
from ..structures.base import StructuredLinear
from ..modules import dense_weight, linear_modules, locations as _locations
from ..plan import DATA_FREE, Plan

DEFAULT_VOCAB = 16384


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


PRESETS: dict[str, Preset] = {
    "5m": Preset(192, 4, 4, 4, 512),
    "20m": Preset(384, 8, 6, 6, 1024),
    "60m": Preset(512, 16, 8, 8, 1408),
    "125m": Preset(768, 12, 12, 12, 3072),
}

MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")


def llama_config(preset: str, vocab_size: int = DEFAULT_VOCAB, max_seq_len: int = 1024, **overrides: Any):
    """A ``LlamaConfig`` for ``preset`` (see the table above); ``overrides`` replace any config field."""
    from transformers import LlamaConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {', '.join(PRESETS)}")
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    p = PRESETS[preset]
    values: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers, num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads, max_position_embeddings=max_seq_len, hidden_act="silu",
        rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        initializer_range=0.02, bos_token_id=None, eos_token_id=0, pad_token_id=None, use_cache=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def make_plan(mlp: Any = None, attn: Any = None) -> Plan:
    """The common plans: ``mlp`` structures gate/up/down projections, ``attn`` the q/k/v/o projections (a spec string
    such as ``"lowrank:ratio=0.5"``, a config, or None to keep them dense); every other layer stays dense."""
    entries: list[tuple[Any, Any]] = []
    if mlp is not None:
        entries.append((list(MLP_NAMES), mlp))
    if attn is not None:
        entries.append((list(ATTN_NAMES), attn))
    return Plan(entries)


def structure_fresh(model: nn.Module, plan: Plan | Any) -> dict[str, StructuredLinear]:
    """Replace, in place, every linear layer ``plan`` matches by a freshly initialized structured layer of the same
    shape, bias and device/dtype; return {name: new layer}. All layers are built before the first swap, so an error
    (e.g. a size that does not divide) leaves the model unchanged. Only data-free targets make sense here."""
    plan = Plan.coerce(plan)
    built: list[tuple[str, nn.Module, StructuredLinear]] = []
    for name, module in linear_modules(model).items():
        target = plan.match(name)
        if target is None:
            continue
        if target.method != DATA_FREE:
            raise ValueError(f"module {name!r}: a fresh init has no dense weight to fit, so method {target.method!r} "
                             "does not apply; use a data-free target")
        weight = dense_weight(module)
        out_f, in_f = weight.shape
        try:
            layer = _build(target.spec, in_f, out_f, bias=getattr(module, "bias", None) is not None,
                           device=weight.device, dtype=weight.dtype)
        except (ValueError, TypeError) as err:
            raise ValueError(f"module {name!r} (in_features={in_f}, out_features={out_f}) cannot take "
                             f"{target.spec_text}: {err}. The model was not changed.") from err
        layer.train(module.training)
        built.append((name, module, layer))
    if not built:
        return {}
    where = _locations(model)
    for name, module, layer in built:
        holders = where.get(id(module), [])
        if any(p is getattr(model, "lm_head", None) for p, _ in holders) or name.endswith("lm_head"):
            # A structured head cannot share the embedding matrix.
            if getattr(model.config, "tie_word_embeddings", False):
                model.config.tie_word_embeddings = False
        for parent, key in holders:
            setattr(parent, key, layer)
    return {name: layer for name, _, layer in built}


def structured_llama(preset: str, vocab_size: int = DEFAULT_VOCAB, plan: Plan | Any = None, *, seed: int = 0,
                     max_seq_len: int = 1024, **overrides: Any):
    """A ``LlamaForCausalLM`` of ``preset`` with the layers ``plan`` matches structured at init (fresh muP init).
    The dense parts use HF's init; everything is seeded by ``seed``. Save with ``structmat.save_pretrained``."""
    from transformers import LlamaForCausalLM

    config = llama_config(preset, vocab_size, max_seq_len, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        if plan is not None:
            structure_fresh(model, plan)
    return model


def count_params(model: nn.Module) -> int:
    """Distinct learnable numbers (tied tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


_MIXER_KEYS = {"n_h": "n_householder", "heads": "n_heads", "chunk": "chunk_size", "d_state": "d_state",
               "conv": "conv_size"}


def parse_mixer(spec: str) -> tuple[str, dict[str, int]]:
    """``"deltaproduct:n_h=2"`` -> ``("deltaproduct", {"n_householder": 2})``. Names: deltanet, gated_deltanet,
    deltaproduct (n_h >= 2, default 2), ssm; keys: n_h, heads, chunk, d_state (ssm), conv (short-conv width)."""
    from ..mixers.hf import MIXERS

    name, _, rest = str(spec).partition(":")
    if name not in MIXERS:
        raise ValueError(f"mixer {spec!r}: unknown name {name!r}; choose from {', '.join(sorted(MIXERS))} "
                         "(e.g. deltaproduct:n_h=2)")
    kwargs: dict[str, int] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in _MIXER_KEYS or not value.isdigit() or int(value) < 1:
            raise ValueError(f"mixer {spec!r}: write name:key=int,... with keys {', '.join(_MIXER_KEYS)}; "
                             f"could not read {item!r}")
        kwargs[_MIXER_KEYS[key]] = int(value)
    if name == "deltaproduct":
        kwargs.setdefault("n_householder", 2)
        if kwargs["n_householder"] < 2:
            raise ValueError(f"mixer {spec!r}: a DeltaProduct has n_h >= 2 (n_h=1 is deltanet)")
    elif "n_householder" in kwargs:
        raise ValueError(f"mixer {spec!r}: n_h applies to deltaproduct only")
    if name == "ssm" and {"n_heads", "chunk_size"} & set(kwargs):
        raise ValueError(f"mixer {spec!r}: the diagonal SSM has no heads or chunks")
    if name != "ssm" and "d_state" in kwargs:
        raise ValueError(f"mixer {spec!r}: d_state applies to ssm only")
    return name, kwargs


def mixer_llama(model: nn.Module, spec: str, neg_eigval: bool = False, attn_every: int = 0,
                backend: str = "auto") -> nn.Module:
    """In place: a mixer (``spec`` as in :func:`parse_mixer`) replaces attention in every layer, or, with
    ``attn_every=K``, in all but layers K-1, 2K-1, ... (a hybrid). Recorded in the config (save/load rebuild it)."""
    from ..mixers.hf import hybrid_layers, replace_attention

    name, kwargs = parse_mixer(spec)
    if name != "ssm":
        kwargs["backend"] = backend
    n = model.config.num_hidden_layers
    layers = hybrid_layers(n, attn_every) if attn_every else None
    return replace_attention(model, name, layers=layers, allow_neg_eigval=bool(neg_eigval), **kwargs)
