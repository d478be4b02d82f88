"""Packed training batches with an explicit, saveable position, and the validation batches.

The token stream of the training files (:func:`structmat.data.corpus.token_stream`: each document then EOS) is cut
into ``len // seq_len`` non-overlapping sequences. Epoch ``e`` visits them in the order ``randperm(n)`` drawn from a
generator seeded with ``(seed, e)``; a batch takes the next ``batch_size`` sequences and a partial batch at an epoch's
end is dropped. The position is ``(epoch, index)``: :meth:`PackedBatches.state_dict` saves it and
:meth:`PackedBatches.load_state_dict` restores it, so a resumed run sees exactly the batches an uninterrupted one would.
Token streams are cached (safetensors) keyed by the tokenizer and corpus hashes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from ..atomic import write_atomic
from ..data.corpus import _documents, manifest, token_stream


def cached_token_stream(docs, tokenizer, cache_dir: str | os.PathLike | None) -> Tensor:
    """:func:`token_stream` of ``docs``, cached under ``cache_dir`` (None: no cache)."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    docs = _documents(docs)
    if cache_dir is None:
        return token_stream(docs, tokenizer)
    key = hashlib.sha256((manifest(docs)["sha256"] + "\0" + tokenizer.to_str()).encode()).hexdigest()[:24]
    path = Path(cache_dir).expanduser() / f"stream-{key}.safetensors"
    if path.is_file():
        try:
            return st_load(path.read_bytes())["ids"]
        except Exception:  # damaged cache entry: recompute
            pass
    ids = token_stream(docs, tokenizer)
    write_atomic(path, st_save({"ids": ids.contiguous()}))
    return ids


class PackedBatches:
    """Deterministic batches ``(batch_size, seq_len)`` of packed training sequences with a saveable position."""

    def __init__(self, stream: Tensor, seq_len: int, batch_size: int, seed: int = 0) -> None:
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
        n = int(stream.numel()) // seq_len
        if n < batch_size:
            raise ValueError(f"the training stream has {stream.numel()} tokens = {n} sequences of {seq_len}, fewer "
                             f"than one batch of {batch_size}; use more data or a smaller seq_len/batch_size")
        self.seqs = stream[: n * seq_len].view(n, seq_len)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, int(seed)
        self.epoch, self.index = 0, 0
        self._order: Tensor | None = None

    @property
    def num_sequences(self) -> int:
        return self.seqs.shape[0]

    def _epoch_order(self) -> Tensor:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.num_sequences, generator=g)
        return self._order

    def next(self) -> Tensor:
        if self.index + self.batch_size > self.num_sequences:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        idx = self._epoch_order()[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return self.seqs[idx]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "num_sequences": self.num_sequences}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seed", "seq_len", "batch_size", "num_sequences"):
            if state.get(key) != mine[key]:
                raise ValueError(f"the checkpoint's data position was saved for {key}={state.get(key)!r}, but this "
                                 f"run has {key}={mine[key]!r}: the data or batch settings changed, so it cannot "
                                 "resume exactly")
        epoch, index = state.get("epoch"), state.get("index")
        for key, value in (("epoch", epoch), ("index", index)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"the checkpoint's data position has {key}={value!r}, not an int >= 0; the checkpoint "
                                 "is corrupt")
        if index > self.num_sequences:
            raise ValueError(f"the checkpoint's data position index={index} lies beyond the {self.num_sequences} "
                             "sequences of an epoch; the checkpoint is corrupt")
        self.epoch, self.index, self._order = epoch, index, None


def validation_batches(stream: Tensor, seq_len: int, batch_size: int, max_batches: int | None) -> Iterator[Tensor]:
    """The validation sequences in order (always the same), ``batch_size`` at a time, at most ``max_batches``."""
    n = int(stream.numel()) // seq_len
    if n == 0:
        raise ValueError(f"the validation stream has {stream.numel()} tokens, less than one sequence of {seq_len}")
    seqs = stream[: n * seq_len].view(n, seq_len)
    for b, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        yield seqs[start:start + batch_size]
