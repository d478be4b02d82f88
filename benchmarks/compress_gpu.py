"""Compression at LLM scale on a GPU (run on an H100/H200), all in ONE command of at most ~7 minutes:

    pip install -q --no-deps /tmp/smol/gguf-*.whl; PYTHONPATH=src timeout 420 python3 benchmarks/compress_gpu.py \
        --smollm2-gguf /tmp/smol/model.gguf --out $OUT

(``--smollm2-gguf`` also takes the GGUF in parts, concatenated in the order given: ``--smollm2-gguf a.part1
a.part2``; ``--smollm2-folder F`` uses an already converted HF folder instead.) Every stage runs as its own child
process under its own time limit (``--timeouts``, seconds), and the JSON is rewritten after every stage, so a stage
that fails or runs out of time costs only itself:

1. ``convert``: the SmolLM2-135M-Instruct GGUF (Q4_1) -> an HF folder under the scratch folder
   (``structmat.data.smollm2.convert_gguf``; needs ``gguf`` and ``accelerate``).
2. ``budget``: the default budget-solver ``structmat compress`` at 0.25/0.5/0.75 in ONE command (256 x 512
   calibration tokens, ``--device cuda``), timed end to end from outside (start-up, model load, calibration,
   pricing, solving, projection, saving and perplexity of every target included). Target: < 60 s.
3. ``llama1b``: a 1B-shaped Llama (hidden 2048, SwiGLU 8192, 16 layers, random bf16 weights written as safetensors
   shards and read back onto the CPU): layer-sequential compression with the model offloaded to the CPU (block
   forwards in pieces of 1024 tokens, the Compressor's default on CUDA). Peak GPU memory is recorded per block
   and per stage (inputs, onload, calibrate, project, propagate, offload; the peak statistics are reset after
   each) and compared, stage by stage, with what is resident from the shapes (every term in the JSON: the first
   block's inputs = activations + the block's other arguments, one block, its float32 statistics, its compressed
   layers while they are built; the weights outside the blocks only while the inputs are computed), and with that
   plus the working sets measured apart on a copy of block 0: one calibration forward piece, and the largest
   layer's projection.
   ``llama1b_all``: the same with ``offload="all"`` (activations and statistics on the CPU, Grams collected in
   column slices, each group of layers projected on the GPU where it fits one block + activations, else on the
   CPU): its peak against that bound, stage by stage.
4. ``table``: the SmolLM2 perplexity table on held-out stdlib text: dense; every single method at 50%
   (one-shot); the budget mix at 25/50/75%; SparseGPT 2:4 (and whitened SVD) one-shot vs sequential at 50%.
   The dense perplexity of the same run is the baseline (the device's stdlib may differ from another machine's).

Writes ``compress-gpu-<UTC timestamp>.json`` and ``smollm2-ppl-<UTC timestamp>.png`` into ``--out``. On a machine
without CUDA, ``--device cpu`` with ``--smollm2-folder`` (a tiny Llama folder) and ``--tiny`` runs every stage on
tiny sizes (the tests do).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
STAGES = ("convert", "budget", "llama1b", "llama1b_all", "table")
DEFAULT_TIMEOUTS = {"convert": 90, "budget": 100, "llama1b": 90, "llama1b_all": 240, "table": 120}


# ------------------------------------------------------------------------------------------------ 1. convert
def convert(parts: list[str], folder: Path) -> dict:
    from structmat.data.smollm2 import GGUF_NAME, convert_gguf

    start = time.perf_counter()
    if len(parts) == 1:
        source = Path(parts[0])
    else:  # the GGUF shipped in parts: join them in the order given
        source = folder.parent / "gguf" / GGUF_NAME
        source.parent.mkdir(parents=True, exist_ok=True)
        with open(source, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
    convert_gguf(source, folder)
    return {"gguf": [str(p) for p in parts], "gguf_bytes": source.stat().st_size, "folder": str(folder),
            "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------------- 2. budget
def budget(folder: Path, work: Path, calib_samples: int, seq_len: int, device: str, timeout: float,
           extra: list[str] = ()) -> dict:
    out = work / "smollm2-budget"
    cmd = [sys.executable, "-m", "structmat", "compress", "--model", str(folder), "--target-params", "0.25", "0.5",
           "0.75", "--calib-samples", str(calib_samples), "--seq-len", str(seq_len), "--device", device,
           "--out", str(out), *extra]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_child_env())
    except subprocess.TimeoutExpired as err:
        return {"command": "structmat " + " ".join(cmd[3:]), "timed_out_after_s": timeout,
                "stderr_tail": (err.stderr or b"")[-3000:].decode(errors="replace")
                if isinstance(err.stderr, bytes) else (err.stderr or "")[-3000:]}
    seconds = time.perf_counter() - start
    sys.stdout.write(proc.stdout[-3000:])
    sys.stderr.write(proc.stderr[-3000:])
    record = {"command": "structmat " + " ".join(cmd[3:]), "returncode": proc.returncode, "seconds_end_to_end": seconds,
              "stages_s": _stage_times(proc.stderr)}
    if proc.returncode:
        record["stderr_tail"] = proc.stderr[-3000:]
        return record
    result = json.loads((out / "compress.json").read_text())
    record["rows"] = [{"target": r["target"], "params_fraction": r["params_fraction"], "seconds": r["seconds"],
                       "ppl": r.get("quality", {}).get("ppl"), "mix": _mix(r["report"]["layers"])}
                      for r in result["results"]]
    record.update(target_seconds=60.0, met=seconds < 60.0)
    return record


STAGE_WORDS = "loaded|tokenized|calibrated|priced|sensitivities|solved|projected|saved|evaluated"


def _stage_times(log: str) -> dict[str, list[float]]:
    """The command's stage lines ("priced in 12.3 s", one per target for the per-target stages) as lists."""
    times: dict[str, list[float]] = {}
    for key, value in re.findall(rf"\b({STAGE_WORDS}) in ([0-9.]+) s", log):
        times.setdefault(key, []).append(float(value))
    return times


def _mix(layers: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer in layers:
        key = f"{layer['spec'].partition(':')[0]}@{layer['method']}"
        counts[key] = counts.get(key, 0) + 1
    return counts


# ------------------------------------------------------------------------------------------------ 3. llama1b
class StagePeaks:
    """``on_stage`` callback for :func:`structmat.compress.blockwise`: after each stage, the device's peak
    allocation during it and what is still allocated; then the peak statistics are reset for the next stage."""

    def __init__(self, device: str, base: int) -> None:
        self.cuda = device.startswith("cuda")
        self.base = base
        self.records: list[dict] = []

    def __call__(self, stage: str, block: int) -> None:
        if not self.cuda:
            self.records.append({"stage": stage, "block": block})
            return
        torch.cuda.synchronize()
        self.records.append({"stage": stage, "block": block,
                             "peak_bytes": torch.cuda.max_memory_allocated() - self.base,
                             "allocated_bytes": torch.cuda.memory_allocated() - self.base})
        torch.cuda.reset_peak_memory_stats()

    def summary(self) -> dict:
        if not self.cuda or not self.records:
            return {}
        top = max(self.records, key=lambda r: r["peak_bytes"])
        per_stage: dict[str, int] = {}
        for r in self.records:
            per_stage[r["stage"]] = max(per_stage.get(r["stage"], 0), r["peak_bytes"])
        resident = [r["allocated_bytes"] for r in self.records if r["stage"] == "offload"]
        return {"peak_stage": top["stage"], "peak_block": top["block"], "max_peak_by_stage": per_stage,
                "allocated_after_each_block": resident}


def _tensor_bytes(value, skip: set[int] = frozenset()) -> int:
    """Bytes of the distinct storages of the tensors in ``value`` (nested tuples/lists/dicts), ``skip``: storage
    pointers not to count."""
    seen = set(skip)
    total = 0

    def walk(v):
        nonlocal total
        if isinstance(v, torch.Tensor):
            ptr = v.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += v.untyped_storage().nbytes()
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (tuple, list)):
            for x in v:
                walk(x)
    walk(value)
    return total


def projection_working_set(weight: torch.Tensor, ratio: float) -> int:
    """Device bytes the whitened low-rank projection of ``weight`` (on a GPU) at ``ratio`` takes above the weight
    and its float32 Gram: a full-rank Gram of its width (Wishart, 2n samples: tame), the Cholesky path a run takes."""
    from structmat.calibrate import InputStats
    from structmat.project import project

    n = weight.shape[1]
    gen = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(n, 2 * n, device=weight.device, generator=gen)
    gram = x @ x.T
    del x
    stats = InputStats(gram, gram.diagonal().sqrt(), 2 * n)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    layer = project(weight, f"lowrank:ratio={ratio}", "whitened", stats)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del layer, stats, gram
    torch.cuda.empty_cache()
    return peak


def _probe_working_sets(model, blocks, batch: dict, device: str, forward_tokens: int, ratio: float) -> dict:
    """Measured apart from the run, on a copy of block 0 on the device: (1) the working set of one calibration
    forward piece (``forward_tokens`` tokens through the block with the statistics hooks of its layers, above the
    block, its inputs and the finished float32 statistics); (2) the working set of the largest-input layer's
    projection (lowrank@whitened at ``ratio``, on a full-rank Gram of its width: the Cholesky path the run takes),
    above its weight and Gram: the factor, the float32 copies, the new layer."""
    import copy

    from structmat.calibrate import collect_input_stats
    from structmat.compress import _capture_block_inputs, _move
    from structmat.modules import linear_modules

    dev = torch.device(device)
    seq = batch["input_ids"].shape[1]
    piece = {k: v[:max(1, forward_tokens // seq)] for k, v in batch.items()}
    (args, kwargs), = _capture_block_inputs(model, blocks[0], [piece])  # on the CPU, where the model is
    block = copy.deepcopy(blocks[0]).to(dev)
    args, kwargs = _move((args, kwargs), dev)
    names = list(linear_modules(block))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        stats = collect_input_stats(block, names, lambda: block(*args, **kwargs), dtype=torch.float32)
    torch.cuda.synchronize()
    distinct = {id(s): s for s in stats.values()}.values()
    stats_bytes = sum(s.gram.numel() * 4 + s.abs_sum.numel() * 4 for s in distinct)
    forward = torch.cuda.max_memory_allocated() - base - stats_bytes
    del stats, distinct
    modules = linear_modules(block)
    widest = max(names, key=lambda n: modules[n].in_features)
    projection = projection_working_set(modules[widest].weight, ratio)
    del block, args, kwargs
    torch.cuda.empty_cache()
    return {"forward_piece_tokens": piece["input_ids"].numel(), "forward_working_set_bytes": forward,
            "projection_layer": widest, "projection_working_set_bytes": projection}


def llama_1b(work: Path, calib_samples: int, seq_len: int, ratio: float, tiny: bool = False,
             device: str = "cuda", offload: str = "blocks") -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from structmat.compress import AUTO_FORWARD_TOKENS, Compressor, _capture_block_inputs, _hidden_in, find_blocks
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
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    _, blocks = find_blocks(model)
    block_bytes = sum(p.numel() * p.element_size() for p in blocks[0].parameters())
    outside_bytes = whole - block_bytes * len(blocks)
    batch = 8
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, config.vocab_size, (batch, seq_len), generator=g)}
               for _ in range(max(1, calib_samples // batch))]
    h, f = config.hidden_size, config.intermediate_size
    tokens = len(batches) * batch * seq_len
    cuda = device.startswith("cuda")
    forward_tokens = AUTO_FORWARD_TOKENS if cuda else None
    # What stays on the device, from the shapes: the first block's inputs of every batch, i.e. one bf16 hidden
    # state per calibration token plus the block's other arguments (position embeddings, ...: measured on one
    # batch here, on the CPU); one block; during its projection also its compressed layers (all built before the
    # swap); its float32 statistics: q/k/v share one Gram (h x h), o_proj (h x h), gate/up share one (h x h),
    # down_proj (f x f), each with a mean |x| vector
    (args, kwargs), = _capture_block_inputs(model, blocks[0], batches[:1])
    hidden = _hidden_in(args, kwargs)
    activation_bytes = tokens * h * 2
    kwargs_bytes = len(batches) * _tensor_bytes((args, kwargs), {hidden.untyped_storage().data_ptr()})
    del args, kwargs, hidden
    stats_bytes = (3 * h * h + f * f) * 4 + (3 * h + f) * 4
    if offload == "all":
        forward_tokens = AUTO_FORWARD_TOKENS // 2 if cuda else None  # the Compressor's auto for offload="all"
    probes = _probe_working_sets(model, blocks, batches[0], device, forward_tokens, ratio) \
        if cuda and offload == "blocks" else {}
    workspace = 0
    if cuda:  # cuBLAS's workspace (32 MiB on an H200, kept for the process) is allocated by the first product on
        # the stream, through the caching allocator: allocated here, before the base, as the probes do for the other
        # mode, so the peaks count what the compression holds
        before = torch.cuda.memory_allocated()
        torch.ones(16, 16, device=device) @ torch.ones(16, 16, device=device)
        torch.cuda.synchronize()
        workspace = torch.cuda.memory_allocated() - before
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    peaks = StagePeaks(device, base)
    start = time.perf_counter()
    comp = Compressor(model, batches, r".*layers\.\d+\..*", device=device, offload=offload, sequential=True,
                      progress=False, on_stage=peaks)
    done = comp.uniform({r".*": Target(f"lowrank:ratio={ratio}", "whitened")}, inplace=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    after = sum(p.numel() * p.element_size() for p in model.parameters())
    compressed_block_bytes = (after - outside_bytes) // len(blocks)  # every block has the same shapes and ranks
    inputs = activation_bytes + kwargs_bytes
    ids_bytes = sum(b["input_ids"].numel() * b["input_ids"].element_size() for b in batches)
    resident = {  # per stage, what is allocated and kept (no transient working memory)
        "inputs": outside_bytes + inputs + ids_bytes,  # the token ids visit the device for the embedding
        "onload": inputs + block_bytes,
        "calibrate": inputs + block_bytes + stats_bytes,
        "project": inputs + block_bytes + compressed_block_bytes + stats_bytes,
        "propagate": inputs + compressed_block_bytes,
        "offload": inputs + compressed_block_bytes}  # the stage starts with the block still on the device
    forward_ws = probes.get("forward_working_set_bytes", 0)
    projection_ws = probes.get("projection_working_set_bytes", 0)
    working = {"inputs": 0, "onload": 0, "calibrate": forward_ws, "project": projection_ws,
               "propagate": forward_ws, "offload": 0}
    bound = max(resident.values())
    bound_ws = max(resident[k] + working[k] for k in resident)
    peak = max((r.get("peak_bytes", 0) for r in peaks.records), default=0)
    summary = peaks.summary()
    by_stage = summary.get("max_peak_by_stage", {})
    if offload == "all":
        return _llama_1b_all_record(config, params, shards, setup, tokens, ratio, forward_tokens, seconds, done,
                                    peak, summary, peaks.records, block_bytes, compressed_block_bytes,
                                    outside_bytes, activation_bytes, whole, after, workspace)
    return {"config": {"hidden": h, "intermediate": f, "layers": config.num_hidden_layers, "vocab": config.vocab_size,
                       "params": params, "dtype": "bfloat16"},
            "shards": shards, "setup_seconds": setup, "calibration_tokens": tokens, "plan": f"lowrank@whitened "
            f"ratio={ratio}, sequential, offloaded", "forward_tokens": forward_tokens, "seconds": seconds,
            "layers": len(done.report.rows), "params_fraction": done.report.params_fraction,
            "peak_gpu_bytes": peak,
            "terms_bytes": {"one_block": block_bytes, "one_compressed_block": compressed_block_bytes,
                            "outside_blocks": outside_bytes, "activations": activation_bytes,
                            "block_kwargs": kwargs_bytes, "token_ids": ids_bytes, "one_block_stats": stats_bytes,
                            **probes},
            "one_block_plus_activations_bytes": block_bytes + activation_bytes,
            "peak_over_one_block_plus_activations": peak / (block_bytes + activation_bytes),
            "peak_over_whole_model": peak / whole,
            "resident_by_stage_bytes": resident,
            "resident_between_blocks_bytes": inputs,  # vs peaks.allocated_after_each_block (measured)
            "between_blocks_as_predicted": all(b == inputs for b in summary.get("allocated_after_each_block", [])),
            "bound_bytes": bound, "bound": "max over stages of what is resident: the first block's inputs "
            "(activations + block_kwargs) + one block + its float32 statistics + its compressed layers while they "
            "are built (the weights outside the blocks instead, while the inputs are computed)",
            "within_bound": peak <= bound,
            "bound_with_working_sets_bytes": bound_ws if cuda else None,
            "bound_with_working_sets": "per stage, the resident bytes + the measured working set of that stage's "
            "step (calibrate, propagate: one forward piece; project: the largest layer's projection)",
            "within_bound_with_working_sets": (all(by_stage.get(k, 0) <= resident[k] + working[k] for k in resident)
                                               if cuda else None),
            "excess_over_bound_by_stage_bytes": {k: by_stage[k] - resident[k] - working[k] for k in by_stage},
            "peaks": summary, "stage_records": peaks.records,
            "whole_model_bytes_before": whole, "whole_model_bytes_after": after}


def _llama_1b_all_record(config, params, shards, setup, tokens, ratio, forward_tokens, seconds, done, peak, summary,
                         records, block_bytes, compressed_block_bytes, outside_bytes, activation_bytes, whole,
                         after, workspace) -> dict:
    """The ``offload="all"`` run's record: the device holds no activations, statistics or weights outside the
    blocks; its budget (the Compressor's default) is one block + the calibration activations, and every stage's
    peak is compared with it."""
    bound = block_bytes + activation_bytes
    by_stage = summary.get("max_peak_by_stage", {})
    return {"config": {"hidden": config.hidden_size, "intermediate": config.intermediate_size,
                       "layers": config.num_hidden_layers, "vocab": config.vocab_size, "params": params,
                       "dtype": "bfloat16"},
            "shards": shards, "setup_seconds": setup, "calibration_tokens": tokens,
            "plan": f"lowrank@whitened ratio={ratio}, sequential, offload='all'", "forward_tokens": forward_tokens,
            "seconds": seconds, "layers": len(done.report.rows), "params_fraction": done.report.params_fraction,
            "peak_gpu_bytes": peak,
            "terms_bytes": {"one_block": block_bytes, "one_compressed_block": compressed_block_bytes,
                            "outside_blocks": outside_bytes, "activations": activation_bytes},
            "base_excludes": {"cublas_workspace_bytes": workspace, "note": "allocated before the base by a "
                              "16x16 product (the other mode's probes allocate it the same way)"},
            "one_block_plus_activations_bytes": bound,
            "peak_over_one_block_plus_activations": peak / bound,
            "peak_over_whole_model": peak / whole,
            "within_one_block_plus_activations": peak <= bound,
            "stages_within_bound": {k: v <= bound for k, v in by_stage.items()},
            "allocated_between_blocks_bytes": summary.get("allocated_after_each_block", []),
            "peaks": summary, "stage_records": records,
            "whole_model_bytes_before": whole, "whole_model_bytes_after": after}


# -------------------------------------------------------------------------------------------------- 4. table
# The table's rows in the order they run, the must-show rows first (a stage cut by its limit keeps those):
# label@target[:mode]; labels are structmat.eval.compression_sweep.METHODS.
TABLE_ROWS = ("budget mix@0.5,whitened SVD@0.5,N:M SparseGPT@0.5,N:M Wanda@0.5,N:M SparseGPT@0.5:sequential,"
              "budget mix@0.5:sequential,SVD@0.5,ASVD@0.5,budget mix@0.25,budget mix@0.75,whitened Monarch@0.5,"
              "block-diagonal@0.5,Monarch@0.5")


def parse_table_rows(text: str) -> list[tuple[str, float, str]]:
    from structmat.eval.compression_sweep import METHODS

    rows = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        label, _, rest = item.rpartition("@")
        target, _, mode = rest.partition(":")
        mode = mode or "one-shot"
        if label not in METHODS or mode not in ("one-shot", "sequential"):
            raise SystemExit(f"compress_gpu: table row {item!r}: write label@target[:one-shot|sequential] with a "
                             f"label from {', '.join(METHODS)}")
        rows.append((label, float(target), mode))
    return rows


def smollm2_table(folder: Path, out: Path, stamp: str, calib_samples: int, seq_len: int, eval_files: int,
                  eval_window: int, eval_tokens: int, device: str, partial: Path, table_rows: str = TABLE_ROWS
                  ) -> dict:
    """Dense, then every row of ``table_rows`` in order (one line per row into ``partial``)."""
    from structmat.compress import Compressor
    from structmat.data.corpus import corpus_from_spec, manifest, split_files, token_stream
    from structmat.data.models import calibration_batches, load_model
    from structmat.eval.compression_sweep import (BLOCK_LAYERS, format_rows, perplexity_row_log, plot_frontier,
                                                  rows_as_dicts, run_sweep)
    from structmat.eval.perplexity import perplexity

    plan = parse_table_rows(table_rows)
    torch.manual_seed(0)
    loaded = load_model(str(folder))
    train, val = split_files(corpus_from_spec("stdlib"))
    batches = calibration_batches(loaded, train, calib_samples, seq_len)
    tokens = token_stream(val[:eval_files], loaded.tokenizer)
    if eval_tokens:
        tokens = tokens[:eval_tokens]
    quality = lambda m: perplexity(m, tokens, window=eval_window, device=device)  # noqa: E731
    model = loaded.model.to(device)
    start = time.perf_counter()
    dense = quality(model)
    dense["seconds"] = time.perf_counter() - start
    print(f"dense perplexity {dense['ppl']:.3f} on {tokens.numel()} held-out tokens", flush=True)
    on_row = perplexity_row_log(partial, dense)
    comps = {mode: Compressor(model, batches, BLOCK_LAYERS, device=device, sequential=mode == "sequential")
             for mode in ("one-shot", "sequential")}
    comps["sequential"].share_cache(comps["one-shot"])  # one calibration, one pricing for both modes
    common = dict(scope=BLOCK_LAYERS, quality_fn=quality, device=device, on_row=on_row, compressors=comps)
    rows = []
    for label, target, mode in plan:
        rows += run_sweep(model, batches, targets=[target], methods=[label], modes=(mode,), **common)
    print(format_rows(rows, dense), flush=True)
    half = {r.method: r.ppl for r in rows if r.target == 0.5 and r.mode == "one-shot"}
    singles = {k: v for k, v in half.items() if k != "budget mix"}
    best_single = min(singles, key=singles.get) if singles else None
    seq = {(r.method, r.mode): r.ppl for r in rows if r.target == 0.5}
    checks = {
        "mix_beats_every_single_method_at_50": (half.get("budget mix") is not None and best_single is not None
                                                and half["budget mix"] < singles[best_single]),
        "best_single_method_at_50": best_single,
        "sparsegpt_sequential_no_worse_than_one_shot": seq.get(("N:M SparseGPT", "sequential"), float("inf"))
        <= seq.get(("N:M SparseGPT", "one-shot"), float("-inf")),
    }
    png = out / f"smollm2-ppl-{stamp}.png"
    plot_frontier(rows, png, f"{folder.name}: perplexity vs linear-layer params", dense)
    return {"model": str(folder), "dense": dense, "rows": rows_as_dicts(rows), "checks": checks,
            "calibration": {"samples": calib_samples, "seq_len": seq_len},
            "eval": {"files": eval_files, "window": eval_window, "tokens": int(tokens.numel())},
            "corpus": {"validation": manifest(val[:eval_files])}, "png": str(png)}


# --------------------------------------------------------------------------------------------------- driver
def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _run_stage(stage: str, args: argparse.Namespace, work: Path, result: Path, timeout: float) -> dict:
    """Run one stage in a child process under ``timeout`` seconds; its JSON record (or what went wrong)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--result", str(result),
           "--work", str(work)] + args.passthrough
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=timeout, env=_child_env())
    except subprocess.TimeoutExpired:
        return {"timed_out_after_s": timeout, **_partial_rows(work, stage)}
    seconds = time.perf_counter() - start
    if proc.returncode or not result.is_file():
        return {"returncode": proc.returncode, "seconds": seconds, "error": "the stage failed; see its output",
                **_partial_rows(work, stage)}
    record = json.loads(result.read_text())
    record["stage_seconds"] = seconds
    return record


def _partial_rows(work: Path, stage: str) -> dict:
    """What a stage cut short had already measured (the table writes one line per finished row)."""
    rows = work / f"{stage}-rows.jsonl"
    if not rows.is_file():
        return {}
    return {"partial_rows": [json.loads(line) for line in rows.read_text().splitlines() if line.strip()]}


def _stage_main(args: argparse.Namespace) -> int:
    work = Path(args.work)
    folder = Path(args.smollm2_folder) if args.smollm2_folder else work / "smollm2"
    tiny = args.tiny
    if args.stage == "convert":
        record = convert(args.smollm2_gguf, folder)
    elif args.stage == "budget":
        extra = ["--eval-files", "1", "--eval-window", "64"] if tiny else []
        record = budget(folder, work, args.calib_samples, args.seq_len, args.device, args.budget_timeout, extra)
    elif args.stage in ("llama1b", "llama1b_all"):
        record = llama_1b(work, args.calib_samples_1b, args.seq_len if not tiny else 32, args.ratio_1b, tiny=tiny,
                          device=args.device, offload="all" if args.stage == "llama1b_all" else "blocks")
    else:
        record = smollm2_table(folder, Path(args.out), args.stamp, args.table_calib_samples, args.seq_len,
                               args.eval_files, args.eval_window, args.eval_tokens, args.device,
                               work / "table-rows.jsonl", args.table_rows)  # read back by _partial_rows if cut short
    Path(args.result).write_text(json.dumps(record, indent=1, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work", default=None, help="scratch folder for models (default: a temp folder)")
    parser.add_argument("--smollm2-gguf", nargs="+", default=None, help="the SmolLM2 GGUF file (or its parts)")
    parser.add_argument("--smollm2-folder", default=None, help="an HF folder of SmolLM2 (skips the conversion)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--timeouts", default=",".join(f"{k}={v}" for k, v in DEFAULT_TIMEOUTS.items()),
                        help="seconds per stage, e.g. convert=75,budget=100")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--table-calib-samples", type=int, default=128)
    parser.add_argument("--eval-files", type=int, default=16)
    parser.add_argument("--eval-window", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=0, help="table: only the first N held-out tokens")
    parser.add_argument("--table-rows", default=TABLE_ROWS, help="table: rows in order, label@target[:mode], "
                        "comma-separated (default: the must-show rows first)")
    parser.add_argument("--ratio-1b", type=float, default=0.5)
    parser.add_argument("--calib-samples-1b", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes for the 1B stage and the budget's eval "
                        "(a smoke test on any device)")
    parser.add_argument("--stage", choices=STAGES, default=None, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stamp", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--budget-timeout", type=float, default=1e9, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        return _stage_main(args)

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    timeouts = dict(DEFAULT_TIMEOUTS)
    for item in filter(None, args.timeouts.split(",")):
        key, _, value = item.partition("=")
        if key not in STAGES or not value:
            raise SystemExit(f"compress_gpu: --timeouts takes stage=seconds with stages {STAGES}, got {item!r}")
        timeouts[key] = float(value)
    if unknown:
        raise SystemExit(f"compress_gpu: unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    if "table" in stages:
        parse_table_rows(args.table_rows)  # a typo fails now, not after the conversion
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("compress_gpu: needs a CUDA GPU (or --device cpu with --tiny for a smoke test)", file=sys.stderr)
        return 2
    if "convert" in stages and not args.smollm2_gguf:
        stages.remove("convert")
        if not args.smollm2_folder and ({"budget", "table"} & set(stages)):
            raise SystemExit("compress_gpu: give --smollm2-gguf FILE [PART ...] or --smollm2-folder FOLDER "
                             "(or --stages llama1b)")
    from structmat.eval.results import run_info, write_json

    work = Path(args.work or tempfile.mkdtemp(prefix="structmat-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    keep = ["--device", args.device, "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len),
            "--table-calib-samples", str(args.table_calib_samples), "--eval-files", str(args.eval_files),
            "--eval-window", str(args.eval_window), "--eval-tokens", str(args.eval_tokens),
            "--table-rows", args.table_rows,
            "--ratio-1b", str(args.ratio_1b), "--calib-samples-1b", str(args.calib_samples_1b), "--out", args.out,
            "--stamp", stamp,
            # the command's own limit well inside the stage's, so a cut command still leaves its output tail
            # (13:20Z: the stage's limit struck first and nothing was recorded)
            "--budget-timeout", str(max(1.0, timeouts["budget"] - 20))]
    if args.smollm2_gguf:
        keep += ["--smollm2-gguf", *args.smollm2_gguf]
    if args.smollm2_folder:
        keep += ["--smollm2-folder", args.smollm2_folder]
    if args.tiny:
        keep.append("--tiny")
    args.passthrough = keep
    payload: dict = {"run_info": run_info({k: v for k, v in vars(args).items() if k != "passthrough"}, seed=0,
                                          device=args.device)}
    path = Path(args.out) / f"compress-gpu-{stamp}.json"
    for stage in stages:
        print(f"== {stage} (limit {timeouts[stage]:.0f} s)", flush=True)
        payload[stage] = _run_stage(stage, args, work, work / f"{stage}.json", timeouts[stage])
        write_json(path, payload)
        print(json.dumps({k: v for k, v in payload[stage].items() if k not in ("stage_records", "rows")},
                         indent=1, default=str)[:2500], flush=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
