"""Compression at LLM scale on a GPU (run on an H100/H200).

1. SmolLM2-135M: the default budget-solver ``structmat compress`` at 0.25/0.5/0.75 in ONE command (256 x 512
   calibration tokens, --device cuda), timed end to end from outside (model load, calibration, pricing, solving,
   projection, saving and perplexity of every target included).
2. A 1B-shaped Llama (hidden 2048, SwiGLU 8192, 16 layers, random bf16 weights written as safetensors shards and
   read back onto the CPU): layer-sequential compression with the model offloaded to the CPU; peak GPU memory is
   compared with one block's weights + its statistics + the calibration activations (computed from the shapes).

    python benchmarks/compress_gpu.py --out benchmarks/results [--skip-smollm2] [--skip-1b]

Writes ``compress-gpu-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def smollm2_budget(work: Path, calib_samples: int, seq_len: int) -> dict:
    out = work / "smollm2-budget"
    cmd = [sys.executable, "-m", "structmat", "compress", "--model", "smollm2", "--target-params", "0.25", "0.5",
           "0.75", "--calib-samples", str(calib_samples), "--seq-len", str(seq_len), "--device", "cuda",
           "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    sys.stdout.write(proc.stdout[-4000:])
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode:
        return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "seconds": seconds,
                "stderr_tail": proc.stderr[-2000:]}
    result = json.loads((out / "compress.json").read_text())
    rows = [{"target": r["target"], "params_fraction": r["params_fraction"], "seconds": r["seconds"],
             "ppl": r.get("quality", {}).get("ppl"),
             "mix": _mix(r["report"]["layers"])} for r in result["results"]]
    return {"command": "structmat " + " ".join(cmd[3:]), "returncode": 0, "seconds_end_to_end": seconds,
            "target_seconds": 60.0, "met": seconds < 60.0, "rows": rows}


def _mix(layers: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer in layers:
        key = f"{layer['spec'].partition(':')[0]}@{layer['method']}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def llama_1b(work: Path, calib_samples: int, seq_len: int, ratio: float, tiny: bool = False,
             device: str = "cuda") -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from structmat.compress import Compressor, find_blocks
    from structmat.plan import Target

    sizes = dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2) if tiny else \
        dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16)
    config = LlamaConfig(**sizes, num_attention_heads=32 if not tiny else 4, num_key_value_heads=8 if not tiny else 2,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    folder = work / "llama-1b"
    start = time.perf_counter()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="500MB", safe_serialization=True)
    del model
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, local_files_only=True).eval()
    setup = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    _, blocks = find_blocks(model)
    block_bytes = sum(p.numel() * p.element_size() for p in blocks[0].parameters())
    outside_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - block_bytes * len(blocks)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, config.vocab_size, (8, seq_len), generator=g)}
               for _ in range(calib_samples // 8)]
    h, f = config.hidden_size, config.intermediate_size
    tokens = calib_samples * seq_len
    # one hidden state per calibration token (bf16), kept between blocks; statistics of one block in float32:
    # q/k/v share one Gram (h x h), o_proj (h x h), gate/up share one (h x h), down_proj (f x f)
    activation_bytes = tokens * h * 2
    stats_bytes = (3 * h * h + f * f) * 4
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    comp = Compressor(model, batches, r".*layers\.\d+\..*", device=device, offload=True, sequential=True,
                      progress=False)
    done = comp.uniform({r".*": Target(f"lowrank:ratio={ratio}", "whitened")}, inplace=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    bound = outside_bytes + block_bytes + stats_bytes + 2 * activation_bytes
    return {"config": {"hidden": h, "intermediate": f, "layers": config.num_hidden_layers, "vocab": config.vocab_size,
                       "params": params, "dtype": "bfloat16"},
            "shards": shards, "setup_seconds": setup, "calibration_tokens": tokens, "plan": f"lowrank@whitened "
            f"ratio={ratio}, sequential, offloaded", "seconds": seconds, "layers": len(done.report.rows),
            "params_fraction": done.report.params_fraction, "peak_gpu_bytes": peak,
            "one_block_bytes": block_bytes, "outside_blocks_bytes": outside_bytes,
            "one_block_stats_bytes": stats_bytes, "activation_bytes": activation_bytes,
            "bound_bytes": bound, "bound": "outside-blocks weights + one block + its float32 statistics + "
            "2 x activations (the block's inputs and outputs)", "within_bound": peak <= bound,
            "whole_model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work", default=None, help="scratch folder for models (default: a temp folder)")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--skip-1b", action="store_true")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--ratio-1b", type=float, default=0.5)
    parser.add_argument("--calib-samples-1b", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="a smoke test of the 1B path on a tiny shape (any device)")
    args = parser.parse_args(argv)
    if args.tiny:
        print(json.dumps(llama_1b(Path(tempfile.mkdtemp()), 16, 32, args.ratio_1b, tiny=True, device="cpu"),
                         indent=1))
        return 0
    if not torch.cuda.is_available():
        print("compress_gpu: needs a CUDA GPU", file=sys.stderr)
        return 2
    from structmat.eval.results import run_info, write_json

    work = Path(args.work or tempfile.mkdtemp(prefix="structmat-gpu-"))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    payload: dict = {"run_info": run_info(vars(args), seed=0, device="cuda")}
    path = Path(args.out) / f"compress-gpu-{stamp}.json"
    if not args.skip_smollm2:
        payload["smollm2_budget"] = smollm2_budget(work, args.calib_samples, args.seq_len)
        write_json(path, payload)
        print(json.dumps(payload["smollm2_budget"], indent=1)[:3000], flush=True)
    if not args.skip_1b:
        payload["llama_1b_sequential"] = llama_1b(work, args.calib_samples_1b, args.seq_len, args.ratio_1b)
        print(json.dumps(payload["llama_1b_sequential"], indent=1), flush=True)
    print(f"wrote {write_json(path, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
