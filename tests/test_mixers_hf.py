"""structmat mixers as the attention of an HF LlamaForCausalLM (structmat.mixers.hf), on a tiny CPU model.

Identities checked with the relative RMS error against an independent route: full forward vs prefill-then-decode
(structmat's loop and HF's cache), padded batch vs each sequence alone, packed (cu_seq_lens_q) vs separate calls,
generate with the recurrent state vs recomputing the prefix, hybrids (some layers keep attention), state_dict and
save/load round trips (bit-exact).
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from structmat.mixers import (DeltaMixer, DiagonalSSMMixer, LlamaMixerAttention, mixer_decode_logits,  # noqa: E402
                              mixer_generate, replace_attention)

# ---- the one tolerance table (relative RMS error, float32) ----------------------------------------------------
DECODE_REL = 1e-5  # chunked full forward vs recurrent prefill+decode
PAD_REL = 1e-5  # padded batch vs the same sequence alone
TRAIN_DROP = 0.5  # 30 AdamW steps on a periodic sequence must at least halve the loss

CASES = [("deltanet", {"chunk_size": 16}), ("gated_deltanet", {"chunk_size": 16}),
         ("deltaproduct", {"n_householder": 2, "chunk_size": 16}), ("ssm", {"d_state": 8})]
NAMES = [c[0] for c in CASES]
V = 97


def rrms(x, ref):
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "non-finite values"
    return ((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def tiny(name=None, attn="sdpa", seed=0, num_layers=2, **kw):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=V, attn_implementation=attn)
    model = LlamaForCausalLM(cfg)
    if name is not None:
        replace_attention(model, name, **{**dict(CASES)[name], **kw})
    return model


def ids(B, T, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_replace_forward_backward(name):
    model = tiny(name)
    kinds = {"ssm": DiagonalSSMMixer}
    for layer in model.model.layers:
        assert isinstance(layer.self_attn, LlamaMixerAttention)
        assert isinstance(layer.self_attn.mixer, kinds.get(name, DeltaMixer))
    rec = model.config.structmat_mixer
    assert rec["mixer"] == name and json.loads(model.config.to_json_string())["structmat_mixer"] == rec
    if name == "deltaproduct":
        assert model.model.layers[0].self_attn.mixer.nh == 2
    x = ids(2, 37)
    out = model(x, labels=x)
    assert out.logits.shape == (2, 37, V) and torch.isfinite(out.loss)
    out.loss.backward()
    for layer in model.model.layers:
        for n, p in layer.self_attn.mixer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert any(p.grad.abs().sum() > 0 for p in layer.self_attn.mixer.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_full_forward_equals_prefill_then_decode(name):
    model = tiny(name).eval()
    x = ids(2, 37)
    with torch.no_grad():
        full = model(x).logits
        for n_prefill in (0, 20):
            dec = mixer_decode_logits(model, x, n_prefill=n_prefill)
            assert dec.shape == full.shape
            assert rrms(dec, full) < DECODE_REL, (n_prefill, rrms(dec, full))


@pytest.mark.parametrize("name,attn", [("deltanet", "sdpa"), ("gated_deltanet", "eager"), ("ssm", "sdpa"),
                                       ("deltaproduct", "eager")])
def test_padded_batch_equals_each_sequence_alone(name, attn):
    model = tiny(name, attn=attn).eval()
    a, b = ids(1, 21, seed=2), ids(1, 16, seed=3)
    with torch.no_grad():
        ra, rb = model(a).logits, model(b).logits
        for side in ("left", "right"):
            fill = torch.full((1, 5), 0)
            bb = torch.cat([fill, b], 1) if side == "left" else torch.cat([b, fill], 1)
            mb = (torch.cat([fill, torch.ones_like(b)], 1) if side == "left"
                  else torch.cat([torch.ones_like(b), fill], 1))
            out = model(torch.cat([a, bb]), attention_mask=torch.cat([torch.ones_like(a), mb])).logits
            real = mb[0].bool()
            assert rrms(out[0], ra[0]) < PAD_REL
            assert rrms(out[1, real], rb[0]) < PAD_REL, side
        # greedy decoding from a left-padded prompt batch equals decoding each prompt alone
        left = torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)
        mask = torch.cat([torch.ones_like(a), (left > -1) & (torch.arange(21) >= 5)])
        g = mixer_generate(model, torch.cat([a, left]), 4, attention_mask=mask)
        assert torch.equal(g[0, -4:], mixer_generate(model, a, 4)[0, -4:])
        assert torch.equal(g[1, -4:], mixer_generate(model, b, 4)[0, -4:])


def test_packed_cu_seq_lens_equals_separate_sequences():
    model = tiny("gated_deltanet").eval()
    a, b = ids(1, 21, seed=2), ids(1, 16, seed=3)
    cu = torch.tensor([0, 21, 37], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=21,
                       max_length_k=21).logits
        assert rrms(packed, torch.cat([model(a).logits, model(b).logits], 1)) < PAD_REL
    with pytest.raises(ValueError, match="cu_seqlens"):
        tiny("ssm")(torch.cat([a, b], 1), cu_seq_lens_q=cu)


def test_masks_that_cannot_be_honoured_raise():
    attn = tiny("deltanet").model.layers[0].self_attn
    h = torch.randn(1, 8, 64)
    window = torch.ones(8, 8, dtype=torch.bool).tril() & ~torch.ones(8, 8, dtype=torch.bool).tril(-3)
    with pytest.raises(ValueError, match="causal & key padding"):
        attn(h, attention_mask=window[None, None])
    with pytest.raises(TypeError, match="unsupported attention mask"):
        attn(h, attention_mask=object())
    y, w = attn(h, attention_mask=torch.ones(8, 8, dtype=torch.bool).tril()[None, None])  # plain causal: fine
    assert y.shape == h.shape and w is None


def _cache_of(out):
    cache = getattr(out, "cache", None)  # transformers >= 5.2x names it cache, before past_key_values
    return cache if cache is not None else out.past_key_values


@pytest.mark.parametrize("name,layers", [("deltanet", None), ("ssm", None), ("gated_deltanet", [0, 2]),
                                         ("deltaproduct", [1])])
def test_hf_cache_continues_from_the_recurrent_state(name, layers):
    """A forward given the DynamicCache of earlier calls continues from each mixer layer's state (one token or
    several), attention layers of a hybrid from their KV cache; the logits equal the full forward's."""
    model = tiny(name, layers=layers, num_layers=3).eval()
    x = ids(2, 23)
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :9], use_cache=True)
        cache, got = _cache_of(out), [out.logits]
        got.append(model(x[:, 9:14], cache=cache, use_cache=True).logits)  # several tokens at once
        for t in range(14, 23):
            got.append(model(x[:, t:t + 1], cache=cache, use_cache=True).logits)
        assert cache.get_seq_length() == 23
        assert rrms(torch.cat(got, 1), full) < DECODE_REL
    attn = next(l.self_attn for l in model.model.layers if isinstance(l.self_attn, LlamaMixerAttention))
    with pytest.raises(RuntimeError, match="no recurrent state"):  # a continuation without the state is refused
        attn(torch.randn(1, 1, 64), attention_mask=torch.ones(1, 1, 1, 5, dtype=torch.bool))


@pytest.mark.parametrize("name,layers", [("deltanet", None), ("gated_deltanet", [0, 2])])
def test_generate_with_cache_equals_recomputation_and_padding(name, layers):
    """Greedy HF generate with the recurrent state equals generate recomputing the prefix each step (and
    mixer_generate for all-mixer models); a left-padded prompt batch decodes each prompt as if alone."""
    model = tiny(name, layers=layers, num_layers=3).eval()
    model.generation_config.eos_token_id = None  # compare full lengths
    a, b = ids(1, 12, seed=2), ids(1, 8, seed=3)
    with torch.no_grad():
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        cached = model.generate(a, use_cache=True, **kw)
        assert torch.equal(cached, model.generate(a, use_cache=False, **kw))
        if layers is None:
            assert torch.equal(cached, mixer_generate(model, a, 6))
        batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
        mask = torch.ones_like(batch)
        mask[1, :4] = 0
        g = model.generate(batch, attention_mask=mask, use_cache=True, **kw)
        assert torch.equal(g[0, -6:], cached[0, -6:])
        assert torch.equal(g[1, -6:], model.generate(b, use_cache=True, **kw)[0, -6:])


@pytest.mark.parametrize("name,layers", [("deltanet", None), ("ssm", [0, 2])])
def test_beam_search_reorders_the_mixer_states(name, layers):
    """Beam search reorders HF's cache every step; the mixer states follow, so cached beam search equals beam search
    recomputing the prefix (with the states left in place it would not)."""
    model = tiny(name, layers=layers, num_layers=3).eval()
    model.generation_config.eos_token_id = None
    a = ids(2, 10, seed=4)
    with torch.no_grad():
        kw = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=2, pad_token_id=0)
        cached = model.generate(a, use_cache=True, **kw)
        assert torch.equal(cached, model.generate(a, use_cache=False, **kw))


def test_a_cropped_cache_cannot_be_continued():
    """A recurrent state cannot be rolled back: after a crop that removes tokens (what assisted decoding does when it
    rejects candidates) continuing raises, naming the cause."""
    model = tiny("deltanet").eval()
    x = ids(1, 12)
    with torch.no_grad():
        out = model(x[:, :8], use_cache=True)
        cache = _cache_of(out)
        model(x[:, 8:9], cache=cache, use_cache=True)
        cache.crop(-2)  # negative: remove two tokens, in every transformers version
        assert cache.get_seq_length() == 7
        with pytest.raises(ValueError, match="cropped"):
            model(x[:, 9:10], cache=cache, use_cache=True)


def test_hybrid_layers_and_save_load_round_trip(tmp_path):
    from structmat import load_pretrained, save_pretrained
    from structmat.mixers import hybrid_layers

    assert hybrid_layers(8, 4) == [0, 1, 2, 4, 5, 6] and hybrid_layers(3, 0) == [0, 1, 2]
    with pytest.raises(ValueError, match="attn_every"):
        hybrid_layers(8, 1)
    model = tiny("deltaproduct", layers=hybrid_layers(4, 2), num_layers=4, allow_neg_eigval=False).eval()
    kinds = [type(l.self_attn).__name__ for l in model.model.layers]
    assert kinds == ["LlamaMixerAttention", "LlamaAttention"] * 2
    assert model.config.structmat_mixer["layers"] == [0, 2]
    save_pretrained(model, tmp_path / "m")
    back = load_pretrained(tmp_path / "m")
    assert [type(l.self_attn).__name__ for l in back.model.layers] == kinds
    assert back.model.layers[0].self_attn.mixer.allow_neg_eigval is False
    x = ids(2, 19)
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)
    with pytest.raises(ValueError, match="layers must be"):
        replace_attention(tiny(), "deltanet", layers=[5])


def test_state_dict_loads_into_a_fresh_replaced_model():
    model = tiny("deltaproduct", allow_neg_eigval=False).eval()
    cfg = LlamaConfig.from_dict(json.loads(model.config.to_json_string()))
    torch.manual_seed(123)
    fresh = replace_attention(LlamaForCausalLM(cfg), **cfg.structmat_mixer).eval()
    assert fresh.model.layers[0].self_attn.mixer.allow_neg_eigval is False
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = ids(2, 19)
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, model(x).logits)


def test_training_reduces_loss():
    model = tiny("gated_deltanet")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pattern = torch.randint(0, V, (7,), generator=torch.Generator().manual_seed(4))
    x = pattern.repeat(8)[:48].expand(4, 48).contiguous()
    losses = []
    for _ in range(30):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < TRAIN_DROP * losses[0], losses


def test_options_device_dtype_and_errors():
    model = tiny().double()
    replace_attention(model, "deltanet", n_heads=2, allow_neg_eigval=False)
    m = model.model.layers[1].self_attn.mixer
    assert m.n_heads == 2 and m.allow_neg_eigval is False and m.q_proj.weight.dtype == torch.float64
    assert model.model.layers[1].self_attn.layer_idx == 1
    assert model.config.structmat_mixer == {"mixer": "deltanet", "n_heads": 2, "allow_neg_eigval": False}
    with pytest.raises(ValueError, match="deltanet.*ssm|ssm.*deltanet"):
        replace_attention(tiny(), "mamba")
    with pytest.raises(ValueError, match="no heads"):
        replace_attention(tiny(), "ssm", n_heads=4)
    with pytest.raises(ValueError, match="JSON"):
        replace_attention(tiny(), "deltanet", chunk_size=torch.tensor(16))
