"""Evaluation: causal-LM perplexity (exact against a hand computation) and encoder fidelity on the real MiniLM."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from structmat.data.corpus import corpus_files, minilm_tokenizer, text_chunks, validation_files
from structmat.data.pretrained import load_minilm
from structmat.eval.fidelity import (FidelityReference, encoder_fidelity, fidelity_reference, sentence_embeddings,
                                     split_query_document)
from structmat.eval.perplexity import perplexity, wikitext2_tokens

VOCAB = 61


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _hand_perplexity(model, tokens, window):
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(tokens.numel() // window):
            x = tokens[w * window:(w + 1) * window]
            logits = model(input_ids=x[None]).logits[0].float()
            total += F.cross_entropy(logits[:-1], x[1:], reduction="sum").item()
            count += window - 1
    return math.exp(total / count), count


# ------------------------------------------------------------------------------------------------------ perplexity
def test_perplexity_matches_hand_computation_on_llama():
    model = _tiny_llama()
    g = torch.Generator().manual_seed(1)
    window = 16
    tokens = torch.randint(0, VOCAB, (5 * window + 7,), generator=g)
    ppl_ref, count = _hand_perplexity(model, tokens, window)
    for batch_size in (1, 2, 8):  # uneven last batch included
        r = perplexity(model, tokens, window=window, batch_size=batch_size)
        assert r["windows"] == 5 and r["dropped_tokens"] == 7 and r["tokens"] == count == 5 * (window - 1)
        assert r["stream_tokens"] == tokens.numel() and r["window"] == window
        assert r["ppl"] == pytest.approx(ppl_ref, rel=1e-5)
        assert r["nll"] == pytest.approx(math.log(ppl_ref), rel=1e-5)
    # HF's own shifted loss (mean over window - 1 tokens) agrees per window
    with torch.no_grad():
        hf = [model(input_ids=tokens[i * window:(i + 1) * window][None],
                    labels=tokens[i * window:(i + 1) * window][None]).loss.item() for i in range(5)]
    assert math.exp(sum(hf) / 5) == pytest.approx(ppl_ref, rel=1e-5)
    # a random-init model is near-uniform: ppl close to the vocabulary size
    assert 0.5 * VOCAB < ppl_ref < 2 * VOCAB


def test_perplexity_gpt2_and_restores_training_mode():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4)).train()
    tokens = torch.randint(0, VOCAB, (3 * 32,), generator=torch.Generator().manual_seed(2))
    r = perplexity(model, tokens, window=32, batch_size=2)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    assert r["ppl"] == pytest.approx(_hand_perplexity(model, tokens, 32)[0], rel=1e-5)
    assert r["windows"] == 3 and r["dropped_tokens"] == 0 and r["tokens"] == 3 * 31


class _Uniform(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        return torch.zeros(*input_ids.shape, self.vocab, dtype=torch.bfloat16)


class _NaNOn(nn.Module):
    """Logits are NaN wherever the input is token 0."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        logits = torch.randn(*input_ids.shape, self.vocab)
        logits[input_ids == 0] = float("nan")
        return (logits,)


def test_uniform_logits_give_vocab_size_and_nan_raises():
    tokens = torch.randint(1, VOCAB, (100,), generator=torch.Generator().manual_seed(3))
    r = perplexity(_Uniform(VOCAB), tokens, window=10, batch_size=3)
    assert r["ppl"] == pytest.approx(VOCAB, rel=1e-6)  # exact up to the float32 log-softmax
    assert r["windows"] == 10 and r["tokens"] == 90 and r["dropped_tokens"] == 0
    tokens[3 * 10 + 4] = 0  # window 3 predicts from a NaN logit row
    with pytest.raises(ValueError, match="non-finite loss in window 3 "):
        perplexity(_NaNOn(VOCAB), tokens, window=10, batch_size=4)


def test_perplexity_rejects_bad_input():
    model = _Uniform(VOCAB)
    with pytest.raises(ValueError, match="one window"):
        perplexity(model, torch.arange(5), window=8)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, torch.zeros(2, 8, dtype=torch.long), window=4)
    with pytest.raises(ValueError, match="integer"):
        perplexity(model, torch.zeros(16), window=4)
    with pytest.raises(ValueError, match="window"):
        perplexity(model, torch.arange(16), window=1)


def test_offline_perplexity_path_on_stdlib_tokens():
    """The offline protocol end to end: held-out stdlib files -> token stream -> perplexity of an untrained Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from structmat.data.corpus import token_stream

    tok = minilm_tokenizer()
    stream = token_stream(validation_files(corpus_files())[:4], tok)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    r = perplexity(model, stream[: 6 * 64 + 5], window=64, batch_size=4)
    assert r["windows"] == 6 and r["dropped_tokens"] == 5 and r["tokens"] == 6 * 63
    assert 0.5 * tok.vocab_size < r["ppl"] < 2 * tok.vocab_size  # untrained: about uniform


def test_wikitext2_needs_datasets_and_says_so():
    with pytest.raises(ImportError, match="pip install datasets"):
        wikitext2_tokens(minilm_tokenizer())


# -------------------------------------------------------------------------------------------------------- fidelity
@pytest.fixture(scope="module")
def minilm():
    return load_minilm(), minilm_tokenizer()


@pytest.fixture(scope="module")
def texts():
    return text_chunks(validation_files(corpus_files()), 20, max_chars=240, seed=0)


@pytest.fixture(scope="module")
def reference(minilm, texts):
    model, tok = minilm
    return fidelity_reference(model, tok, texts, batch_size=16, max_length=64)  # short: a fast test


def test_embeddings_match_direct_mean_pooling(minilm, texts):
    model, tok = minilm
    emb = sentence_embeddings(model, tok, texts[:6], batch_size=4, max_length=64)
    assert emb.dtype == torch.float32 and emb.shape == (6, 384)
    with torch.no_grad():
        for i, t in enumerate(texts[:6]):
            enc = tok(t, truncation=True, max_length=64, return_tensors="pt")
            h = model(**enc).last_hidden_state[0]  # one text, no padding: a plain mean
            direct = h.mean(0) / h.mean(0).norm()
            assert torch.allclose(emb[i], direct, atol=2e-5), i
    assert torch.allclose(emb.norm(dim=1), torch.ones(6), atol=1e-5)


def test_minilm_against_itself_is_perfect(minilm, texts, reference):
    model, tok = minilm
    r = encoder_fidelity(reference, model, tok, texts, batch_size=16)
    assert r["n_texts"] == 20 and reference.max_length == 64
    assert r["cosine"] == pytest.approx(1.0, abs=1e-6) and r["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert r["top1_agreement"] == 1.0
    assert r["top1_reference"] == r["top1_model"] > 0.5  # the halves of a chunk find each other


def test_perturbed_minilm_loses_fidelity_and_model_is_untouched(minilm, texts, reference):
    model, tok = minilm
    w = model.encoder.layer[0].attention.self.query.weight
    saved = w.detach().clone()
    g = torch.Generator().manual_seed(4)
    try:
        with torch.no_grad():
            w.add_(torch.randn(w.shape, generator=g) * saved.std() * 2.0)
        r = encoder_fidelity(reference, model, tok, batch_size=16)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert 0.5 < r["cosine"] < 0.9999 and r["cosine_min"] <= r["cosine"]
    assert 0.0 <= r["top1_agreement"] <= 1.0
    with pytest.raises(ValueError, match="texts differ"):
        encoder_fidelity(reference, model, tok, texts[:-1])
    with pytest.raises(TypeError, match="FidelityReference"):
        encoder_fidelity(reference.full, model, tok)


def test_non_finite_embedding_raises_naming_the_batch(minilm, texts):
    model, tok = minilm
    w = model.embeddings.word_embeddings.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.fill_(float("nan"))
        with pytest.raises(ValueError, match="non-finite sentence embedding in batch 0"):
            sentence_embeddings(model, tok, texts[:4])
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_reference_save_load_round_trip(tmp_path, reference):
    path = reference.save(tmp_path / "ref.safetensors")
    back = FidelityReference.load(path)
    assert back.texts == reference.texts and back.max_length == reference.max_length
    for name in ("full", "query", "document"):
        assert torch.equal(getattr(back, name), getattr(reference, name))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception):
        FidelityReference.load(tmp_path / "bad.safetensors")


def test_split_query_document():
    assert split_query_document("a b\nc d\ne f\ng h") == ("a b\nc d", "e f\ng h")
    assert split_query_document("one two three four") == ("one two", "three four")
    assert split_query_document("abcdef") == ("abc", "def")
    with pytest.raises(ValueError):
        split_query_document("x")


def test_perplexity_row_log_keeps_whole_lines(tmp_path, capsys):
    """The demo's row log (demo_rows.jsonl): the dense line first, then one JSON line per finished row, the file
    rewritten whole after each (a run killed mid-write keeps every finished row, never half a line)."""
    import json

    from structmat.eval.compression_sweep import SweepRow, perplexity_row_log

    path = tmp_path / "rows.jsonl"
    on_row = perplexity_row_log(path, {"ppl": 8.0})
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"dense": {"ppl": 8.0}}]
    for t, ppl in ((0.5, 14.5), (0.75, 8.8)):
        on_row(SweepRow("budget mix", t, "mix", t, 1.0, metrics={"ppl": ppl}))
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 3 and [r["ppl"] for r in lines[1:]] == [14.5, 8.8]
    assert "1.81 x dense" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]  # (no temp file left behind)
