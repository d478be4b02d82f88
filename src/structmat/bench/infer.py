"""Inference benchmark: a dense Llama and the same shape with every linear layer of its blocks structured.

Run on a CUDA GPU:  ``structmat bench infer [--quick] [--out benchmarks/results]``
(``PYTHONPATH=src python -m structmat.bench.infer`` works too).

For each model (dense and each structure of ``--structures``; ``--checkpoint DIR`` adds a model saved by
``structmat compress`` / ``save_pretrained``, reloaded with ``load_pretrained``), in ``--dtype`` on one GPU:
  ``param_bytes``          parameters + buffers
  ``after_forward_bytes``  ``torch.cuda.memory_allocated`` after two forwards of 1 x 512 tokens, outputs released
                           (what the model holds: parameters, plus anything a forward leaves behind), and
  ``before_forward_bytes`` the same before that forward; both minus what the process held before the model
                           was built (``baseline_bytes``). Memory is measured for every model first, before
                           anything is timed, compiled or captured, with the process's cuBLAS workspaces allocated
                           before the first baseline
  ``hidden``               live tensors beside the parameters (by owner), ``untracked_bytes`` the rest of
                           after_forward beyond parameters and those (allocator-held); ``--memory-history`` adds
                           ``untracked_by_frame``, the allocating Python frames of those bytes
  ``peak_bytes``           the peak of a second such forward, minus the baseline (steady state); the first
                           forward's (``first_peak_bytes``, ``after_first_forward_bytes``) also holds one-time work:
                           Triton's autotuner flushes L2 with a 256 MB buffer while it times the grouped GEMM's tiles
  ``prefill_tps``          tokens/s of one forward over ``--prefill`` (batch x tokens, logits of the last token)
  ``prefill_compiled``     the same forward compiled by inductor (``--prefill-compile-mode``, static shapes; by
                           default each decoder block, ``--prefill-compile-scope``): norms, rotary embedding and the
                           MLP's activation fused, as a serving stack that compiles its forward runs prefill; graphs
                           compiled and the compile time are kept
  ``eager``/``compiled``   HF ``generate`` (greedy, a 16-token prompt, ``--new-tokens`` new tokens forced with
                           ``min_new_tokens``): decode tokens/s = batch x (new - 1) / (t(new) - t(1)), i.e. the prefill
                           and first token cancel; eager = ``disable_compile``; compiled = static cache with HF's
                           ``CompileConfig(backend=--compile-backend, mode=--compile-mode)``, graphs counted
  ``graph``                one decode step (static cache) captured in a CUDA graph and replayed: the GPU time
                           of a token without host cost, at each ``--batches``
  ``graph_compiled``       the same step compiled by inductor first (``--step-compile-mode``; elementwise work
                           fused), then captured: a serving loop's decode without HF ``generate``'s host loop
  ``kernels``              per distinct structured layer shape: the layer's few-token product (auto dispatch)
                           replayed from a CUDA graph vs dense ``F.linear`` the same way, and the achieved GB/s
                           on the structure's own weight bytes
The ``floor`` model (``--structures floor``, or ``floor1``/``floor2``) is the dense model with every block linear
replaced by a stand-in that reads no weight (``FloorLinear``): its speed over dense bounds what any structure of the
block linears can reach at this shape, measured the same way.
Speed is reported as a ratio to the dense model measured in the same run. Writes ``infer-<UTC>.json`` and a PNG.
Compiled rows keep dynamo's recompile and graph-break reasons (``compiled_dynamo_log``). A round that must survive a
kernel fault (which poisons the CUDA context) runs each structure in its own process (``--no-dense``) and combines
the files with ``--merge`` (``benchmarks/experiments/gpu_round_infer.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

FUSED = "+fused"  # a structure name ending in it is built, then its siblings fused (structmat.fuse_siblings)
STRUCTURES = {"lowrank": "lowrank:ratio=0.5", "monarch": "monarch:nblocks=4,ratio=0.5",
              "blockdiag": "blockdiag:nblocks=4", "nm24": "nm:n=2,m=4"}
BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32000)
PROMPT = 16
#: The measurements of each model, in the order they run (``--steps`` picks some); the compiled ones reset dynamo
STEPS = ("prefill_tps", "graph", "eager", "kernels", "prefill_compiled", "graph_compiled", "compiled")
COMPILED_STEPS = ("prefill_compiled", "graph_compiled", "compiled")


def _sync() -> None:
    torch.cuda.synchronize()


def build(structure: str | None, dtype: torch.dtype, shape: dict, seed: int = 0, device: str = "cuda"):
    from structmat.surgery import Plan
    from structmat.train.models import llama_config, structure_fresh

    from transformers import LlamaForCausalLM

    config = llama_config("125m", shape["vocab_size"], max_seq_len=4096,
                          **{k: v for k, v in shape.items() if k != "vocab_size"})
    config.use_cache = True
    fused = structure is not None and structure.endswith(FUSED)  # e.g. "lowrank+fused": structmat.fuse_siblings
    structure = structure[: -len(FUSED)] if fused else structure
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if structure is not None:
        structure_fresh(model, Plan([(BLOCK_LINEARS, STRUCTURES.get(structure, structure))]))
    if fused:
        from structmat.siblings import fuse_siblings

        fuse_siblings(model)  # q/k/v and gate/up of every block: one few-token product each
    return model.eval()


class FloorLinear(torch.nn.Module):
    """A stand-in for a linear layer that reads no weight (the ``floor`` model): ``kernels`` = 0 returns a view of a
    zero buffer (nothing is launched), 1 launches one zero fill of the output, 2 a fill and a dependent in-place add
    (two launches, as a two-stage structure pays). It ignores its input, so under an optimizing compiler (inductor)
    everything that only feeds the linears is dead code: the floor bounds eager, captured and HF-generate decode,
    not an inductor-compiled step (measured 0.076 ms there, the attention and norms removed)."""

    def __init__(self, in_features: int, out_features: int, kernels: int = 0, device=None, dtype=None) -> None:
        super().__init__()
        if kernels not in (0, 1, 2):
            raise ValueError(f"FloorLinear: kernels={kernels!r}; give 0, 1 or 2")
        self.in_features, self.out_features, self.kernels = in_features, out_features, kernels
        self.register_buffer("zero", torch.zeros(out_features, device=device, dtype=dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        if self.kernels == 0:
            return self.zero.expand(shape)
        y = torch.zeros(shape, device=x.device, dtype=x.dtype)
        return y.add_(y) if self.kernels == 2 else y


def floor_model(dtype: torch.dtype, shape: dict, kernels: int = 0, device: str = "cuda"):
    """The dense model with every linear layer of its blocks replaced by a :class:`FloorLinear`: everything that is
    not a block linear (norms, rotary, attention, cache writes, lm_head, the host loop) at its real cost, the block
    linears at none. dense / floor bounds the decode speedup any structure of the block linears can reach."""
    model = build(None, dtype, shape, device=device)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, FloorLinear(child.in_features, child.out_features, kernels,
                                                      child.weight.device, dtype))
    return model


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def warm_process_buffers(dtype: torch.dtype) -> None:
    """Allocate what the process keeps for its lifetime on the current stream before any baseline is taken: cuBLAS
    and cuBLASLt workspaces (32 MiB each on Hopper, held per stream). Measured after a model is built, they were
    counted as that model's memory (before this, every model that first ran a GEMM "held" 32 MiB more)."""
    a = torch.randn(64, 64, device="cuda", dtype=dtype)
    for d in (dtype, torch.float32):
        (a.to(d) @ a.to(d)).sum().item()
    torch.nn.functional.linear(a, a).sum().item()


def _history_attribution(own: set[int], limit: int = 8) -> list[dict]:
    """Live allocator blocks that are not the model's parameters/buffers and were allocated while the memory history
    was recorded, summed by the innermost frames of their allocation (what the bytes are)."""
    snap = torch.cuda.memory._snapshot()
    groups: dict[str, int] = {}
    for seg in snap.get("segments", []):
        addr = seg["address"]
        for blk in seg.get("blocks", []):
            start, size = addr, blk["size"]
            addr += size
            if blk.get("state") != "active_allocated" or start in own:
                continue
            frames = [f for f in blk.get("frames", []) if f.get("filename", "").endswith(".py")
                      and "/torch/cuda/memory" not in f["filename"]]
            if not frames:  # allocated before the recording started (the baseline)
                continue
            where = " <- ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames[:4])
            groups[where] = groups.get(where, 0) + size
    return [dict(bytes=b, where=w) for w, b in sorted(groups.items(), key=lambda kv: -kv[1])[:limit]]


def memory(model, baseline: int, census: dict | None = None, history: bool = False) -> dict:
    """``baseline``: bytes allocated before the model was built (what the process held already); ``census``: the
    live tensors then (``structmat.inference.live_storages``), so tensors the build or the forward left beside the
    model are listed by owner (``hidden``); ``untracked_bytes`` is what the allocator holds beyond the parameters
    and those tensors (C++-side buffers). ``history``: the allocator's memory history was recorded since before the
    build; the live non-parameter blocks are attributed to the Python frames that allocated them."""
    from structmat.inference import hidden_tensors

    gc.collect()
    torch.cuda.empty_cache()
    _sync()
    before = torch.cuda.memory_allocated() - baseline
    ids = torch.randint(0, model.config.vocab_size, (1, 512), device="cuda")
    afters, peaks = [], []
    for _ in range(2):  # the first forward also tunes and plans (Triton's autotuner flushes L2 with a 256 MB buffer)
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False)
        del out
        gc.collect()
        _sync()
        afters.append(torch.cuda.memory_allocated() - baseline)
        peaks.append(torch.cuda.max_memory_allocated() - baseline)
    del ids
    params = model_bytes(model)
    row = dict(param_bytes=params, baseline_bytes=baseline, before_forward_bytes=before,
               after_first_forward_bytes=afters[0], after_forward_bytes=afters[1], first_peak_bytes=peaks[0],
               peak_bytes=peaks[1])
    after = afters[1]
    if census is not None:
        hidden = hidden_tensors(model, census, "cuda")
        row["hidden_bytes"] = sum(r["bytes"] for r in hidden)
        row["hidden"] = hidden[:8]
        row["untracked_bytes"] = after - params - row["hidden_bytes"]
    if history:
        own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        try:  # (a diagnostic: its failure must not lose the measurement)
            row["untracked_by_frame"] = _history_attribution(own)
        except Exception as err:
            row["untracked_by_frame"] = f"failed: {err!r}"[:500]
    return row


def _time_ms(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def prefill_tps(model, batch: int, tokens: int, reps: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), device="cuda")
    with torch.no_grad():
        ms = _time_ms(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), reps)
    return batch * tokens / ms * 1e3


@contextlib.contextmanager
def compiled_forward(model, scope: str, mode: str = "default"):
    """The model with its forward compiled by inductor (static shapes) inside the block, restored after. ``scope``
    "blocks": each decoder block replaced by its compiled form (regional compilation: the blocks share one compiled
    graph; the embedding, the causal mask and the head stay eager); "model": the whole forward. Whole-model
    compilation on torch < 2.14 makes transformers build the causal mask as a tensor (it cannot skip it while
    tracing), and SDPA then takes a masked kernel: measured 3.2x the attention time of the unmasked causal one on the
    H200 (session 20, prefill-fused-20261205T043732Z.json); compiled blocks receive the mask the eager model builds
    (none: causal)."""
    mode_arg = None if mode == "default" else mode
    if scope == "model":
        yield torch.compile(model, mode=mode_arg, dynamic=False)
        return
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"compiled_forward: {type(model).__name__} has no model.layers to compile block by block; "
                         "use scope='model'")
    originals = list(layers)
    try:
        for i, layer in enumerate(originals):
            layers[i] = torch.compile(layer, mode=mode_arg, dynamic=False)
        yield model
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def prefill_compiled_tps(model, batch: int, tokens: int, reps: int, mode: str, scope: str = "blocks") -> dict:
    """``prefill_tps`` with the forward compiled by inductor (:func:`compiled_forward`): the first call compiles
    (timed apart), then the median of ``reps`` forwards."""
    from torch._dynamo.utils import counters

    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), device="cuda")
    graphs_before = counters["stats"]["unique_graphs"]
    graphs = "reduce-overhead" in mode or mode == "max-autotune"  # (inductor's CUDA-graph modes)

    def run():
        if graphs:  # each forward a new step: the last one's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(input_ids=ids, use_cache=False, logits_to_keep=1)

    with compiled_forward(model, scope, mode) as compiled, torch.no_grad():
        t0 = time.perf_counter()
        run()
        _sync()
        compile_s = time.perf_counter() - t0
        ms = _time_ms(run, reps)
    return dict(tokens_per_s=batch * tokens / ms * 1e3, compile_s=compile_s, mode=mode, scope=scope,
                graphs_compiled=counters["stats"]["unique_graphs"] - graphs_before)


def generate_tps(model, batch: int, new_tokens: int, compiled: bool, backend: str, mode: str, reps: int) -> dict:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import CompileConfig

    ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), device="cuda")
    mask = torch.ones_like(ids)

    def cfg(n):
        c = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None,
                             cache_implementation="static" if compiled else None, disable_compile=not compiled)
        if compiled:  # (only inductor takes a mode)
            c.compile_config = CompileConfig(backend=backend, mode=mode if backend == "inductor" else None,
                                             fullgraph=False)
        return c

    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    run = lambda n: model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg(n))  # noqa: E731
    with torch.no_grad():
        t1 = _time_ms(lambda: run(1), reps, warmup=2 if compiled else 1)
        tn = _time_ms(lambda: run(new_tokens), reps, warmup=2 if compiled else 1)
    # (tokens after the first over the time they added; a long call no slower than the one-token call measured the
    # host's noise, not decoding: NaN, never a huge rate)
    tps = batch * (new_tokens - 1) / (tn - t1) * 1e3 if tn > t1 else float("nan")
    out = dict(batch=batch, tokens_per_s=tps, t1_ms=t1, tn_ms=tn)
    if compiled:
        out["graphs_compiled"] = counters["stats"]["unique_graphs"] - graphs_before
    return out


def decode_step(model, batch: int, steps: int = 32):
    """A static-cache decode step after a ``PROMPT``-token prefill: ``(step, pos)``; ``step()`` runs one token at
    position ``pos`` (a device tensor the caller advances). The cache holds PROMPT + steps + 8 positions, what the
    timed steps reach: attention over a longer, mostly empty cache would be time no model shape needs."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=PROMPT + steps + 8)
    ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), device="cuda")
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(PROMPT, device="cuda"))
    tok = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    pos = torch.full((1,), PROMPT, dtype=torch.long, device="cuda")

    def step():
        with torch.no_grad():
            return model(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=pos,
                         logits_to_keep=1).logits

    return step, pos


def capture(step, before=None, device: torch.device | None = None) -> torch.cuda.CUDAGraph | None:
    """``step`` captured in a CUDA graph (run twice on a side stream first, as a capture needs: first calls, plans,
    compiles), synchronized; ``before`` runs ahead of each warm-up call (to reset state the step advances). On a
    ``device`` that is not a GPU only the warm-up runs (on the current stream) and the result is None."""
    cuda = device is None or device.type == "cuda"
    s = torch.cuda.Stream(device) if cuda else None
    if cuda:
        s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s) if cuda else contextlib.nullcontext():
        for _ in range(2):
            if before is not None:
                before()
            step()
    if not cuda:
        return None
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize(device)
    return graph


def graph_decode_tps(model, batch: int, steps: int = 32, compile_mode: str | None = None) -> dict:
    """One decode step with a static cache, captured in a CUDA graph: GPU time per token without host cost.
    ``compile_mode``: the step is first compiled by inductor (``torch.compile(mode=...)``, elementwise work fused),
    then captured the same way: what a serving loop gets from the compiled model without HF ``generate``'s host
    loop."""
    step, pos = decode_step(model, batch, steps)
    seconds = 0.0
    if compile_mode is not None:
        t0 = time.perf_counter()
        step = torch.compile(step, mode=None if compile_mode == "default" else compile_mode)
        step()
        _sync()
        seconds = time.perf_counter() - t0
    graph = capture(step)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph.replay()
        pos.add_(1)
    end.record()
    _sync()
    ms = start.elapsed_time(end) / steps
    out = dict(batch=batch, ms_per_step=ms, tokens_per_s=batch / ms * 1e3)
    if compile_mode is not None:
        out.update(compile_mode=compile_mode, compile_seconds=seconds)
    return out


def kernel_rows(model, dtype, tokens=(1, 8, 32)) -> list[dict]:
    """Each distinct structured layer shape: auto's product and dense F.linear, both replayed from CUDA graphs."""
    import triton.testing

    import structmat.kernels as K
    from structmat.structures.base import StructuredLinear

    rows, seen = [], set()
    for name, layer in model.named_modules():
        if not isinstance(layer, StructuredLinear):
            continue
        key = (layer.spec, layer.in_features, layer.out_features)
        if key in seen:
            continue
        seen.add(key)
        W = torch.randn(layer.out_features, layer.in_features, device="cuda", dtype=dtype)
        wbytes = sum(t.numel() * t.element_size() for n, t in [*layer.named_parameters(), *layer.named_buffers()]
                     if n != "bias")
        for n in tokens:
            x = torch.randn(n, layer.in_features, device="cuda", dtype=dtype)
            with torch.no_grad():
                layer._matmul(x)
                choice = (K.LAST_CHOICE.get(layer.name) or "?")
                ms = triton.testing.do_bench_cudagraph(lambda: layer._matmul(x), rep=20)
                dense_ms = triton.testing.do_bench_cudagraph(lambda: F.linear(x, W), rep=20)
            rows.append(dict(layer=name, spec=layer.spec, in_features=layer.in_features,
                             out_features=layer.out_features, tokens=n, choice=choice, ms=ms, dense_ms=dense_ms,
                             speedup=dense_ms / ms, weight_bytes=wbytes, gbs=wbytes / ms * 1e-6,
                             dense_gbs=W.numel() * W.element_size() / dense_ms * 1e-6))
    return rows


class _CompileLog(logging.Handler):
    """Dynamo's recompile and graph-break reasons (the ``recompiles`` / ``graph_breaks`` log artifacts), kept so a
    compiled row says why it compiled more than one graph."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "__recompiles" in record.name or "__graph_breaks" in record.name:
            self.lines.append(record.getMessage()[:1500])


def _build_named(name: str, args, dtype: torch.dtype, shape: dict):
    if name in ("checkpoint", "checkpoint" + FUSED):  # (--structures checkpoint+fused: it with its siblings fused)
        from structmat.io import load_pretrained
        from structmat.siblings import fuse_siblings

        if not args.checkpoint:
            raise ValueError(f"bench infer: the {name!r} row needs --checkpoint DIR (a structmat compress output)")
        model = load_pretrained(args.checkpoint, device="cuda", dtype=dtype)
        model.config.use_cache = True
        if name.endswith(FUSED):
            fuse_siblings(model)
        return model.eval()
    if name in ("floor", "floor1", "floor2"):  # (see floor_model: the bound on any structure's speedup)
        return floor_model(dtype, shape, int(name[5:] or 0))
    return build(None if name == "dense" else name, dtype, shape)


def _fresh_baseline() -> int:
    torch._dynamo.reset()  # (compiled graphs of the previous model hold its weights)
    gc.collect()
    torch.cuda.empty_cache()
    _sync()
    return torch.cuda.memory_allocated()


def run(args, checkpoint=None) -> dict:
    """Measure every model of ``args``; ``checkpoint(result)`` (optional) is called with the partial result after
    every measurement."""
    if not torch.cuda.is_available():
        raise SystemExit("structmat bench infer needs a CUDA GPU")
    from structmat.eval.results import run_info
    from structmat.inference import live_storages

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    shape = dict(SHAPE)
    if args.quick:
        shape.update(num_hidden_layers=2)
    batches = [int(b) for b in args.batches.split(",")]
    pb, pt = (int(v) for v in args.prefill.split("x"))
    names = ([] if args.no_dense else ["dense"]) + [s for s in args.structures.split(",") if s]
    if args.checkpoint:
        names.append("checkpoint")
    result: dict[str, Any] = dict(shape=shape, dtype=args.dtype, models={}, errors={})
    t0 = time.time()
    # Memory first, every model in the same clean state: nothing compiled or captured yet, and the process's own
    # buffers (cuBLAS workspaces) allocated before the first baseline, so they are nobody's model memory.
    warm_process_buffers(dtype)
    for name in names:
        model = None
        try:
            baseline = _fresh_baseline()
            census = live_storages("cuda")
            if args.memory_history:
                torch.cuda.memory._record_memory_history(max_entries=100000, stacks="python")
            model = _build_named(name, args, dtype, shape)
            result["models"][name] = memory(model, baseline, census, history=args.memory_history)
        except Exception as err:  # record and go on: one model's failure must not lose the others
            result["errors"][f"{name}/memory"] = traceback.format_exc()[-3000:]
            print(f"{name}/memory: FAILED {err!r}"[:500], flush=True)
        finally:
            if args.memory_history:
                torch.cuda.memory._record_memory_history(enabled=None)
            model = None
        if checkpoint is not None:
            checkpoint(result)
    log = _CompileLog()
    torch._logging.set_logs(recompiles=True, graph_breaks=True)
    logging.getLogger("torch._dynamo").addHandler(log)
    for name in names:
        if time.time() - t0 > args.budget_s:
            result["errors"][name] = f"not run (time budget {args.budget_s:.0f} s spent)"
            continue
        model = None
        try:
            _fresh_baseline()
            model = _build_named(name, args, dtype, shape)
            row = result["models"].setdefault(name, {})
            steps = {"prefill_tps": lambda: prefill_tps(model, pb, pt, args.reps),
                     "graph": lambda: [graph_decode_tps(model, b) for b in batches],
                     "eager": lambda: [generate_tps(model, b, args.new_tokens, False, "", "", args.reps)
                                       for b in args.eager_batches]}
            if name != "dense" and args.kernels:
                steps["kernels"] = lambda: kernel_rows(model, dtype)
            # (the compiles last: the longest steps, and a time limit that cuts one keeps the rows before it)
            if args.prefill_compile_mode != "none":
                steps["prefill_compiled"] = lambda: prefill_compiled_tps(model, pb, pt, args.reps,
                                                                         args.prefill_compile_mode,
                                                                         args.prefill_compile_scope)
            if args.step_compile_mode != "none":
                steps["graph_compiled"] = lambda: [graph_decode_tps(model, b, compile_mode=args.step_compile_mode)
                                                   for b in args.compiled_batches]
            if args.compile_backend != "none":
                steps["compiled"] = lambda: [generate_tps(model, b, args.new_tokens, True, args.compile_backend,
                                                          args.compile_mode, args.reps) for b in args.compiled_batches]
            if args.steps:
                steps = {k: v for k, v in steps.items() if k in args.steps}
            for key, step in steps.items():
                try:  # each measurement on its own: one failure must not lose the others
                    if key in COMPILED_STEPS:
                        torch._dynamo.reset()
                        log.lines.clear()
                    row[key] = step()
                    if key in COMPILED_STEPS and log.lines:
                        row[f"{key}_dynamo_log"] = log.lines[:12]
                except Exception as err:
                    result["errors"][f"{name}/{key}"] = traceback.format_exc()[-3000:]
                    print(f"{name}/{key}: FAILED {err!r}"[:500], flush=True)
                if checkpoint is not None:
                    checkpoint(result)
            print(f"{name}: " + json.dumps({k: v for k, v in row.items() if k != "kernels"}, default=str), flush=True)
        except Exception as err:  # record and go on: one model's failure must not lose the others
            result["errors"][name] = traceback.format_exc()[-3000:]
            print(f"{name}: FAILED {err!r}"[:500], flush=True)
        finally:
            model = None
            gc.collect()
            torch.cuda.empty_cache()
    logging.getLogger("torch._dynamo").removeHandler(log)
    _ratios(result)
    result["seconds"] = time.time() - t0
    result["run_info"] = run_info(vars(args), device="cuda")
    return result


def merge_results(paths: list[str]) -> dict:
    """One result from several ``infer-*.json`` files of the same round, each run in its own process (a kernel fault
    such as an illegal address poisons the whole CUDA context, so the round script runs one structure per process):
    models and errors are combined (the first file that has a model wins) and the ratios are recomputed against the
    dense row. Every model keeps the run_info of the process that measured it."""
    result: dict[str, Any] = dict(models={}, errors={}, merged_from=[], seconds=0.0)
    for path in paths:
        part = json.loads(Path(path).read_text())
        result["merged_from"].append(Path(path).name)
        for key in ("shape", "dtype", "run_info"):
            result.setdefault(key, part.get(key))
        result["seconds"] += part.get("seconds", 0.0)
        for name, row in part.get("models", {}).items():
            if name not in result["models"]:
                row.pop("vs_dense", None)
                row["run_date"] = part.get("run_info", {}).get("date")
                row["part_complete"] = part.get("complete", True)  # (False: its process was cut by a time limit)
                result["models"][name] = row
        for key, err in part.get("errors", {}).items():
            result["errors"].setdefault(key, err)
    if not result["merged_from"]:
        raise ValueError("merge_results: no files given")
    _ratios(result)
    return result


def _ratios(result: dict) -> None:
    dense = result["models"].get("dense")
    if not dense:
        return
    for name, row in result["models"].items():
        r = {}
        if "param_bytes" in row and "param_bytes" in dense:
            r = {"after_forward_over_params": row["after_forward_bytes"] / row["param_bytes"],
                 "params_vs_dense": row["param_bytes"] / dense["param_bytes"],
                 "peak_vs_dense": row["peak_bytes"] / dense["peak_bytes"]}
        if "prefill_tps" in row and "prefill_tps" in dense:
            r["prefill"] = row["prefill_tps"] / dense["prefill_tps"]
        if "prefill_compiled" in row and "prefill_compiled" in dense:
            r["prefill_compiled"] = row["prefill_compiled"]["tokens_per_s"] / dense["prefill_compiled"]["tokens_per_s"]
        for kind in ("eager", "compiled", "graph", "graph_compiled"):
            for a, b in zip(row.get(kind, []), dense.get(kind, [])):
                r[f"{kind}_b{a['batch']}"] = a["tokens_per_s"] / b["tokens_per_s"]
        row["vs_dense"] = r


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in result["models"] if n != "dense"]
    keys = sorted({k for n in names for k in result["models"][n].get("vs_dense", {})
                   if k.startswith(("eager", "compiled", "graph", "prefill"))})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys) * len(names) / 3), 4))
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        vals = [result["models"][n]["vs_dense"].get(k, 0.0) for k in keys]
        ax.bar([j + i * width for j in range(len(keys))], vals, width, label=n)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(keys))], keys, rotation=45, ha="right")
    ax.set_ylabel("speed vs dense (same run)")
    ax.set_title(f"structmat bench infer ({result['run_info']['device']}, {result['dtype']})")
    ax.legend()
    fig.tight_layout()
    from ..atomic import write_png

    return write_png(path, fig, dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked (a bad flag exits with status 2 before anything is built or measured)."""
    p = argparse.ArgumentParser(prog="structmat bench infer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--structures", default="lowrank,monarch,blockdiag,nm24",
                   help=f"comma list of {', '.join(STRUCTURES)} or any spec (every block linear gets it), each "
                        f"optionally with '{FUSED}' (q/k/v and gate/up then fused: structmat.fuse_siblings); 'floor': "
                        "every block linear replaced by a stand-in that reads no weight (the bound on any speedup; "
                        "'floor1'/'floor2': one/two tiny kernels per linear)")
    p.add_argument("--checkpoint", default=None, help="also a model saved by structmat (load_pretrained)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="weights and activations")
    p.add_argument("--batches", default="1,8,32", help="decode batch sizes")
    p.add_argument("--eager-batches", default="1,8,32", type=lambda s: [int(v) for v in s.split(",")],
                   help="batch sizes for eager HF generate")
    p.add_argument("--compiled-batches", default="1", type=lambda s: [int(v) for v in s.split(",")],
                   help="batch sizes for compiled generate (each is one more compile)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per timed generate call")
    p.add_argument("--prefill", default="4x2048", help="prefill batch x tokens")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend for generate, or none")
    p.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode (inductor)")
    p.add_argument("--prefill-compile-mode", default="default",
                   help="inductor mode for the compiled prefill forward (default, max-autotune-no-cudagraphs, ...), "
                        "or none")
    p.add_argument("--prefill-compile-scope", default="blocks", choices=["blocks", "model"],
                   help="compile each decoder block (the causal mask stays eager: SDPA's unmasked causal kernel) or "
                        "the whole forward (transformers then builds a mask tensor on torch < 2.14)")
    p.add_argument("--steps", default="", type=lambda s: [v.strip() for v in s.split(",") if v.strip()],
                   help=f"only these measurements (comma list of {', '.join(STEPS)}; memory always runs); "
                        "default: all")
    p.add_argument("--step-compile-mode", default="default",
                   help="inductor mode for the compiled decode step replayed from a CUDA graph, or none")
    p.add_argument("--no-kernels", dest="kernels", action="store_false", help="skip the per-layer kernel rows")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting new models after this long")
    p.add_argument("--quick", action="store_true", help="2 layers instead of 8 (a smoke run)")
    p.add_argument("--no-dense", action="store_true",
                   help="leave the dense model out (a round that runs each structure in its own process, then --merge)")
    p.add_argument("--memory-history", action="store_true",
                   help="record the CUDA allocator's history while each model is built and run once, and attribute "
                        "live non-parameter blocks to the frames that allocated them (slower allocation)")
    p.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                   help="combine infer-*.json files of one round (one structure per process) into one result, "
                        "ratios against their dense row; measures nothing")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    unknown = [v for v in args.steps if v not in STEPS]
    if unknown:
        p.error(f"--steps: unknown {', '.join(unknown)}; give some of {', '.join(STEPS)}")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode speed is measured between 1 and N new tokens)")
    for flag in ("batches", "prefill"):
        try:
            [int(v) for v in getattr(args, flag).replace("x", ",").split(",")]
        except ValueError:
            p.error(f"--{flag} {getattr(args, flag)!r}: give integers ({'1,8,32' if flag == 'batches' else '4x2048'})")
    if args.merge:
        missing = [m for m in args.merge if not Path(m).is_file()]
        if missing:
            p.error(f"--merge: no such file(s): {', '.join(missing)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from structmat.eval.results import write_json

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out)
    path = out / f"infer-{stamp}.json"
    if args.merge:
        result = merge_results(args.merge)
    else:
        def checkpoint(partial: dict) -> None:  # after every measurement: a run cut by its time limit keeps its rows
            out.mkdir(parents=True, exist_ok=True)
            write_json(path, dict(partial, complete=False))

        result = run(args, checkpoint)
        result["complete"] = True
    out.mkdir(parents=True, exist_ok=True)
    path = write_json(path, result)
    try:
        plot(result, path.with_suffix(".png"))
    except Exception as err:  # the JSON is the result; a plot failure is reported, not fatal
        print(f"plot failed: {err!r}", file=sys.stderr)
    print(f"wrote {path}")
    print(format_table(result))
    return 0


def format_table(result: dict) -> str:
    lines = ["| model | params GiB | after fwd / params | peak GiB | prefill | prefill compiled | eager b1 | "
             "compiled b1 | compiled step b1 | graph b1 | graph b8 | graph b32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in result["models"].items():
        r = row.get("vs_dense", {})
        f = lambda k: f"{r[k]:.2f}x" if k in r else "-"  # noqa: E731
        gib = lambda k: f"{row[k] / 2**30:.3f}" if k in row else "-"  # noqa: E731
        over = f"{r['after_forward_over_params']:.3f}" if "after_forward_over_params" in r else "-"
        lines.append(f"| {name} | {gib('param_bytes')} | {over} | {gib('peak_bytes')} | {f('prefill')} | "
                     f"{f('prefill_compiled')} | {f('eager_b1')} | {f('compiled_b1')} | {f('graph_compiled_b1')} | "
                     f"{f('graph_b1')} | {f('graph_b8')} | {f('graph_b32')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
