"""Loading a model to compress and making its calibration batches.

``minilm`` (the default) is the packaged all-MiniLM-L6-v2; ``smollm2`` the packaged SmolLM2-135M-Instruct (converted
once from its GGUF into a cached HF directory, :mod:`structmat.data.smollm2`); a local directory is read with
transformers; any
other name is a hub id and is fetched only because the user named it. A directory written by structmat's
``save_pretrained`` is rebuilt with ``structmat.io.load_pretrained`` by the caller, not here (data/ comes before io).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .corpus import minilm_tokenizer, text_chunks, token_stream
from .pretrained import load_minilm, minilm_dir


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Any
    kind: str  # "encoder" | "causal"
    source: str


def is_causal(model: nn.Module) -> bool:
    archs = getattr(getattr(model, "config", None), "architectures", None) or [type(model).__name__]
    return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)


def load_model(name: str = "minilm", dtype: torch.dtype | None = None) -> Loaded:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if name == "minilm":
        return Loaded(load_minilm(), minilm_tokenizer(), "encoder", str(minilm_dir()))
    if name == "smollm2":
        from .smollm2 import smollm2_dir

        name = str(smollm2_dir())
    local = Path(name).is_dir()
    if not local and (Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1
                      or Path(name).exists()):
        # Not a hub id (namespace/name): a local path that is missing or not a folder.
        raise ValueError(f"model {name!r}: no such model folder; give an existing local folder, an HF hub id "
                         "(namespace/name), or 'minilm'")
    kwargs: dict[str, Any] = {"local_files_only": True} if local else {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    config = AutoConfig.from_pretrained(name, **({"local_files_only": True} if local else {}))
    archs = config.architectures or []
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(name, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(name, **({"local_files_only": True} if local else {}))
    return Loaded(model, tokenizer, "causal" if causal else "encoder", name)


def encoder_batches(tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 128) -> list[dict]:
    """Padded, truncated batches of texts (with attention masks) for an encoder."""
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append({k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return out


def causal_batches(tokens: torch.Tensor, n_samples: int, seq_len: int, batch_size: int = 4) -> list[dict]:
    """``n_samples`` consecutive non-overlapping windows of ``seq_len`` tokens from a token stream."""
    needed = n_samples * seq_len
    if tokens.numel() < needed:
        raise ValueError(f"the calibration stream has {tokens.numel()} tokens, fewer than {n_samples} x {seq_len}; "
                         "lower --calib-samples or --seq-len")
    windows = tokens[:needed].view(n_samples, seq_len)
    return [{"input_ids": windows[i:i + batch_size]} for i in range(0, n_samples, batch_size)]


def calibration_batches(loaded: Loaded, train_docs, n_samples: int, seq_len: int = 128, batch_size: int = 32):
    if loaded.kind == "encoder":
        return encoder_batches(loaded.tokenizer, text_chunks(train_docs, n_samples), batch_size, seq_len)
    needed, docs, take = n_samples * seq_len, list(train_docs), 64
    while True:  # tokenize only as many files as the calibration needs
        tokens = token_stream(docs[:take], loaded.tokenizer)
        if tokens.numel() >= needed or take >= len(docs):
            break
        take *= 2
    return causal_batches(tokens, n_samples, seq_len, max(1, batch_size // 8))
