"""``structmat generate``: run a (compressed) causal LM the way a user serves it, and measure it while doing so.

The model (a folder written by ``structmat compress`` / ``save_pretrained``, an HF folder or hub id, or ``smollm2``)
is moved to its device and dtype, its structured siblings fused (``fuse_siblings``: q/k/v and gate/up as one product
each at few tokens, no memory added) and HF ``generate`` runs on a prompt. Printed: the text, then the prompt's
time (prefill), decode tokens/s, the parameter bytes and, on a GPU, the bytes the model holds between calls and its
peak (each counted from what was allocated before it, so a second model on the device is not in the first's);
``--baseline MODEL`` measures a second model (the dense original) the same way in the same process, rounds
interleaved, and gives the ratios.
Timing: a 2-token warm-up first (plans, first-call kernel compiles), then per round a 1-token call (prefill) and an
N-token call with end-of-sequence suppressed (``min_new_tokens``), so every round decodes the same N tokens;
decode tokens/s = (N - 1) / (N-token time - 1-token time), the best round's. ``--compile BACKEND``: a static KV cache
and HF's compiled decode step (``CompileConfig``; inductor takes ``reduce-overhead``, CUDA graphs, on a GPU); the
warm-up then runs the 1- and the N-token call once each (a static cache of each length compiles its graph) and the
graphs dynamo compiled in the timed rounds are counted (0: no recompiles). ``--loop graph``: structmat's own greedy
loop (:class:`GraphLoop`) instead of HF ``generate``, whose per-token host work bounds a batch-1 decode on a GPU:
each token is one replay of a captured decode step (compiled first by ``--compile BACKEND``), no host sync until
the end.
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: structures with no CPU kernel: their reference rebuilds weight tiles on every call (README, "On a CPU")
SPARSE_STRUCTURES = ("nm", "sparse", "splr")
DEFAULT_PROMPT = "def fibonacci(n):"


@dataclass
class Measured:
    source: str
    device: str
    dtype: str
    param_bytes: int
    structured_layers: int
    fused_groups: int
    densified_layers: int
    prompt_tokens: int
    new_tokens: int
    batch: int
    compile_backend: str | None = None
    loop: str = "hf"  # hf: HF generate; graph: structmat's decode loop (GraphLoop)
    prefill_s: list[float] = field(default_factory=list)
    generate_s: list[float] = field(default_factory=list)
    held_bytes: int | None = None  # GPU: what the model keeps on the device between calls (parameters, kept scratch)
    peak_bytes: int | None = None  # GPU: held_bytes + the most a timed call allocated beyond what was allocated before
    graphs_in_warmup: int | None = None  # with --compile: graphs compiled by the warm-up (at least one)
    graphs_in_rounds: int | None = None  # and during the timed rounds (0: no recompiles)

    @property
    def decode_tokens_per_s(self) -> float:
        """The best round's decode rate, tokens of the whole batch a second (each round's N-token time less its
        1-token time)."""
        best = min(full - first for full, first in zip(self.generate_s, self.prefill_s))
        return self.batch * (self.new_tokens - 1) / max(best, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decode_tokens_per_s": self.decode_tokens_per_s}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # bf16 where the kernels run, float32 on a CPU (its bf16 matmuls are slow without AMX)
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"--dtype {name!r}: use auto, float32, bfloat16 or float16")
    return dtypes[name]


def prepare(model: nn.Module, device: torch.device, dtype: torch.dtype, fuse: bool = True,
            densify_sparse: bool = False) -> dict[str, int]:
    """Move ``model`` to ``device``/``dtype`` for inference, then (optionally) make its sparse layers dense and fuse
    its structured siblings (after the move: a move dissolves fused groups). Returns what it did."""
    from .siblings import fuse_siblings
    from .surgery import densify, structured_modules

    model.eval().to(device=device, dtype=dtype)
    densified = densify(model, SPARSE_STRUCTURES) if densify_sparse else 0
    groups = fuse_siblings(model) if fuse else []
    return {"structured_layers": len(structured_modules(model)), "fused_groups": len(groups),
            "densified_layers": densified}


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    """``prompt`` as one user turn in the tokenizer's chat template, ready for the assistant's reply: (1, tokens)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: this model's tokenizer has no chat template; drop --chat to continue the raw prompt")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _allocated_own(device: torch.device) -> int:
    """Bytes allocated on ``device`` in the ordinary pool, less the process's cuBLAS workspaces: what a model keeps.

    Two things move under a compiled model's feet and are left out at both ends of a ``held_bytes`` measurement:
    inductor's CUDA-graph trees free the cuBLAS workspaces before and after each warm-up and recording (H200, session
    19: low-rank 651.0 MB held for 666.4 MB of parameters; a GEMM allocates them again when it next runs), and they
    keep the last outputs of the current graph path live in their private pool, freed when another model's graphs
    run (H100, session 25: the second model read 112 KB below its parameters). Garbage cycles are collected first:
    tensors left in reference cycles (by an earlier model's ``generate``) are freed whenever the collector runs; with
    the graph pools left out the second model still read 45 KB below its parameters, and with the collection it
    passed (H100, session 25, one run: the cause inferred from the fix, not traced)."""
    if device.type != "cuda":
        return 0
    gc.collect()
    torch.cuda.synchronize(device)
    with torch.cuda.device(device):
        torch._C._cuda_clearCublasWorkspaces()
    return _outside_graph_pools(torch.cuda.memory_allocated(device), torch.cuda.memory_snapshot(),
                                torch.cuda._get_device_index(device, optional=True))


def _outside_graph_pools(allocated: int, segments: list[dict[str, Any]], device_index: int) -> int:
    """``allocated`` less the bytes in use in CUDA-graph private pools (segments whose pool id is not the default
    (0, 0)) on device ``device_index``, from a ``torch.cuda.memory_snapshot()``."""
    in_pools = sum(s["allocated_size"] for s in segments
                   if s.get("device", device_index) == device_index and tuple(s["segment_pool_id"]) != (0, 0))
    return allocated - in_pools


def compile_options(backend: str | None, device: torch.device) -> dict[str, Any]:
    """``generate`` keywords for HF's compiled decode step with a static cache (none for ``backend`` None)."""
    if backend is None:
        return {}
    from transformers.generation.configuration_utils import CompileConfig

    mode = "reduce-overhead" if backend == "inductor" and device.type == "cuda" else None  # (CUDA graphs)
    config = CompileConfig(backend=backend, mode=mode, fullgraph=False)
    config._compile_all_devices = True  # (HF compiles on GPUs only unless told)
    return {"cache_implementation": "static", "compile_config": config}


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _generate(model, ids: torch.Tensor, new: int, sample: bool, temperature: float, seed: int,
              pad_token_id: int | None, compiled: dict[str, Any]) -> tuple[torch.Tensor, float]:
    torch.manual_seed(seed)  # (sampling: every round draws the same tokens)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=sample, pad_token_id=pad_token_id, **compiled)
    if sample:
        kwargs["temperature"] = temperature
    _sync(ids.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    _sync(ids.device)
    seconds = time.perf_counter() - start
    if out.shape[1] != ids.shape[1] + new:
        raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, not {new}")
    return out, seconds


class GraphLoop:
    """structmat's own greedy decode loop (``--loop graph``): HF ``generate`` runs host work after every token and
    waits on the GPU for its stopping check, which at batch 1 costs more than a small model's decode step (session
    26, H100: dense 1.6 ms a token in HF's compiled loop against a 0.76 ms step). Here the prompt fills a static KV
    cache (an eager forward), then each token is one decode step whose argmax, end-of-sequence suppression (as
    ``min_new_tokens`` does), output write and position advance stay on the device; on a GPU that step is captured
    once in a CUDA graph (after ``torch.compile`` with ``backend`` where given) and replayed with no host sync, so a
    token costs the step's GPU time. On a CPU the same step runs as a function. One loop serves one batch size,
    prompt length and token budget; its tensors are reused by every call (the cache is zeroed in place)."""

    @torch.inference_mode()
    def __init__(self, model: nn.Module, ids: torch.Tensor, new_tokens: int, backend: str | None):
        from transformers import StaticCache

        self.model, self.prompt, self.new_tokens = model, ids.shape[1], new_tokens
        self.cache = StaticCache(config=model.config, max_cache_len=self.prompt + new_tokens)
        device = ids.device
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self.tok = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.out = torch.zeros(ids.shape[0], new_tokens, dtype=torch.long, device=device)
        step = self._step if backend is None else torch.compile(self._step, backend=backend)
        self._prefill(ids)  # (allocates the cache's tensors: the capture below records their addresses)
        from .bench.infer import capture

        # (each warm-up step at the first decode position: a budget of 2 has no third; on a CPU, no graph)
        self.graph = capture(step, before=lambda: self.pos.fill_(self.prompt), device=device)
        self.step = step

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        if self.eos is not None:  # (every call decodes its whole budget, as HF's min_new_tokens makes it)
            logits = logits.index_fill(-1, self.eos, float("-inf"))
        return logits.argmax(-1, keepdim=True)

    def _prefill(self, ids: torch.Tensor) -> None:
        self.cache.reset()
        position = torch.arange(self.prompt, device=ids.device)
        logits = self.model(input_ids=ids, past_key_values=self.cache, cache_position=position, use_cache=True,
                            logits_to_keep=1).logits[:, -1]
        self.tok.copy_(self._pick(logits))
        self.out[:, :1].copy_(self.tok)
        self.pos.fill_(self.prompt)

    def _step(self) -> None:
        logits = self.model(input_ids=self.tok, past_key_values=self.cache, cache_position=self.pos, use_cache=True,
                            logits_to_keep=1).logits[:, -1]
        self.tok.copy_(self._pick(logits))
        self.out.index_copy_(1, self.pos - (self.prompt - 1), self.tok)
        self.pos.add_(1)

    def __call__(self, ids: torch.Tensor, new: int) -> torch.Tensor:
        """The prompt ``ids`` (the loop's batch and length) and ``new`` greedy tokens after it (``new`` up to the
        loop's budget)."""
        if ids.shape[1] != self.prompt or ids.shape[0] != self.tok.shape[0] or not 1 <= new <= self.new_tokens:
            raise ValueError(f"GraphLoop for {self.tok.shape[0]} x {self.prompt} prompt tokens and up to "
                             f"{self.new_tokens} new: got {tuple(ids.shape)} and {new}; build a loop for that shape")
        with torch.inference_mode():
            self._prefill(ids)
            for _ in range(new - 1):
                self.graph.replay() if self.graph is not None else self.step()
            return torch.cat([ids, self.out[:, :new]], dim=1)


def resolve_loop(loop: str, device: torch.device, sample: bool, model: nn.Module | None = None) -> str:
    """``--loop auto``: structmat's decode loop where it serves best, greedy decoding on a GPU (HF ``generate``'s
    per-token host work bounds a small batch there: session 26) of a model whose class declares a step that compiles
    as one graph over a static cache (transformers' ``_can_compile_fullgraph``, as a captured step needs); HF
    ``generate`` for sampling (the loop is greedy), on a CPU (no graph to replay: the step's host work is the same
    either way) and for other models. ``hf`` and ``graph`` as given."""
    if loop != "auto":
        return loop
    static = model is None or bool(getattr(model, "_can_compile_fullgraph", False))
    return "graph" if device.type == "cuda" and not sample and static else "hf"


class Runner:
    """One model prepared for generation and its measurements."""

    def __init__(self, model: nn.Module, tokenizer, source: str, device: torch.device, dtype: torch.dtype,
                 prompt: str, new_tokens: int, fuse: bool, densify_sparse: bool, sample: bool, temperature: float,
                 seed: int, compile_backend: str | None = None, batch: int = 1, chat: bool = False,
                 loop: str = "hf"):
        if new_tokens < 2:
            raise ValueError(f"--max-new-tokens {new_tokens}: at least 2 (decode speed is measured past the first)")
        if batch < 1:
            raise ValueError(f"--batch {batch}: at least 1")
        if loop not in ("auto", "hf", "graph"):
            raise ValueError(f"--loop {loop!r}: use auto, hf (HF generate) or graph (structmat's decode loop)")
        loop = resolve_loop(loop, device, sample, model)
        if loop == "graph" and sample:
            raise ValueError("--loop graph decodes greedily; drop --sample or use --loop hf")
        allocated = _allocated_own(device)  # (another model may be on the device already: only the change is ours)
        did = prepare(model, device, dtype, fuse, densify_sparse)
        self.model, self.tokenizer, self.sample, self.temperature, self.seed = model, tokenizer, sample, temperature, seed
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = chat_ids(tokenizer, prompt) if chat else tokenizer(prompt, return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            raise ValueError("--prompt is empty after tokenization; give some text")
        self.ids = ids.expand(batch, -1).contiguous().to(device)  # (the prompt in every row: batch decode)
        params = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        self.measured = Measured(source, str(device), str(dtype).replace("torch.", ""), params,
                                 prompt_tokens=self.ids.shape[1], new_tokens=new_tokens, batch=batch,
                                 compile_backend=compile_backend, loop=loop, **did)
        # HF's compiled step (--loop hf), or the backend structmat's loop compiles its step with before the capture
        self.compiled = compile_options(compile_backend, device) if loop == "hf" else {}
        self.loop, self.backend, self._graph_loop = loop, compile_backend, None
        self.output: torch.Tensor | None = None
        graphs = _graphs()
        for new in ((1, new_tokens) if compile_backend else (2,)):  # warm-up (compiled: each cache length's graph)
            self._run(new)
        if compile_backend:
            self.measured.graphs_in_warmup = _graphs() - graphs
        if device.type == "cuda":
            self.measured.held_bytes = _allocated_own(device) - allocated

    def _run(self, new: int) -> tuple[torch.Tensor, float]:
        if self.loop == "graph":
            if self._graph_loop is None:  # (built, compiled and captured once, in the warm-up)
                try:
                    self._graph_loop = GraphLoop(self.model, self.ids, self.measured.new_tokens, self.backend)
                except (RuntimeError, NotImplementedError) as exc:  # (a step that cannot be captured or compiled)
                    raise RuntimeError(f"structmat's decode loop could not run {self.measured.source}: {exc}\n"
                                       "run it with --loop hf (HF generate)") from exc
            _sync(self.ids.device)
            start = time.perf_counter()
            out = self._graph_loop(self.ids, new)
            _sync(self.ids.device)
            return out, time.perf_counter() - start
        return _generate(self.model, self.ids, new, self.sample, self.temperature, self.seed, self.pad,
                         self.compiled)

    def round(self) -> None:
        device = self.ids.device
        allocated = _allocated(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        graphs = _graphs()
        _, first = self._run(1)
        self.output, full = self._run(self.measured.new_tokens)
        self.measured.prefill_s.append(first)
        self.measured.generate_s.append(full)
        if self.backend:
            self.measured.graphs_in_rounds = (self.measured.graphs_in_rounds or 0) + _graphs() - graphs
        if device.type == "cuda":
            peak = self.measured.held_bytes + torch.cuda.max_memory_allocated(device) - allocated
            self.measured.peak_bytes = max(self.measured.peak_bytes or 0, peak)

    def sparse_on_cpu(self) -> int:
        from .surgery import structured_modules

        if self.ids.device.type != "cpu":
            return 0
        return sum(layer.name in SPARSE_STRUCTURES for layer in structured_modules(self.model).values())


def _line(m: Measured) -> str:
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    gpu = f", held {mib(m.held_bytes)}, peak {mib(m.peak_bytes)}" if m.peak_bytes is not None else ""
    rows = f" x batch {m.batch}" if m.batch > 1 else ""
    densified = f", {m.densified_layers} sparse layers made dense" if m.densified_layers else ""
    compiled = (f"; compiled ({m.compile_backend}): {m.graphs_in_warmup} graphs in the warm-up, "
                f"{m.graphs_in_rounds} while timed") if m.compile_backend else ""
    compiled += "; structmat's decode loop (--loop graph)" if m.loop == "graph" else ""
    return (f"{m.source}: prefill {m.prompt_tokens} tokens{rows} {min(m.prefill_s) * 1e3:.1f} ms, decode "
            f"{m.decode_tokens_per_s:.1f} tokens/s ({m.new_tokens} tokens{rows}, {m.device}, {m.dtype}), parameters "
            f"{mib(m.param_bytes)}{gpu}; {m.structured_layers} structured layers, {m.fused_groups} fused groups"
            f"{densified}{compiled}")


def run(args) -> int:
    """The ``structmat generate`` command (arguments from ``cli.build_parser``)."""
    from .cli import _load
    from .eval.results import run_info, write_json

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda":  # the process's cuBLAS workspaces first: no model's held bytes (the first run on the
        from .bench.infer import warm_process_buffers  # H200 counted 33-50 MiB of them as the structured model's)

        with torch.cuda.device(device):
            warm_process_buffers(dtype)
    options = dict(device=device, dtype=dtype, prompt=args.prompt, new_tokens=args.max_new_tokens,
                   fuse=args.fuse, densify_sparse=args.densify_sparse, sample=args.sample,
                   temperature=args.temperature, seed=args.seed, compile_backend=args.compile, batch=args.batch,
                   chat=args.chat, loop=args.loop)
    runners = []
    for name in [args.model] + ([args.baseline] if args.baseline else []):
        loaded = _load(name, args.tokenizer)
        if loaded.kind != "causal":
            raise ValueError(f"structmat generate needs a causal LM; {loaded.source} is an encoder")
        runners.append(Runner(loaded.model, loaded.tokenizer, loaded.source, **options))
    main = runners[0]
    sparse = main.sparse_on_cpu()
    if sparse:
        print(f"note: {sparse} sparse layers (N:M, fixed sparse) run their PyTorch reference on a CPU, "
              "about 3x slower than dense end to end; --densify-sparse makes them dense (dense speed and memory)",
              file=sys.stderr)
    for _ in range(args.rounds):
        for runner in runners:
            runner.round()
    # (a chat prompt prints the reply alone: the template around the prompt is not the user's text)
    shown = main.output[0, main.ids.shape[1]:] if args.chat else main.output[0]
    text = main.tokenizer.decode(shown, skip_special_tokens=True)
    print(text)
    for runner in runners:
        print(_line(runner.measured), file=sys.stderr)
    record: dict[str, Any] = {"model": main.measured.to_dict()}
    if len(runners) > 1:
        base = runners[1].measured
        ratios = {"decode_speedup": main.measured.decode_tokens_per_s / base.decode_tokens_per_s,
                  "prefill_speedup": min(base.prefill_s) / min(main.measured.prefill_s),
                  "param_bytes_ratio": main.measured.param_bytes / base.param_bytes}
        if main.measured.peak_bytes is not None and base.peak_bytes:
            ratios["held_bytes_ratio"] = main.measured.held_bytes / base.held_bytes
            ratios["peak_bytes_ratio"] = main.measured.peak_bytes / base.peak_bytes
        record.update(baseline=base.to_dict(), vs_baseline=ratios)
        print("vs baseline: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()), file=sys.stderr)
    if args.json:
        path = write_json(Path(args.json), {**record, "prompt": args.prompt, "text": text,
                                            "run_info": run_info(vars(args), device=device)})
        print(f"wrote {path}", file=sys.stderr)
    return 0

