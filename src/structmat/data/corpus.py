"""Corpora, offline first.

The default corpus is the Python standard library's own source (every ``*.py`` file under
``sysconfig.get_paths()["stdlib"]``, ``site-packages`` excluded): real text nobody here wrote, present on every
machine with Python. Extra roots (every installed ``site-packages``, or any local directory of text files with
given suffixes) can be added. A Hugging Face hub dataset is used only when the user names one; that needs the
``datasets`` package and a network connection, and nothing else in this module touches the network.

Vocabulary:

* a *document* is a :class:`CorpusFile` (a file under a named root) or a :class:`TextDocument` (a record of a hub
  dataset); both have a machine-independent ``key`` (``"<root name>/<relative posix path>"``), ``read_bytes()`` and
  ``read_text()``;
* :func:`split_files` holds documents out for validation by hashing their key, so the split is identical on every
  machine and does not depend on which other files exist;
* :func:`manifest` records what a result was measured on (file count, bytes, content hash, roots, token count),
  since the standard library differs between Python versions and machines.

Text is decoded as UTF-8 with ``errors="replace"``: the standard library holds a few deliberately mis-encoded test
files, and a deterministic replacement is better than dropping or crashing on them.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol, Sequence, Union

import numpy as np
import torch

__all__ = [
    "CorpusRoot", "CorpusFile", "TextDocument", "stdlib_root", "site_packages_roots", "list_root", "corpus_files",
    "corpus_from_spec", "hub_documents", "is_validation", "split_files", "train_files", "validation_files",
    "manifest", "text_chunks", "token_stream", "encode_texts", "separator_id", "minilm_tokenizer",
]

DEFAULT_SUFFIXES: tuple[str, ...] = (".py",)
# Directories never entered while listing a root: installed third-party code inside the stdlib tree, and caches.
DEFAULT_EXCLUDE_DIRS: tuple[str, ...] = ("site-packages", "dist-packages", "__pycache__")
DEFAULT_VAL_FRACTION = 0.1


class Document(Protocol):
    key: str
    origin: str

    def read_bytes(self) -> bytes: ...

    def read_text(self) -> str: ...


# ----------------------------------------------------------------------------------------------------------- roots
@dataclass(frozen=True)
class CorpusRoot:
    """A directory of text files. ``name`` prefixes every key, so it must be stable across machines (it is, unlike
    the absolute path, part of the split hash and the manifest hash)."""

    path: Path
    name: str
    suffixes: tuple[str, ...] = DEFAULT_SUFFIXES
    exclude_dirs: tuple[str, ...] = DEFAULT_EXCLUDE_DIRS

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "suffixes", tuple(self.suffixes))
        object.__setattr__(self, "exclude_dirs", tuple(self.exclude_dirs))
        if not self.name or "/" in self.name:
            raise ValueError(f"corpus root name must be non-empty and contain no '/': {self.name!r}")
        if not self.suffixes or any(not s for s in self.suffixes):
            raise ValueError(f"corpus root {self.name!r}: give at least one non-empty file suffix, got {self.suffixes}")


def stdlib_root(suffixes: Sequence[str] = DEFAULT_SUFFIXES) -> CorpusRoot:
    """The running interpreter's standard library (``site-packages`` inside it is excluded)."""
    return CorpusRoot(Path(sysconfig.get_paths()["stdlib"]), "stdlib", tuple(suffixes))


def site_packages_roots(suffixes: Sequence[str] = DEFAULT_SUFFIXES) -> list[CorpusRoot]:
    """Every distinct existing site-packages directory of this interpreter (purelib, then platlib)."""
    paths = sysconfig.get_paths()
    roots: list[CorpusRoot] = []
    seen: set[str] = set()
    for key in ("purelib", "platlib"):
        p = Path(paths[key])
        real = os.path.realpath(p)
        if p.is_dir() and real not in seen:
            seen.add(real)
            name = "site-packages" if not roots else f"site-packages-{len(roots)}"
            roots.append(CorpusRoot(p, name, tuple(suffixes), exclude_dirs=("__pycache__",)))
    return roots


# ------------------------------------------------------------------------------------------------------- documents
@dataclass(frozen=True)
class CorpusFile:
    """One file of a corpus root: ``key = "<root name>/<relative posix path>"`` is the same on every machine."""

    root: str
    rel: str
    path: Path = field(compare=False)
    origin: str = field(default="", compare=False)

    @property
    def key(self) -> str:
        return f"{self.root}/{self.rel}"

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8", errors="replace")


@dataclass(frozen=True)
class TextDocument:
    """A text that is not a file (a record of a hub dataset)."""

    key: str
    text: str = field(compare=False)
    origin: str = field(default="", compare=False)

    def read_bytes(self) -> bytes:
        return self.text.encode("utf-8")

    def read_text(self) -> str:
        return self.text


def _as_document(doc) -> Document:
    if isinstance(doc, (CorpusFile, TextDocument)):
        return doc
    if isinstance(doc, (str, os.PathLike)):
        p = Path(doc)
        return CorpusFile(root=p.parent.name or "_", rel=p.name, path=p, origin=str(p.parent))
    if hasattr(doc, "key") and hasattr(doc, "read_text") and hasattr(doc, "read_bytes"):
        return doc
    raise TypeError(f"expected a CorpusFile, TextDocument or path, got {type(doc).__name__}")


def _documents(docs: Iterable) -> list[Document]:
    out = [_as_document(d) for d in docs]
    keys = [d.key for d in out]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ValueError(f"documents with the same key {dup}: give the roots distinct names")
    return out


# --------------------------------------------------------------------------------------------------------- listing
def list_root(root: CorpusRoot) -> list[CorpusFile]:
    """Files under ``root`` whose name ends with one of its suffixes, sorted by relative path. Symbolic links to
    directories are not followed; directories named in ``exclude_dirs`` are not entered."""
    if not root.path.is_dir():
        raise FileNotFoundError(f"corpus root {root.name!r}: {root.path} is not a directory")
    out = []
    base = root.path
    origin = str(base)
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in root.exclude_dirs)
        for fname in filenames:
            if fname.endswith(root.suffixes):
                full = Path(dirpath) / fname
                if full.is_file():
                    rel = full.relative_to(base).as_posix()
                    out.append(CorpusFile(root.name, rel, full, origin))
    out.sort(key=lambda f: f.rel)
    return out


RootLike = Union[CorpusRoot, str, os.PathLike]


def _resolve_roots(root: RootLike, suffixes: Sequence[str]) -> list[CorpusRoot]:
    if isinstance(root, CorpusRoot):
        return [root]
    if isinstance(root, str) and root == "stdlib":
        return [stdlib_root(suffixes)]
    if isinstance(root, str) and root == "site-packages":
        return site_packages_roots(suffixes)
    p = Path(root).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"corpus root {str(root)!r} is not a directory (for a Hugging Face hub dataset use "
                                "hub_documents(name), which needs `pip install datasets` and a network)")
    return [CorpusRoot(p, p.resolve().name or "root", tuple(suffixes))]


def corpus_files(extra_roots: Sequence[RootLike] = (), *, stdlib: bool = True,
                 suffixes: Sequence[str] = DEFAULT_SUFFIXES) -> list[CorpusFile]:
    """The corpus as a deterministic list of files: the standard library (unless ``stdlib=False``), then each extra
    root in order (``"site-packages"``, ``"stdlib"``, a directory path, or a :class:`CorpusRoot`), each sorted by
    relative path. A file reachable from two roots is listed once (the first time); two roots with the same name
    are an error (keys would collide)."""
    roots: list[CorpusRoot] = [stdlib_root(suffixes)] if stdlib else []
    for r in extra_roots:
        if stdlib and isinstance(r, str) and r == "stdlib":
            continue  # already there
        roots += _resolve_roots(r, suffixes)
    if not roots:
        raise ValueError("empty corpus: stdlib=False and no extra roots given")
    names = [r.name for r in roots]
    if len(set(names)) != len(names):
        raise ValueError(f"corpus roots with the same name {names}: pass CorpusRoot(path, name=...) to tell them apart")
    out: list[CorpusFile] = []
    seen: set[str] = set()
    for r in roots:
        for f in list_root(r):
            real = os.path.realpath(f.path)
            if real not in seen:
                seen.add(real)
                out.append(f)
    return out


def _require_datasets(name: str):
    try:
        import datasets  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"the Hugging Face dataset {name!r} needs the `datasets` package and a network connection: "
            "pip install datasets (the offline default corpus is the Python standard library: 'stdlib')") from err
    return datasets


def hub_documents(name: str, config: str | None = None, split: str = "train",
                  text_field: str = "text") -> list[TextDocument]:
    """Records of a Hugging Face hub dataset as documents (keys ``"<name>/<config>/<split>/<index>"``). Needs the
    ``datasets`` package and a network connection; called only when the user names a dataset."""
    datasets = _require_datasets(name)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # the datasets library raises many types for "no network" / "not found"
        raise RuntimeError(f"could not load the hub dataset {name!r} (config {config!r}, split {split!r}); it needs a "
                           f"network connection and an existing name: {err}") from err
    if text_field not in ds.column_names:
        raise ValueError(f"hub dataset {name!r} has no column {text_field!r}; columns: {ds.column_names}")
    prefix = f"{name}/{config or '-'}/{split}"
    origin = f"hf:{prefix}"
    return [TextDocument(f"{prefix}/{i}", str(t), origin) for i, t in enumerate(ds[text_field])]


def corpus_from_spec(spec: str = "stdlib", suffixes: Sequence[str] = DEFAULT_SUFFIXES) -> list:
    """Documents from a command-line spec: sources joined by ``+``, each ``stdlib``, ``site-packages``, an existing
    directory, or ``hf:<name>[:<config>[:<split>]]`` (a hub dataset: needs ``datasets`` and a network). A source that
    is neither a keyword nor an existing directory is taken as a hub dataset name, which fails with an explanation
    when ``datasets`` is missing -- the network is never touched unless a hub dataset is named."""
    docs: list = []
    roots: list[RootLike] = []
    for part in [p.strip() for p in spec.split("+") if p.strip()]:
        if part in ("stdlib", "site-packages") or Path(part).expanduser().is_dir():
            roots.append(part)
            continue
        if part.startswith(("/", "./", "../", "~")) or Path(part).expanduser().exists():  # a path, not a hub name
            raise ValueError(f"corpus {part!r}: not a directory; give stdlib, site-packages, a directory of text "
                             "files, or hf:NAME for a hub dataset")
        hub = part[3:] if part.startswith("hf:") else part
        name, config, split = (hub.split(":") + [None, None])[:3]
        docs += hub_documents(name, config or None, split or "train")
    if not roots and not docs:
        raise ValueError(f"empty corpus spec {spec!r}")
    files: list = []
    if roots:
        files = corpus_files([r for r in roots if r != "stdlib"], stdlib="stdlib" in roots, suffixes=suffixes)
    return _documents(files + docs)


# ----------------------------------------------------------------------------------------------------------- split
def _key_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest(), "big")


def is_validation(key: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> bool:
    """A document is held out iff ``int(sha256(key)) % 1000 < 1000 * val_fraction`` -- the same on every machine and
    independent of which other documents exist."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    return _key_hash(key) % 1000 < 1000 * val_fraction


def split_files(docs: Iterable, val_fraction: float = DEFAULT_VAL_FRACTION) -> tuple[list, list]:
    """(train, validation) by :func:`is_validation`, each in the input order."""
    train, val = [], []
    for d in _documents(docs):
        (val if is_validation(d.key, val_fraction) else train).append(d)
    return train, val


def train_files(docs: Iterable, val_fraction: float = DEFAULT_VAL_FRACTION) -> list:
    return split_files(docs, val_fraction)[0]


def validation_files(docs: Iterable, val_fraction: float = DEFAULT_VAL_FRACTION) -> list:
    return split_files(docs, val_fraction)[1]


# -------------------------------------------------------------------------------------------------------- manifest
def manifest(docs: Iterable, tokenizer=None, *, n_tokens: int | None = None,
             separator: int | None = None) -> dict:
    """What a result was measured on: ``files`` (count), ``bytes``, ``sha256`` over each document's key and the
    sha256 of its content (in key order, so the list order does not matter), ``roots`` (name -> where it was on this
    machine) and, when a tokenizer is given (or ``n_tokens``), ``tokens``: the length of :func:`token_stream`."""
    docs = _documents(docs)
    h = hashlib.sha256()
    total = 0
    roots: dict[str, str] = {}
    for d in sorted(docs, key=lambda d: d.key):
        data = d.read_bytes()
        total += len(data)
        h.update(d.key.encode("utf-8") + b"\0" + hashlib.sha256(data).hexdigest().encode("ascii") + b"\n")
        root = d.key.split("/", 1)[0] if isinstance(d, CorpusFile) else d.origin
        roots.setdefault(root, d.origin)
    out = {"files": len(docs), "bytes": total, "sha256": h.hexdigest(), "roots": roots}
    if tokenizer is not None and n_tokens is None:
        n_tokens = int(token_stream(docs, tokenizer, separator=separator).numel())
    if n_tokens is not None:
        out["tokens"] = int(n_tokens)
    return out


# ---------------------------------------------------------------------------------------------------- text chunks
def _letters_ok(chunk: str) -> bool:
    visible = [c for c in chunk if not c.isspace()]
    return sum(c.isalpha() for c in visible) >= 0.25 * max(1, len(visible))


def _document_chunks(text: str, min_chars: int, max_chars: int) -> list[str]:
    """Consecutive non-empty lines (stripped, joined by newlines) grouped greedily up to ``max_chars``; a single
    line longer than ``max_chars`` is cut to ``max_chars`` and stands alone. Pieces shorter than ``min_chars`` or
    with fewer than 25% letters among visible characters are dropped."""
    chunks: list[str] = []
    cur: list[str] = []
    size = 0

    def flush():
        nonlocal size
        if cur:
            chunk = "\n".join(cur)
            if len(chunk) >= min_chars and _letters_ok(chunk):
                chunks.append(chunk)
            cur.clear()
            size = 0

    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if len(line) > max_chars:
            flush()
            cur.append(line[:max_chars].rstrip())
            flush()
            continue
        if cur and size + 1 + len(line) > max_chars:
            flush()
        size += len(line) + (1 if cur else 0)
        cur.append(line)
    flush()
    return chunks


def text_chunks(docs: Iterable, n: int, min_chars: int = 80, max_chars: int = 400, seed: int = 0,
                per_file: int = 4) -> list[str]:
    """``n`` distinct natural text chunks (code, comments and docstrings alike; see :func:`_document_chunks`),
    chosen deterministically: documents are visited in the order of ``sha256(seed, key)`` and from each at most
    ``per_file`` chunks are taken (in the order of ``sha256(seed, key, index)``), with further rounds only if the
    first does not yield ``n``. Duplicates (equal after lower-casing and collapsing whitespace) are dropped. The result
    for ``n`` is a prefix of the result for any larger ``n``. Raises ``ValueError`` if the documents hold fewer than
    ``n`` distinct chunks."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 1 <= min_chars <= max_chars:
        raise ValueError(f"need 1 <= min_chars <= max_chars, got min_chars={min_chars}, max_chars={max_chars}")
    if per_file < 1:
        raise ValueError(f"per_file must be >= 1, got {per_file}")
    docs = sorted(_documents(docs), key=lambda d: _key_hash(f"{seed}\0{d.key}"))
    ordered: dict[str, list[str]] = {}
    out: list[str] = []
    seen: set[str] = set()
    rnd = 0
    while True:
        progressed = False
        for d in docs:
            if d.key not in ordered:
                chunks = _document_chunks(d.read_text(), min_chars, max_chars)
                order = sorted(range(len(chunks)), key=lambda i: _key_hash(f"{seed}\0{d.key}\0{i}"))
                ordered[d.key] = [chunks[i] for i in order]
            for chunk in ordered[d.key][rnd * per_file:(rnd + 1) * per_file]:
                progressed = True
                norm = " ".join(chunk.split()).lower()
                if norm in seen:
                    continue
                seen.add(norm)
                out.append(chunk)
                if len(out) == n:
                    return out
        if not progressed:
            raise ValueError(f"the {len(docs)} documents hold only {len(out)} distinct chunks of {min_chars}.."
                             f"{max_chars} characters; asked for {n}")
        rnd += 1


# ---------------------------------------------------------------------------------------------------- token streams
def _is_tokenizers_tokenizer(tokenizer) -> bool:
    return hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "token_to_id")


def separator_id(tokenizer) -> int:
    """The token that ends each document in a stream: the EOS token (or, failing that, SEP) of an HF tokenizer;
    for a bare ``tokenizers.Tokenizer`` the first of ``<|endoftext|>``, ``</s>``, ``<eos>``, ``[SEP]`` it knows."""
    if _is_tokenizers_tokenizer(tokenizer):
        for tok in ("<|endoftext|>", "</s>", "<eos>", "[SEP]"):
            tid = tokenizer.token_to_id(tok)
            if tid is not None:
                return int(tid)
    else:
        for attr in ("eos_token_id", "sep_token_id"):
            tid = getattr(tokenizer, attr, None)
            if tid is not None:
                return int(tid)
    raise ValueError(f"{type(tokenizer).__name__} has no EOS/separator token; pass separator=<token id>")


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each whole text, no special tokens added, never truncated or padded (an HF tokenizer or a
    ``tokenizers.Tokenizer``)."""
    texts = list(texts)
    if not texts:
        return []
    if _is_tokenizers_tokenizer(tokenizer):
        if tokenizer.truncation is not None or tokenizer.padding is not None:
            # A tokenizer.json often carries the model's truncation/padding; a stream needs neither. Work on a copy
            # rather than change the caller's tokenizer.
            tokenizer = type(tokenizer).from_str(tokenizer.to_str())
            tokenizer.no_truncation()
            tokenizer.no_padding()
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return list(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])


def token_stream(docs: Iterable, tokenizer, separator: int | None = None, batch_docs: int = 64) -> torch.Tensor:
    """One 1-D int64 tensor: each non-empty document's tokens (no special tokens) followed by one separator token
    (:func:`separator_id` unless given), in document order. Empty or whitespace-only documents contribute nothing.
    Encoded ``batch_docs`` documents at a time (the fast tokenizers encode a batch in parallel)."""
    docs = _documents(docs)
    sep = separator_id(tokenizer) if separator is None else int(separator)
    pieces: list[np.ndarray] = []
    sep_arr = np.array([sep], dtype=np.int64)
    for start in range(0, len(docs), batch_docs):
        texts = [d.read_text() for d in docs[start:start + batch_docs]]
        texts = [t for t in texts if t.strip()]
        for ids in encode_texts(tokenizer, texts):
            pieces.append(np.asarray(ids, dtype=np.int64))
            pieces.append(sep_arr)
    if not pieces:
        return torch.empty(0, dtype=torch.long)
    return torch.from_numpy(np.concatenate(pieces))


# ------------------------------------------------------------------------------------------------------- tokenizer
def minilm_tokenizer():
    """The tokenizer of the packaged all-MiniLM-L6-v2 (offline)."""
    from transformers import AutoTokenizer

    from .pretrained import minilm_dir

    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
