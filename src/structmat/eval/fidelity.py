"""Encoder fidelity: how closely a compressed embedding model reproduces the original model's sentence embeddings.

Protocol (:func:`encoder_fidelity`), on held-out texts ``t_1..t_n`` (e.g. :func:`structmat.data.corpus.text_chunks`
of validation files):

1. Sentence embeddings are those of sentence-transformers all-MiniLM-L6-v2: the last hidden state, mean-pooled over
   the attention mask, L2-normalized, computed in float32 under ``inference_mode`` with the model in eval mode
   (``max_length`` tokens, truncation on).
2. ``cosine``: the mean over texts of cos(e_model(t_i), e_reference(t_i)) on the whole texts (also ``cosine_min``).
3. ``top1_agreement``: every text is cut into a *query* (its first half) and a *document* (its second half) at the
   line break nearest the middle character (a space if it is one line, the middle character if it has none). For
   each query, the document with the highest cosine among all ``n`` documents is retrieved, once with the reference
   embeddings and once with the model's; ``top1_agreement`` is the fraction of queries for which both retrieve the
   same document (ties go to the lowest index). ``top1_reference`` / ``top1_model`` report how often each retrieves
   the query's own second half, for context.

The reference side (the original model's three sets of embeddings) is computed once by :func:`fidelity_reference`
and reused for every compressed model; it can be saved to and loaded from a safetensors file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.corpus import minilm_tokenizer

__all__ = ["minilm_tokenizer", "sentence_embeddings", "split_query_document", "FidelityReference",
           "fidelity_reference", "encoder_fidelity"]


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


class _EvalMode:
    """Put a module in eval mode for the duration, then restore every submodule's own training flag."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag
        return False


def _last_hidden_state(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0]
    return hidden


def sentence_embeddings(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32,
                        max_length: int = 128, device=None) -> torch.Tensor:
    """``(len(texts), hidden)`` float32 embeddings on the CPU: mean pooling of the last hidden state over the
    attention mask, then L2 normalization (as sentence-transformers all-MiniLM-L6-v2). Texts are batched in order
    of token length (less padding), results returned in input order. A non-finite embedding raises ``ValueError``
    naming the batch; nothing is skipped."""
    texts = list(texts)
    if not texts:
        raise ValueError("sentence_embeddings: no texts")
    if any(not isinstance(t, str) for t in texts):
        raise TypeError("sentence_embeddings: texts must be strings")
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"need batch_size >= 1 and max_length >= 2, got {batch_size}, {max_length}")
    device = torch.device(device) if device is not None else _model_device(model)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    out: torch.Tensor | None = None
    with _EvalMode(model):
        for b, start in enumerate(range(0, len(texts), batch_size)):
            idx = order[start:start + batch_size]
            with torch.inference_mode():
                enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt")
                enc = {k: v.to(device) for k, v in enc.items()}
                hidden = _last_hidden_state(model(**enc)).float()
                mask = enc["attention_mask"].to(hidden.dtype).unsqueeze(-1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
                emb = F.normalize(pooled, p=2, dim=1).cpu()
            bad = ~torch.isfinite(emb).all(dim=1)
            if bad.any():
                first = idx[int(bad.nonzero()[0])]
                raise ValueError(f"non-finite sentence embedding in batch {b} (texts {sorted(idx)[:8]}"
                                 f"{'...' if len(idx) > 8 else ''}; first bad text #{first}: {texts[first][:60]!r})")
            if out is None:  # a normal tensor (not an inference tensor), so callers may use it anywhere
                out = torch.empty(len(texts), emb.shape[1], dtype=torch.float32)
            out[torch.tensor(idx)] = emb
    return out


def split_query_document(text: str) -> tuple[str, str]:
    """Cut a text into (first half, second half) at the line break nearest its middle character; a one-line text
    at the space nearest the middle; a text without either at the middle character. Both halves are stripped."""
    text = text.strip()
    if len(text) < 2:
        raise ValueError(f"text too short to split into a query and a document: {text!r}")
    mid = len(text) / 2
    for sep in ("\n", " "):
        cuts = [i for i, c in enumerate(text) if c == sep and text[:i].strip() and text[i + 1:].strip()]
        if cuts:
            cut = min(cuts, key=lambda i: (abs(i - mid), i))
            return text[:cut].strip(), text[cut + 1:].strip()
    cut = len(text) // 2
    return text[:cut], text[cut:]


def _texts_sha256(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=True).encode()).hexdigest()


@dataclass
class FidelityReference:
    """The original model's embeddings of the texts (``full``), of their first halves (``query``) and of their
    second halves (``document``), with the settings they were computed with."""

    texts: list[str]
    full: torch.Tensor
    query: torch.Tensor
    document: torch.Tensor
    max_length: int = 128

    def __post_init__(self):
        n = len(self.texts)
        for name in ("full", "query", "document"):
            t = getattr(self, name)
            if t.ndim != 2 or t.shape[0] != n:
                raise ValueError(f"FidelityReference.{name} has shape {tuple(t.shape)}, expected ({n}, hidden)")

    @property
    def texts_sha256(self) -> str:
        return _texts_sha256(self.texts)

    def save(self, path) -> Path:
        """One safetensors file: the three embedding matrices, the texts and settings in its metadata."""
        from safetensors.torch import save_file

        from .results import write_atomic

        path = Path(path)
        meta = {"format": "structmat.fidelity_reference", "version": "1", "texts": json.dumps(self.texts),
                "max_length": str(self.max_length), "texts_sha256": self.texts_sha256}
        tmp = path.with_name(f".{path.name}.partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"full": self.full.contiguous(), "query": self.query.contiguous(),
                   "document": self.document.contiguous()}, str(tmp), metadata=meta)
        try:
            write_atomic(path, tmp.read_bytes())
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path) -> "FidelityReference":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "structmat.fidelity_reference" or meta.get("version") != "1":
                raise ValueError(f"{path} is not a structmat fidelity reference (version 1): metadata {meta.keys()}")
            tensors = {k: f.get_tensor(k) for k in ("full", "query", "document")}
        ref = cls(json.loads(meta["texts"]), max_length=int(meta["max_length"]), **tensors)
        if ref.texts_sha256 != meta["texts_sha256"]:
            raise ValueError(f"{path}: the stored texts do not match their recorded hash (corrupt file)")
        return ref


def fidelity_reference(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32,
                       max_length: int = 128, device=None) -> FidelityReference:
    """The reference side of :func:`encoder_fidelity`, computed once with the original model."""
    texts = list(texts)
    if len(set(texts)) != len(texts):
        raise ValueError("fidelity texts must be distinct (top-1 retrieval is ambiguous otherwise)")
    queries, documents = zip(*(split_query_document(t) for t in texts))
    kw = dict(batch_size=batch_size, max_length=max_length, device=device)
    return FidelityReference(texts, sentence_embeddings(model, tokenizer, texts, **kw),
                             sentence_embeddings(model, tokenizer, list(queries), **kw),
                             sentence_embeddings(model, tokenizer, list(documents), **kw), max_length)


def encoder_fidelity(reference: FidelityReference, model: nn.Module, tokenizer, texts: Sequence[str] | None = None,
                     batch_size: int = 32, device=None) -> dict:
    """Fidelity of ``model`` to the reference (see the module docstring for the protocol). ``texts``, if given, must
    be the reference's texts (a check against mixing up references). Returns ``cosine``, ``cosine_min``,
    ``top1_agreement``, ``top1_reference``, ``top1_model`` and ``n_texts``."""
    if not isinstance(reference, FidelityReference):
        raise TypeError("encoder_fidelity needs a FidelityReference from fidelity_reference(original_model, "
                        f"tokenizer, texts) (it holds query/document embeddings too), got {type(reference).__name__}")
    if texts is not None and list(texts) != reference.texts:
        raise ValueError("the texts differ from those the reference was computed on")
    mine = fidelity_reference(model, tokenizer, reference.texts, batch_size=batch_size,
                              max_length=reference.max_length, device=device)
    if mine.full.shape != reference.full.shape:
        raise ValueError(f"embedding sizes differ: model {tuple(mine.full.shape)}, "
                         f"reference {tuple(reference.full.shape)}")
    cos = (mine.full.double() * reference.full.double()).sum(1)
    ref_pick = (reference.query @ reference.document.T).argmax(1)
    my_pick = (mine.query @ mine.document.T).argmax(1)
    own = torch.arange(len(reference.texts))
    return {
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "top1_agreement": float((ref_pick == my_pick).double().mean()),
        "top1_reference": float((ref_pick == own).double().mean()),
        "top1_model": float((my_pick == own).double().mean()),
        "n_texts": len(reference.texts),
    }
