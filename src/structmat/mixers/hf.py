"""structmat token mixers inside HF Llama-style causal LMs (``LlamaForCausalLM`` and kin).

* :func:`replace_attention` swaps every ``model.model.layers[i].self_attn`` for a :class:`LlamaMixerAttention`
  that wraps one structmat mixer (``"deltanet"``, ``"gated_deltanet"``, ``"deltaproduct"``, ``"ssm"``), and records
  the choice in ``model.config.structmat_mixer`` (JSON), so ``replace_attention(fresh, **cfg.structmat_mixer)``
  rebuilds the same architecture for ``load_state_dict``. The rest of the HF model (embedding, norms, MLPs, head,
  loss) is untouched; rotary position embeddings are ignored (the recurrence is itself position-aware).
* Hybrids: ``layers=[...]`` replaces only those layers (the others keep HF attention); :func:`hybrid_layers` gives
  the usual pattern "every K-th layer keeps attention". Recorded in the config like the rest.
* Decoding with the recurrent state through HF ``generate`` (and any forward given an HF ``DynamicCache``): each
  mixer layer keeps its :class:`~structmat.mixers.layers.MixerCache` (state + short-conv window, O(1) per token) on
  the cache object and continues from it on the next call; attention layers of a hybrid use the KV cache as usual.
  A mixer layer also appends one number per token to its KV slot, so the cache's sequence length (which HF reads
  for positions and mask sizes) counts its tokens (2 bytes per token and layer in bf16). Greedy decoding through ``generate`` equals
  recomputing the prefix at every step (tested). :func:`mixer_prefill`, :func:`mixer_step`,
  :func:`mixer_decode_logits` and :func:`mixer_generate` do the same without HF's generation loop (all layers mixers).
* :func:`rebuild_from_config` re-applies ``config.structmat_mixer`` to a freshly built model; it is registered with
  :mod:`structmat.io` so ``structmat.load_pretrained`` rebuilds mixer (and hybrid) models.

What a forward call honours (anything else raises, padding is never silently ignored):
* ``attention_mask=None`` (unpadded or packed-without-boundaries batches, the usual LM training): exact.
* a padded batch, left or right padding: pass the usual 2-D ``attention_mask`` to ``model(...)``. HF turns it into a
  4-D causal mask (sdpa: bool, eager: additive float); the 2-D key-padding mask is recovered from its last row and
  *verified* against ``causal & padding`` (rows of padded queries excepted). A 2-D mask reaching the layer (the
  flash-attention route) is used directly. Real tokens then get exactly their unpadded outputs.
* packed sequences with boundaries: HF's flash-attention kwarg ``cu_seq_lens_q`` (batch of 1, as produced by
  ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``), delta-rule mixers only. Restarting
  ``position_ids`` alone are not interpreted (sdpa/eager attention in transformers 5.x does not either).
* other 4-D masks (custom, sliding-window) and flex-attention ``BlockMask`` s: ``ValueError`` / ``TypeError``.
Beam search works: what HF's generation does to the cache's batch (``reorder_cache``, ``batch_select_indices``,
``batch_repeat_interleave``) is done to the mixer states too (greedy and beam search equal recomputation, tested).
A recurrent state cannot be rolled back, so a ``crop`` that removes tokens (assisted / speculative decoding rejecting
candidates) leaves a note instead of the state, and continuing from that cache raises a ``ValueError`` saying so.
Unsupported: ``output_attentions`` (nothing is recorded), caches that are not ``DynamicCache`` s (``TypeError``).
"""

from __future__ import annotations

import json

import torch
from torch import Tensor, nn

from ..io import register_build_hook
from .layers import DeltaNet, DeltaProduct, DiagonalSSMMixer, GatedDeltaNet, MixerCache

__all__ = ["LlamaMixerAttention", "MIXERS", "replace_attention", "hybrid_layers", "rebuild_from_config",
           "mixer_prefill", "mixer_step", "mixer_decode_logits", "mixer_generate"]

# name -> (constructor, takes n_heads)
MIXERS = {"deltanet": (DeltaNet, True), "gated_deltanet": (GatedDeltaNet, True),
          "deltaproduct": (DeltaProduct, True), "ssm": (DiagonalSSMMixer, False)}

_NO_HF_CACHE = ("LlamaMixerAttention: this call continues a sequence (keys longer than queries) but no recurrent "
                "state was passed: give the DynamicCache of the earlier calls (cache=/past_key_values=), or use "
                "structmat.mixers.hf.mixer_generate")


def _padding_mask(attention_mask, B: int, T: int, continuing: bool = False) -> Tensor | None:
    """(B, T) bool key-padding mask of the T new tokens (True = real), or None for 'no padding'; raises on masks it
    can't honour. ``continuing``: keys may be longer than queries (earlier tokens live in the recurrent state)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"LlamaMixerAttention: unsupported attention mask {type(attention_mask).__name__}; "
                        "use attn_implementation='sdpa' or 'eager'")
    if attention_mask.shape[-1] < T or (attention_mask.shape[-1] > T and not continuing):
        raise RuntimeError(_NO_HF_CACHE)
    if attention_mask.dim() == 2:
        pad = attention_mask[:, -T:].bool()
    elif attention_mask.dim() == 4:
        if attention_mask.shape[-2] != T or attention_mask.shape[1] != 1:
            raise ValueError(f"LlamaMixerAttention: expected a (B, 1, T, T + past) mask, got "
                             f"{tuple(attention_mask.shape)}")
        m = attention_mask[:, 0, :, -T:]  # the new tokens' keys; earlier keys are in the state
        allowed = m if m.dtype == torch.bool else m == 0  # additive float masks: 0 = attend
        pad = allowed[:, -1].expand(B, T)  # the last query sees every real key (left or right padding)
        causal = torch.ones(T, T, dtype=torch.bool, device=m.device).tril()
        # Verify instead of trusting: real queries must see exactly the causal real keys (padded rows may be anything).
        if not bool(((allowed == (causal & pad[:, None, :])) | ~pad[:, :, None]).all()):
            raise ValueError("LlamaMixerAttention: the 4-D attention mask is not 'causal & key padding' (custom, "
                             "sliding-window or block masks are not supported); pass a 2-D padding attention_mask")
    else:
        raise ValueError(f"LlamaMixerAttention: unsupported attention mask shape {tuple(attention_mask.shape)}")
    return None if bool(pad.all()) else pad


_CROPPED = ("the cache was cropped (assisted or speculative decoding rejecting candidate tokens, or a rollback after "
            "a stop): a recurrent state cannot be rolled back; decode without an assistant model")


def _follow_cache_edits(cache, states: dict) -> None:
    """Make the mixer states follow what HF's generation does to ``cache`` (once per cache object): batch reorders,
    selections and repeats (beam search) are applied to each state and conv window; a crop that shortens the cache
    replaces the states by a note (see ``_CROPPED``)."""
    if cache.__dict__.get("_structmat_follows"):
        return
    cache.__dict__["_structmat_follows"] = True

    def edit_states(fn):
        for i, s in list(states.items()):
            if isinstance(s, MixerCache):
                states[i] = MixerCache(state=None if s.state is None else fn(s.state),
                                       conv=None if s.conv is None else fn(s.conv), seen=s.seen, extra=s.extra)

    edits = {
        "reorder_cache": lambda beam_idx: edit_states(lambda t: t.index_select(0, beam_idx.to(t.device))),
        "batch_select_indices": lambda indices: edit_states(lambda t: t[indices.to(t.device)]),
        "batch_repeat_interleave": lambda repeats: edit_states(lambda t: t.repeat_interleave(repeats, 0)),
    }
    for name, edit in edits.items():
        original = getattr(cache, name, None)
        if original is None:
            continue

        def follow(*args, _original=original, _edit=edit, **kwargs):
            out = _original(*args, **kwargs)
            _edit(*args, **kwargs)
            return out

        setattr(cache, name, follow)  # an instance attribute: this cache object only
    original_crop = getattr(cache, "crop", None)
    if original_crop is not None:
        def crop(*args, **kwargs):  # the argument's meaning changed across transformers versions: compare lengths
            before = cache.get_seq_length()
            out = original_crop(*args, **kwargs)
            if cache.get_seq_length() < before:
                for i, s in list(states.items()):
                    if isinstance(s, MixerCache):
                        states[i] = _CROPPED
            return out

        cache.crop = crop


class LlamaMixerAttention(nn.Module):
    """Drop-in for ``LlamaDecoderLayer.self_attn``: ``(hidden_states, **hf_kwargs) -> (y, None)``.
    ``self.mixer`` is the structmat mixer; see the module docstring for masks and caching."""

    def __init__(self, mixer: nn.Module, layer_idx: int | None = None):
        super().__init__()
        self.mixer, self.layer_idx = mixer, layer_idx

    def forward(self, hidden_states: Tensor, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache: bool | None = False, position_embeddings=None, **kwargs):
        # the cache's keyword changed across transformers versions: past_key_value(s) up to 5.2x, cache after
        cache = next((c for c in (past_key_values, kwargs.get("cache"), kwargs.get("past_key_value"))
                      if c is not None), None)
        B, T = hidden_states.shape[:2]
        cu = kwargs.get("cu_seq_lens_q")
        if cache is None:
            y, _ = self.mixer(hidden_states, mask=_padding_mask(attention_mask, B, T), cu_seqlens=cu)
            return y, None  # (output, attention weights): what LlamaDecoderLayer unpacks
        if not callable(getattr(cache, "update", None)) or type(cache).__name__ != "DynamicCache":
            raise TypeError(f"LlamaMixerAttention: {type(cache).__name__} is not supported; the mixer state rides on "
                            "a DynamicCache (the default of generate)")
        states = cache.__dict__.setdefault("_structmat_states", {})
        _follow_cache_edits(cache, states)
        prev = states.get(self.layer_idx)
        if isinstance(prev, str):  # the prefill could not leave a state (see below): continuing would lose context
            raise ValueError(f"LlamaMixerAttention: cannot continue this cache: {prev}")
        mask = _padding_mask(attention_mask, B, T, continuing=prev is not None)
        if prev is None and (cu is not None or (mask is not None and not bool(mask[:, -1].all()))):
            # a right-padded or packed prefill has no single state to continue from: compute, and leave a note
            y, _ = self.mixer(hidden_states, mask=mask, cu_seqlens=cu)
            state = ("its prefill was right-padded or packed (cu_seq_lens); decode from left-padded prompts "
                     "(generate pads on the left with tokenizer.padding_side='left')")
        elif prev is not None and T == 1 and mask is None:
            y1, state = self.mixer.step(hidden_states[:, 0], prev)
            y = y1[:, None]
        else:  # prefill, or a continuation of several tokens (the mixer checks that padding is on the left)
            y, state = self.mixer(hidden_states, mask=mask, cache=prev, use_cache=True)
        states[self.layer_idx] = state
        # one number per token in this layer's KV slot, so that the cache's length (HF reads layer 0's for positions
        # and mask sizes) counts the tokens (DynamicLayer does not count zero-width keys)
        marker = hidden_states.new_zeros(B, 1, T, 1)
        cache.update(marker, marker, self.layer_idx)
        return y, None


def hybrid_layers(n_layers: int, attn_every: int) -> list[int]:
    """The layers a mixer replaces when every ``attn_every``-th layer keeps attention (layers K-1, 2K-1, ...);
    ``attn_every=0`` replaces all."""
    if not isinstance(attn_every, int) or attn_every < 0 or attn_every == 1:
        raise ValueError(f"attn_every must be 0 (no attention layers) or an int >= 2, got {attn_every!r}")
    return [i for i in range(n_layers) if attn_every == 0 or (i + 1) % attn_every != 0]


def _layers(model):
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None or not all(hasattr(l, "self_attn") for l in layers):
        raise ValueError(f"{type(model).__name__} is not Llama-style (model.model.layers[i].self_attn)")
    return base, layers


def replace_attention(model: nn.Module, mixer: str = "deltanet", n_heads: int | None = None,
                      layers: list[int] | None = None, **mixer_kwargs):
    """In place: every ``self_attn`` of a Llama-style HF model (or those of ``layers``, indices; the others keep
    attention: a hybrid) becomes a :class:`LlamaMixerAttention` around a fresh ``mixer`` (d_model =
    ``config.hidden_size``; heads = ``n_heads`` or ``config.num_attention_heads``), on the old module's device and
    dtype. ``mixer_kwargs`` go to the constructor (``allow_neg_eigval``, ``n_householder`` for ``"deltaproduct"``,
    ``d_state``/``kind`` for ``"ssm"``, ``backend``, ``chunk_size``, ...). Returns ``model``."""
    if mixer not in MIXERS:
        raise ValueError(f"unknown mixer {mixer!r}; choose one of {sorted(MIXERS)}")
    ctor, has_heads = MIXERS[mixer]
    cfg = model.config
    if has_heads:
        n_heads = n_heads or cfg.num_attention_heads
    elif n_heads is not None:
        raise ValueError(f"mixer {mixer!r} has no heads; drop n_heads={n_heads}")
    _, all_layers = _layers(model)
    if layers is not None:
        layers = sorted({int(i) for i in layers})
        if not layers or layers[0] < 0 or layers[-1] >= len(all_layers):
            raise ValueError(f"layers must be a non-empty list of indices in [0, {len(all_layers)}), got {layers}")
    record = {"mixer": mixer, **({"n_heads": n_heads} if has_heads else {}),
              **({"layers": layers} if layers is not None else {}), **mixer_kwargs}
    try:  # checked up front so the config stays saveable
        json.dumps(record)
    except TypeError as e:
        raise ValueError(f"mixer arguments must be JSON-serializable to be recorded in the config: {e}") from None
    for i, layer in enumerate(all_layers):
        if layers is not None and i not in layers:
            continue
        old = layer.self_attn
        p = next(old.parameters(), None)
        m = ctor(cfg.hidden_size, n_heads, **mixer_kwargs) if has_heads else ctor(cfg.hidden_size, **mixer_kwargs)
        if p is not None:
            m = m.to(device=p.device, dtype=p.dtype)
        layer.self_attn = LlamaMixerAttention(m, getattr(old, "layer_idx", i))
    cfg.structmat_mixer = record
    return model


def rebuild_from_config(model: nn.Module, config=None) -> nn.Module:
    """Re-apply ``config.structmat_mixer`` (written by :func:`replace_attention`) to a freshly built model; a model
    without it is returned unchanged. The build hook :func:`structmat.load_pretrained` runs."""
    record = getattr(config if config is not None else model.config, "structmat_mixer", None)
    if not record:
        return model
    if not isinstance(record, dict) or "mixer" not in record:
        raise ValueError(f"config.structmat_mixer must be the dict replace_attention wrote, got {record!r}")
    return replace_attention(model, **record)


def _parts(model):
    base, layers = _layers(model)
    for l in layers:
        if not isinstance(l.self_attn, LlamaMixerAttention):
            raise ValueError("call replace_attention(model, ...) first: a layer still has HF attention")
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no LM head")
    return model.get_input_embeddings(), layers, base.norm, head


def mixer_prefill(model, input_ids: Tensor, attention_mask: Tensor | None = None):
    """Run a replaced model over a prompt and return ``(logits (B, T, V), caches)``, one MixerCache per layer.
    Mirrors ``LlamaDecoderLayer``: h += mixer(input_layernorm(h)); h += mlp(post_attention_layernorm(h)).
    ``attention_mask`` (B, T): 2-D, left padding only (a cache must end on a real token)."""
    embed, layers, norm, head = _parts(model)
    h, caches = embed(input_ids), []
    for l in layers:
        y, c = l.self_attn.mixer(l.input_layernorm(h), mask=attention_mask, use_cache=True)
        h = h + y
        h = h + l.mlp(l.post_attention_layernorm(h))
        caches.append(c)
    return head(norm(h)), caches


def mixer_step(model, token: Tensor, caches: list[MixerCache | None] | None = None):
    """Decode one token per row, ``token`` (B,); returns ``(logits (B, V), caches)`` (caches=None: empty prefix)."""
    embed, layers, norm, head = _parts(model)
    h, new = embed(token), []
    for i, l in enumerate(layers):
        y, c = l.self_attn.mixer.step(l.input_layernorm(h), None if caches is None else caches[i])
        h = h + y
        h = h + l.mlp(l.post_attention_layernorm(h))
        new.append(c)
    return head(norm(h)), new


def mixer_decode_logits(model, input_ids: Tensor, n_prefill: int = 1) -> Tensor:
    """Logits (B, T, V) from a prefill of the first ``n_prefill`` tokens, then one recurrent step per token.
    Equals ``model(input_ids).logits`` (tested): the exactness check of the decode path."""
    out, caches = [], None
    if n_prefill > 0:
        logits, caches = mixer_prefill(model, input_ids[:, :n_prefill])
        out.append(logits)
    for t in range(n_prefill, input_ids.shape[1]):
        logits, caches = mixer_step(model, input_ids[:, t], caches)
        out.append(logits[:, None])
    return torch.cat(out, 1)


@torch.no_grad()
def mixer_generate(model, input_ids: Tensor, max_new_tokens: int, attention_mask: Tensor | None = None) -> Tensor:
    """Greedy decoding with O(1) state per token; returns (B, T + max_new_tokens). Prompts: left padding only."""
    logits, caches = mixer_prefill(model, input_ids, attention_mask)
    out, nxt = [input_ids], logits[:, -1].argmax(-1)
    for i in range(max_new_tokens):
        out.append(nxt[:, None])
        if i + 1 < max_new_tokens:
            logits, caches = mixer_step(model, nxt, caches)
            nxt = logits.argmax(-1)
    return torch.cat(out, 1)


register_build_hook("structmat_mixer", rebuild_from_config)
