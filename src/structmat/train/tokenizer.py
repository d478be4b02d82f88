"""A byte-level BPE tokenizer trained locally (``tokenizers``) on a corpus, cached on disk.

The cache file is ``<cache_dir>/bpe-<key>.json`` where ``key = sha256({corpus manifest sha256, vocab_size, format})``,
so the same corpus and size always give the same file, and any change to the corpus gives a new one. Files are written
atomically; a cache file that cannot be read is retrained and replaced. The default cache dir is
``~/.cache/structmat/tokenizers`` (override with ``cache_dir=`` or ``$STRUCTMAT_CACHE``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from ..atomic import write_atomic
from ..data.corpus import _documents, manifest

EOS = "<|endoftext|>"
_FORMAT = "structmat-bpe-1"


def default_cache_root() -> Path:
    return Path(os.environ.get("STRUCTMAT_CACHE", Path.home() / ".cache" / "structmat")).expanduser()


def default_cache_dir() -> Path:
    return default_cache_root() / "tokenizers"


def tokenizer_key(corpus_sha: str, vocab_size: int) -> str:
    payload = json.dumps({"format": _FORMAT, "corpus_sha256": corpus_sha, "vocab_size": int(vocab_size)},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _train(docs: list, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((d.read_text() for d in docs), trainer=trainer, length=len(docs))
    return tok


def bpe_tokenizer(docs: Iterable, vocab_size: int, cache_dir: str | os.PathLike | None = None):
    """The byte-level BPE ``tokenizers.Tokenizer`` of ``vocab_size`` trained on ``docs`` (cached)."""
    from tokenizers import Tokenizer

    if not isinstance(vocab_size, int) or vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be an int >= 258 (256 bytes + {EOS} + merges), got {vocab_size!r}")
    docs = _documents(docs)
    if not docs:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    sha = manifest(docs)["sha256"]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache / f"bpe-{tokenizer_key(sha, vocab_size)}.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:  # a damaged cache entry: retrain and replace it
            pass
    tok = _train(docs, vocab_size)
    write_atomic(path, tok.to_str().encode())
    return tok


def tokenizer_sha(tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
