"""Causal-LM perplexity over non-overlapping windows.

Protocol (:func:`perplexity`), the one used for WikiText-2 in the GPTQ / SparseGPT / SVD-LLM line of work:

* the evaluation text is one token stream; it is cut into ``len // window`` non-overlapping windows of exactly
  ``window`` tokens; the last partial window is dropped (its size is reported as ``dropped_tokens``);
* each window is run on its own (no context carried over); inside it, tokens 2..window are predicted from their
  prefixes, so every window contributes exactly ``window - 1`` predicted tokens;
* the loss is the mean next-token negative log-likelihood over all predicted tokens, computed in float32 (logits
  upcast before the log-softmax) and accumulated in float64; ``ppl = exp(nll)``.

Any non-finite per-window loss is a ``ValueError`` naming the window; no window is ever skipped.

Offline, the token stream is the held-out part of the standard-library corpus
(``token_stream(validation_files(corpus_files()), tokenizer)``); :func:`wikitext2_tokens` gives the standard
WikiText-2 stream when the user asks for it (``datasets`` and a network needed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.corpus import hub_documents

__all__ = ["perplexity", "wikitext2_tokens"]


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    return out[0] if logits is None else logits


def perplexity(model: nn.Module, tokens: torch.Tensor, window: int = 1024, batch_size: int = 8, device=None,
               progress: bool = False) -> dict:
    """Perplexity of a causal LM (anything called as ``model(input_ids=...)`` returning logits ``(b, t, vocab)``
    or an object/tuple holding them: HF ``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...) on a 1-D token stream.

    Returns ``ppl``, ``nll`` (mean per predicted token, nats), ``tokens`` (predicted tokens:
    ``windows * (window - 1)``), ``windows``, ``window``, ``dropped_tokens`` and ``stream_tokens``. The model runs in
    eval mode under ``inference_mode`` (its training flags are restored afterwards)."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D tensor, got {type(tokens).__name__} "
                         f"{tuple(getattr(tokens, 'shape', ()))}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if window < 2:
        raise ValueError(f"window must be >= 2 (one context token and one predicted token), got {window}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_windows = tokens.numel() // window
    if n_windows == 0:
        raise ValueError(f"{tokens.numel()} tokens do not fill one window of {window}")
    if tokens.numel() and int(tokens.min()) < 0:
        raise ValueError("tokens contain negative ids")
    device = torch.device(device) if device is not None else _model_device(model)
    windows = tokens[: n_windows * window].to(torch.long).view(n_windows, window)
    kwargs = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}

    starts = range(0, n_windows, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="perplexity", unit="batch")
    total = 0.0
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for start in starts:
            batch = windows[start:start + batch_size].to(device)
            with torch.inference_mode():
                logits = _logits(model(input_ids=batch, **kwargs))
                if logits.shape[:2] != batch.shape:
                    raise ValueError(f"model returned logits of shape {tuple(logits.shape)} for input "
                                     f"{tuple(batch.shape)}")
                # One window at a time keeps the float32 copy of the logits at (window, vocab).
                sums = torch.stack([
                    F.cross_entropy(logits[i, :-1].float(), batch[i, 1:], reduction="sum").double()
                    for i in range(batch.shape[0])
                ]).cpu()
            bad = ~torch.isfinite(sums)
            if bad.any():
                w = start + int(bad.nonzero()[0])
                raise ValueError(f"non-finite loss in window {w} of {n_windows} (tokens {w * window}:"
                                 f"{(w + 1) * window}): {float(sums[int(bad.nonzero()[0])])}")
            total += float(sums.sum())
    finally:
        for m, flag in flags:
            m.training = flag
    predicted = n_windows * (window - 1)
    nll = total / predicted
    return {"ppl": math.exp(nll), "nll": nll, "tokens": predicted, "windows": n_windows, "window": window,
            "dropped_tokens": int(tokens.numel() - n_windows * window), "stream_tokens": int(tokens.numel())}


def wikitext2_tokens(tokenizer, split: str = "test") -> torch.Tensor:
    """The WikiText-2 (raw) ``split`` as one token stream, the standard way (as the GPTQ evaluation scripts): all
    records joined with ``"\\n\\n"`` and encoded as one text, with the tokenizer's own special tokens (e.g. one
    BOS for Llama), never truncated. Only when the user asks: needs ``datasets`` and a network."""
    docs = hub_documents("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)
    text = "\n\n".join(d.text for d in docs)
    if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "token_to_id"):  # a bare tokenizers.Tokenizer
        tokenizer = type(tokenizer).from_str(tokenizer.to_str())
        tokenizer.no_truncation()
        tokenizer.no_padding()
        ids = tokenizer.encode(text).ids
    else:
        ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)
