"""Wall-clock timing of a module's forward, for same-run ratios (never absolute claims across machines)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3, device=None) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA-synchronized when the device is a GPU)."""
    sync = torch.cuda.synchronize if (device is not None and torch.device(device).type == "cuda") else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def decode_tokens_per_s(model: torch.nn.Module, prompt_len: int = 2048, new_tokens: int = 64, vocab_size=None,
                        seed: int = 0, repeats: int = 3) -> dict:
    """Greedy decoding speed at batch 1 through HF ``generate`` (KV cache for attention, recurrent state for
    structmat mixers): tokens/s of the decode steps alone, ``(new_tokens - 1) / (t(new_tokens) - t(1))``, where
    ``t(n)`` is the median wall time of generating ``n`` tokens after a random ``prompt_len``-token prompt (so the
    prefill cancels out). On CUDA the model runs as it is (cast it first) and the clock is synchronized."""
    if prompt_len < 1 or new_tokens < 2:
        raise ValueError(f"decode_tokens_per_s: need prompt_len >= 1 and new_tokens >= 2, got {prompt_len}, "
                         f"{new_tokens}")
    device = next(model.parameters()).device
    vocab = vocab_size or model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(seed)).to(device)
    was_training = model.training
    model.eval()
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)

    def gen(n):
        return lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)

    try:
        t_one = median_ms(gen(1), repeats=repeats, warmup=1, device=device)
        t_all = median_ms(gen(new_tokens), repeats=repeats, warmup=1, device=device)
    finally:
        model.train(was_training)
    decode_s = max(t_all - t_one, 1e-9) / 1e3
    return {"prompt_len": prompt_len, "new_tokens": new_tokens, "batch": 1, "prefill_ms": t_one,
            "generate_ms": t_all, "decode_tokens_per_s": (new_tokens - 1) / decode_s}
