"""The offline corpus: listing, the hash split, the manifest, text chunks and token streams (no network)."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import pytest
import torch

from structmat.data.corpus import (CorpusRoot, TextDocument, corpus_files, corpus_from_spec, is_validation,
                                   manifest, minilm_tokenizer, split_files, text_chunks, token_stream,
                                   train_files, validation_files)


def _write(root: Path, rel: str, text: str) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def _paragraph(i: int) -> str:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma"]
    return "\n".join(f"def f{i}_{j}(x):  # {words[(i + j) % 10]} {words[(i * j) % 10]} {i} {j}\n    return x + {j}"
                     for j in range(12))


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    root = tmp_path / "proj"
    for i in range(30):
        _write(root, f"pkg{i % 3}/mod{i}.py", _paragraph(i))
    _write(root, "notes.txt", "plain text notes, not python\n" * 5)
    _write(root, "site-packages/third_party.py", "x = 1\n")
    _write(root, "__pycache__/cached.py", "x = 2\n")
    _write(root, "empty.py", "")
    return root


def test_listing_is_sorted_filtered_and_excludes_site_packages(tiny_corpus):
    files = corpus_files([tiny_corpus], stdlib=False)
    rels = [f.rel for f in files]
    assert rels == sorted(rels) and len(rels) == 31
    assert all(r.endswith(".py") for r in rels)
    assert not any("site-packages" in r or "__pycache__" in r for r in rels)
    assert {f.key.split("/")[0] for f in files} == {"proj"}
    txt = corpus_files([CorpusRoot(tiny_corpus, "notes", suffixes=(".txt",))], stdlib=False)
    assert [f.key for f in txt] == ["notes/notes.txt"]
    with pytest.raises(ValueError, match="same name"):
        corpus_files([tiny_corpus, CorpusRoot(tiny_corpus / "pkg0", "proj")], stdlib=False)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        corpus_files([tiny_corpus / "missing"], stdlib=False)


def test_stdlib_default_corpus_and_split():
    files = corpus_files()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 500 and all(f.key.startswith("stdlib/") for f in files)
    assert not any("site-packages/" in f.rel for f in files)
    assert "stdlib/json/decoder.py" in {f.key for f in files}
    assert all(f.path.is_relative_to(stdlib) for f in files)
    assert files == corpus_files()  # deterministic
    train, val = split_files(files, 0.1)
    assert {f.key for f in train}.isdisjoint({f.key for f in val})
    assert len(train) + len(val) == len(files)
    assert 0.05 < len(val) / len(files) < 0.15
    assert train == train_files(files, 0.1) and val == validation_files(files, 0.1)
    # the split of a file depends on its key only, not on which other files exist
    assert validation_files(files[::2], 0.1) == [f for f in val if f in set(files[::2])]


def test_split_rule_is_pinned():
    # The rule itself, checked against an independent computation, so it cannot drift between machines/versions.
    for key in ("stdlib/json/decoder.py", "stdlib/os.py", "proj/a/b.py", "x"):
        bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 1000
        for frac in (0.0, 0.05, 0.1, 0.5, 1.0):
            assert is_validation(key, frac) == (bucket < 1000 * frac)
    assert not is_validation("anything", 0.0) and is_validation("anything", 1.0)
    with pytest.raises(ValueError):
        is_validation("x", 1.5)


def test_manifest_is_stable_and_tracks_content(tiny_corpus):
    files = corpus_files([tiny_corpus], stdlib=False)
    m1, m2 = manifest(files), manifest(list(reversed(files)))
    assert m1 == m2
    assert m1["files"] == 31 and m1["bytes"] == sum(f.path.stat().st_size for f in files)
    assert m1["roots"] == {"proj": str(tiny_corpus)}
    (tiny_corpus / "pkg1" / "mod1.py").write_text(_paragraph(1) + "\n# changed")
    m3 = manifest(corpus_files([tiny_corpus], stdlib=False))
    assert m3["sha256"] != m1["sha256"] and m3["bytes"] != m1["bytes"]
    (tiny_corpus / "pkg1" / "mod1.py").write_text(_paragraph(1))
    assert manifest(corpus_files([tiny_corpus], stdlib=False)) == m1
    (tiny_corpus / "pkg1" / "mod1.py").rename(tiny_corpus / "pkg1" / "renamed.py")
    m4 = manifest(corpus_files([tiny_corpus], stdlib=False))
    assert m4["sha256"] != m1["sha256"] and m4["bytes"] == m1["bytes"]


def test_text_chunks_deterministic_distinct_and_bounded(tiny_corpus):
    files = corpus_files([tiny_corpus], stdlib=False)
    a = text_chunks(files, 40, min_chars=60, max_chars=200, seed=0)
    assert a == text_chunks(list(reversed(files)), 40, min_chars=60, max_chars=200, seed=0)
    assert len(set(a)) == 40
    assert all(60 <= len(c) <= 200 for c in a)
    assert text_chunks(files, 10, min_chars=60, max_chars=200, seed=0) == a[:10]
    assert text_chunks(files, 40, min_chars=60, max_chars=200, seed=1) != a
    # chunks are consecutive lines of some file
    texts = [f.read_text() for f in files]
    for c in a:
        assert any(c.split("\n")[0] in t and c.split("\n")[-1] in t for t in texts)
    with pytest.raises(ValueError, match="distinct chunks"):
        text_chunks(files, 10_000, min_chars=60, max_chars=200)


def test_text_chunks_on_stdlib_validation_files():
    val = validation_files(corpus_files())
    chunks = text_chunks(val, 64)
    assert chunks == text_chunks(val, 64) and len(set(chunks)) == 64
    assert all(80 <= len(c) <= 400 for c in chunks)
    train_text = {c for c in text_chunks(train_files(corpus_files()), 64)}
    assert len(train_text & set(chunks)) < 4  # disjoint files; only boilerplate could coincide


def test_token_stream_hf_and_tokenizers(tiny_corpus):
    import tokenizers

    from structmat.data.pretrained import minilm_dir

    files = corpus_files([tiny_corpus], stdlib=False)
    hf = minilm_tokenizer()
    stream = token_stream(files, hf)
    assert stream.dtype == torch.long and stream.ndim == 1
    sep = hf.sep_token_id
    non_empty = [f for f in files if f.read_text().strip()]
    assert int((stream == sep).sum()) == len(non_empty) and int(stream[-1]) == sep
    first = hf(non_empty[0].read_text(), add_special_tokens=False)["input_ids"]
    assert stream[: len(first)].tolist() == first
    # the bare tokenizers.Tokenizer of the same model gives the same stream, even though its tokenizer.json truncates
    bare = tokenizers.Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    assert bare.truncation is not None
    assert torch.equal(token_stream(files, bare), stream)
    assert bare.truncation is not None  # the caller's tokenizer is left as it was
    assert manifest(files, hf)["tokens"] == stream.numel()
    assert torch.equal(token_stream(files, hf, separator=7)[stream == sep], torch.full((len(non_empty),), 7))


def test_documents_and_hub_names_without_network(tiny_corpus):
    docs = [TextDocument("mem/a", "hello world " * 20), TextDocument("mem/b", "goodbye moon " * 20)]
    assert manifest(docs)["files"] == 2
    assert len(text_chunks(docs, 2, min_chars=20, max_chars=100)) == 2
    assert corpus_from_spec(str(tiny_corpus)) == corpus_files([tiny_corpus], stdlib=False)
    with pytest.raises(ImportError, match=r"pip install datasets.*network|network.*pip install datasets"):
        corpus_from_spec("wikitext")
    with pytest.raises(ImportError, match="pip install datasets"):
        corpus_from_spec("stdlib+hf:Salesforce/wikitext:wikitext-2-raw-v1:test")
    for path in (str(tiny_corpus / "missing"), "./missing-dir", str(next(tiny_corpus.rglob("*.py")))):
        with pytest.raises(ValueError, match="not a directory; give stdlib, site-packages"):  # a path, not a hub name
            corpus_from_spec(path)
