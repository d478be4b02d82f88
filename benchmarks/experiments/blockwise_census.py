"""The working sets behind the 1B-shape offloaded peak, counted on the CPU: live bytes of every op's output.

    PYTHONPATH=src python benchmarks/experiments/blockwise_census.py [--tokens 1024] [--out benchmarks/results]

On one block of the 1B-shaped Llama (hidden 2048, SwiGLU 8192, bf16, random weights), with a dispatch mode that
counts every storage an op creates until it dies (the weights and inputs made before it do not count; LAPACK's own
workspace is invisible here, cuSOLVER's is not on the GPU):
1. ``forward``: one calibration forward of ``--tokens`` tokens with the statistics hooks of the block's layers:
   peak minus the float32 statistics it leaves (the piece's working set);
2. ``projection``: structurize of down_proj (2048 x 8192) as lowrank@whitened ratio 0.5 on a full-rank float32
   Gram (the Cholesky path), the report's measurements included: peak above the weight and the Gram.
Writes ``blockwise-census-<UTC>.json``; the GPU run (``benchmarks/compress_gpu.py --stages llama1b``) measures the
same two working sets with the allocator's counters.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from structmat.calibrate import InputStats, collect_input_stats
from structmat.eval.results import run_info, write_json
from structmat.modules import linear_modules
from structmat.plan import Target
from structmat.surgery import structurize


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops create inside the mode and that are still alive; ``peak`` since the start."""

    def __init__(self, existing=()):
        super().__init__()
        self.old = {id(t.untyped_storage()) for t in existing}
        self.keep = [t.untyped_storage() for t in existing]  # their ids stay theirs
        self.tracked: set[int] = set()
        self.live = self.peak = 0

    def _free(self, key, size):
        self.tracked.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if id(storage) in self.old or id(storage) in self.tracked:
                    continue
                self.tracked.add(id(storage))
                self.live += storage.nbytes()
                weakref.finalize(storage, self._free, id(storage), storage.nbytes())
                self.peak = max(self.peak, self.live)
        return result


def main(argv=None) -> int:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=2048, attn_implementation="sdpa")  # as in the model
    torch.manual_seed(0)
    block = LlamaDecoderLayer(config, 0).to(torch.bfloat16).eval()
    rows = max(1, args.tokens // args.seq_len)
    hidden = torch.randn(rows, args.seq_len, 2048, dtype=torch.bfloat16)
    position_ids = torch.arange(args.seq_len).unsqueeze(0)
    cos, sin = LlamaRotaryEmbedding(config)(hidden, position_ids)
    names = list(linear_modules(block))
    params = list(block.parameters())
    with torch.no_grad(), LiveBytes([*params, hidden, cos, sin, position_ids]) as census:
        stats = collect_input_stats(block, names, lambda: block(hidden, position_embeddings=(cos, sin),
                                                                position_ids=position_ids), dtype=torch.float32)
    distinct = {id(s): s for s in stats.values()}.values()
    stats_bytes = sum((s.gram.numel() + s.abs_sum.numel()) * 4 for s in distinct)
    forward = {"tokens": hidden.shape[0] * hidden.shape[1], "peak_bytes": census.peak,
               "statistics_bytes": stats_bytes, "working_set_bytes": census.peak - stats_bytes}
    print("forward", forward, flush=True)
    del stats, distinct
    n = 8192
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * n, n, generator=gen)
    gram = InputStats.empty(n, dtype=torch.float32).update(x)  # full rank: Cholesky succeeds, as at 65536 tokens
    del x
    down = torch.nn.Sequential(block.mlp.down_proj)
    with LiveBytes([*params, gram.gram, gram.abs_sum]) as census:
        structurize(down, {"0": Target("lowrank:ratio=0.5", "whitened")}, calibration={"0": gram})
    projection = {"layer": "mlp.down_proj 2048 x 8192", "peak_bytes": census.peak,
                  "cholesky_factor_bytes": n * n * 4, "float32_weight_bytes": 2048 * n * 4,
                  "after_bytes": census.live}
    print("projection", projection, flush=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = write_json(Path(args.out) / f"blockwise-census-{stamp}.json",
                      {"forward": forward, "projection": projection,
                       "run_info": run_info(vars(args), seed=0, device="cpu")})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
