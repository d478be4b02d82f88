"""Backend choice for the structured products: which implementation runs for these inputs.

Backends (the math never changes with the backend; only rounding order and speed do):
  ``reference``  the pure-PyTorch definition in ``structures/`` (the fast path returns None)
  ``triton``     the custom ops of ``ops.py`` with the Triton grouped-GEMM kernel on the permuted Monarch roles
                 (stage 1 and the gradient of its output, chunked store) and, per ``ops.IMPL``, cuBLAS
                 strided-batched calls on strided views for the rest (measured faster on an H100)
  ``cublas``     the same custom ops with every role on cuBLAS strided-batched calls (Monarch's permuted roles as
                 b calls, one per output chunk); no Triton launch at all, no transposed copy either.
                 Low-rank has no kernel of its own under either: its two products are full dense GEMMs that cuBLAS
                 runs at the roofline, so "triton"/"cublas" give the reference's two cuBLAS calls (``lowrank_fast``).
                 N:M above DECODE_MAX_TOKENS in inference: ``ops.nm`` (each weight tile expanded by one Triton
                 kernel, then a GEMM; chosen by ``auto`` and "triton")
  ``decode``     few-token inference (<= 64 tokens, nothing needs a gradient): the Triton kernels of ``decode.py``,
                 which spread the weight over all SMs and read each weight byte once (low-rank and N:M too)
  ``dense``      only when forced: the weight pre-merged into one dense matrix (``to_dense``), cached and
                 invalidated when a factor changes (tensor ``_version``, storage pointer, dtype, device); one cuBLAS
                 GEMM. The cache is a full dense copy of the layer (out x in elements), so ``auto`` never picks it:
                 a compressed model must not hold more memory than the dense one. Keeping a merged copy on purpose
                 is ``structmat.merge_for_inference(model)`` (``inference.py``). Cached only when no factor needs a
                 gradient; with factor gradients the merge is recomputed differentiably each call (16-bit on CUDA:
                 in the compute dtype, fp32 accumulation)
  ``auto``       a cost model picks the fastest structured path for the device, dtype and token count, once per
                 shape (the decision is cached); reference on CPU, and wherever Triton is not installed

Force one with :func:`set_backend` or, for a block of code, ``with use_backend("dense"): ...``; the environment
variable ``STRUCTMAT_BACKEND`` sets the initial value.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ..structures.base import invalidate_plans, plan_key

BACKENDS = ("auto", "reference", "triton", "cublas", "decode", "dense")
_default = os.environ.get("STRUCTMAT_BACKEND", "auto").strip().lower() or "auto"
if _default not in BACKENDS:
    raise ValueError(f"STRUCTMAT_BACKEND={_default!r}; valid backends: {', '.join(BACKENDS)}")
# One process-wide setting (a plain global, so torch.compile can guard on it; not per thread).
_BACKEND = [_default]

#: Set by ``structmat.kernels`` once the Triton ops imported successfully.
ops = None  # the ``structmat.kernels.ops`` module, or None without Triton
decode = None  # the ``structmat.kernels.decode`` module, or None without Triton
DECODE_MAX_TOKENS = 64
TRACE_MANY_TOKENS = 4096  # the token count the cost model assumes for a compiled graph's "many tokens" branch
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def set_backend(name: str) -> None:
    """Force a backend for every structured product (``auto`` restores the automatic choice)."""
    name = str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    _BACKEND[0] = name
    invalidate_plans()


def get_backend() -> str:
    return _BACKEND[0]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend("reference"): ...`` forces a backend inside the block and restores the previous one."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        _BACKEND[0] = previous
        invalidate_plans()


@contextlib.contextmanager
def asking(name: str) -> Iterator[None]:
    """``with asking("decode"): choose(...)``: what a forced backend would choose, asked without forcing it (no
    plan is made or invalidated, unlike ``use_backend``, whose exit invalidates every layer's plans)."""
    previous, _BACKEND[0] = _BACKEND[0], name
    try:
        yield
    finally:
        _BACKEND[0] = previous


#: The last choice per op, for the benchmark and for curious users: {op: backend}.
#: Every op's key exists from the start ("" until its first call): a traced write that added a key made dynamo guard
#: on the dict's keys, so a process whose first structured call was compiled recompiled once the dict filled.
LAST_CHOICE: dict[str, str] = {op: "" for op in ("blockdiag", "monarch", "lowrank", "nm")}

# ----------------------------------------------------------------------------------------------------------------
# Dense pre-merge, cached per first factor tensor
# ----------------------------------------------------------------------------------------------------------------

# id(first factor) -> (weakref to it, validity key, merged weight); the entry dies with the factor.
_dense_cache: dict[int, tuple[weakref.ref, tuple, Tensor]] = {}


def _cache_key(factors: tuple[Tensor, ...], dtype: torch.dtype) -> tuple:
    # the inference-mode flag is part of the key: a merge cached under torch.inference_mode() is an inference tensor,
    # which autograd refuses to save, so training after an inference-mode evaluation must merge afresh
    return tuple((id(f), f.data_ptr(), f._version, f.dtype, f.device, tuple(f.shape)) for f in factors) + (
        dtype, torch.is_inference_mode_enabled())


def merged_weight(merge: Callable[..., Tensor], factors: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
    """``merge(*factors)`` as a dense (out, in) matrix in ``dtype``; cached when no factor needs a gradient."""
    needs_grad = torch.is_grad_enabled() and any(f.requires_grad for f in factors)
    work = torch.float64 if dtype == torch.float64 else torch.float32  # merge once in >= fp32, round once
    if needs_grad or torch.compiler.is_compiling():
        if all(f.is_cuda and f.dtype == dtype for f in factors) and dtype in (torch.bfloat16, torch.float16):
            # Per-step merge in training: cuBLAS accumulates 16-bit products in fp32 and rounds each element of
            # the merged weight once, as merging in fp32 then casting does, without the four casts
            return merge(*factors)
        return merge(*(f.to(work) for f in factors)).to(dtype)
    key = _cache_key(factors, dtype)
    owner = factors[0]
    hit = _dense_cache.get(id(owner))
    if hit is not None and hit[0]() is owner and hit[1] == key:
        return hit[2]
    with torch.no_grad():
        W = merge(*(f.to(work) for f in factors)).to(dtype)
    if hit is None or hit[0]() is not owner:
        weakref.finalize(owner, _dense_cache.pop, id(owner), None)
    _dense_cache[id(owner)] = (weakref.ref(owner), key, W)
    return W


def clear_cache() -> None:
    """Drop the cached dense merges, the cached automatic decisions and every layer's cached inference plans (after
    changing the cost constants)."""
    _dense_cache.clear()
    _decisions.clear()
    invalidate_plans()


def merge_blockdiag(W: Tensor) -> Tensor:
    return torch.block_diag(*W)


def merge_monarch(R: Tensor, L: Tensor) -> Tensor:
    b, bc, p = R.shape
    u, c = L.shape[1], bc // b
    grid = torch.einsum("stkq,ksqj->stkj", L.reshape(b, u, b, c), R.reshape(b, b, c, p))
    return grid.reshape(b * u, b * p)


def merge_lowrank(U: Tensor, V: Tensor) -> Tensor:
    return U @ V


# ----------------------------------------------------------------------------------------------------------------
# Cost model (auto): estimate = max(host time, device time); the host runs ahead of the GPU until it is the
# bottleneck. Host times are measured per call on the lent H200's host (benchmarks/NOTES.md, run 6:
# benchmarks/experiments/impl_variants.py, profile_fwdbwd.py and launch_overhead.py at 16 tokens, where every
# path is host-bound); device times come from the FLOPs at a measured fraction of peak. Few-token calls are
# host-bound and go to the path with the fewest host operations.
# Check a new table against a results file with ``python benchmarks/eval_dispatch.py <json>``.
# ----------------------------------------------------------------------------------------------------------------

PEAK_TFLOPS = {torch.bfloat16: 790.0, torch.float16: 790.0, torch.float32: 51.0}  # fp32: IEEE (no TF32)
BANDWIDTH_GBS = 4300.0  # H200, device-to-device copy (KINDS.md)

#: Host microseconds of one layer call at few tokens: (forward, forward+backward with every gradient).
#: Forward+backward includes autograd's engine, which runs a CUDA backward on its device thread (a trivial Python
#: backward node costs ~46 us more there than on the calling thread: benchmarks/experiments/backward_thread.py).
#: Forward (inference): one layer call in eager, no_grad, through the layer (its per-shape plan cached), at one token,
#: on the lent H200's host (benchmarks/results/decode-layers-20261203T150038Z.json, eager_us, median over the
#: bench-infer layer shapes; F.linear alone took 16-24 us there, a Triton decode launch ~30 us more than cuBLAS's).
HOST_US = {
    ("monarch", "triton"): (160.0, 650.0),  # forward: 1 Triton + 1 cuBLAS launch; backward: 7 cuBLAS calls
    ("monarch", "cublas"): (190.0, 700.0),  # b + 1 cuBLAS calls forward (measured at b = 4; host_us adds per block)
    ("monarch", "reference"): (115.0, 780.0),
    ("blockdiag", "triton"): (57.0, 260.0),
    ("blockdiag", "cublas"): (56.0, 260.0),
    ("blockdiag", "reference"): (46.0, 220.0),
    ("lowrank", "reference"): (52.0, 250.0),
    ("dense", "dense"): (25.0, 150.0),  # pre-merged weight: one F.linear (cache check included)
    # decode kernels (inference only): a layer's eager form, one call into its plan, launched directly (one launch at
    # one token): median over the three bench layer shapes at one token on the lent H200's host, session 9 round 4
    # (benchmarks/results/host-costs-20261204T075901Z.json, where nn.Linear took 17-24 us and the references
    # 28-44 us block-diagonal, 38-55 us low-rank, 59-84 us Monarch)
    ("monarch", "decode"): (21.0, float("inf")),
    ("blockdiag", "decode"): (18.0, float("inf")),
    ("lowrank", "decode"): (21.0, float("inf")),
    ("nm", "decode"): (18.0, float("inf")),
    ("nm", "reference"): (1000.0, 3000.0),
}


def host_us(op: str, backend: str, nblocks: int, training: bool) -> float:
    """Host microseconds of one forward (or forward+backward) call."""
    fwd, fwdbwd = HOST_US[("dense", "dense") if backend == "dense" else (op, backend)]
    us = fwdbwd if training else fwd
    if op == "monarch" and backend in ("triton", "cublas"):  # permuted roles on cuBLAS: one call per block
        per_block = {"triton": (0.0, 60.0), "cublas": (12.0, 100.0)}[backend][int(training)]
        us += (nblocks - 4) * per_block
    return us


# Fraction of PEAK_TFLOPS reached on large problems (bf16, >= 8192 tokens; runs 5-6 on the H200).
EFFICIENCY = {"dense": 0.95, "triton": {"monarch": 0.77, "blockdiag": 0.86},
              "cublas": {"monarch": 0.77, "blockdiag": 0.86},
              "reference": {"monarch": 0.36, "blockdiag": 0.46, "lowrank": 0.88, "nm": 0.5},
              "decode": 0.3}  # (thin tiles, tokens padded to >= 16 rows: FLOPs rarely bind at <= 64 tokens; bytes do)
# Fraction of BANDWIDTH_GBS reached where bytes bind, for a path without a measured few-token cost below.
BW_FRACTION = {"dense": 0.9, "other": 0.4}
#: Few-token inference cost of each path inside a CUDA graph, the weight cold in HBM as in a model (the time is the
#: weight's bytes plus a fixed cost per call: launches, ramp-up, the first DRAM round trip): (fixed us at 1 token,
#: fixed us at 2+ tokens, GB/s on the bytes). Fitted on the H200 to the bench-infer layer shapes (2048x2048,
#: 2048->8192, 8192->2048) at 1 and 16 tokens (benchmarks/results/decode-layers-20261203T150038Z.json and
#: -150111Z.json; cuBLAS dense F.linear fits 4.0 us + 4070 GB/s there). The references take extra copy kernels from
#: 2 tokens on (block-diagonal's output transpose, Monarch's permutation), where the custom ops' strided cuBLAS calls
#: do not. Low-rank's decode kernels at 2+ tokens (the first stage's splits summed in its kernel since session 12) refit
#: to decode-layers-20261204T141821Z.json (8.4 / 14.2 / 14.4 us at 4.2 / 16.7 / 16.7 MB, 16 tokens; the two cuBLAS
#: calls 9.5 / 11.8 / 14.0) and the kernel rows under graphs (kernels-20261204T141857Z.json: at rank 512 of 2048->8192
#: and 8192->2048, 10.5 MB, cuBLAS was the faster): decode below ~9.5 MB.
FEW_TOKEN_COST = {
    ("blockdiag", "decode"): (2.5, 2.5, 2500.0), ("blockdiag", "reference"): (3.1, 5.7, 3600.0),
    ("blockdiag", "cublas"): (3.1, 3.1, 3600.0), ("blockdiag", "triton"): (3.1, 3.1, 3600.0),
    ("monarch", "decode"): (3.6, 3.6, 1230.0), ("monarch", "triton"): (6.5, 7.5, 2360.0),
    ("monarch", "cublas"): (13.9, 13.9, 1200.0), ("monarch", "reference"): (8.6, 14.0, 3800.0),
    ("lowrank", "reference"): (7.9, 7.9, 2840.0), ("lowrank", "decode"): (7.9, 6.5, 2000.0),
    ("nm", "decode"): (2.3, 2.3, 1780.0), ("nm", "reference"): (5.0, 5.0, 67.0),
}
#: One token, decode backend: the one-launch two-stage kernel (_triton_decode._decode_fused), (fixed us, GB/s), fitted
#: the same way (decode-layers-20261203T174120Z.json). Low-rank takes it at every size; Monarch from
#: _triton_decode.MONARCH_FUSED_MIN_BYTES (the crossover with the two-launch fit above), so its cost is the lower one.
FUSED_ONE_TOKEN_COST = {"lowrank": (6.6, 2920.0), "monarch": (6.5, 2780.0)}
#: The same product as the PDL-joined pair (_triton_decode.PDL, Hopper and later), fitted to the fused siblings' and
#: single layers' products of the bench shape (decode-groups-20261203T232921Z.json: low-rank 4.2-33.4 MB in
#: 4.5-14.0 us, Monarch 12.6-32.6 MB in 6.5-13.2 us)
PDL_ONE_TOKEN_COST = {"lowrank": (3.1, 3070.0), "monarch": (2.3, 2980.0)}
#: Low-rank above one token as the PDL pair (``_triton_decode.pdl_dot_ok``: the second stage's weight loaded while the
#: first stage runs), (fixed us at 2+ tokens, GB/s), fitted the same way (decode-layers-20261204T144046Z.json:
#: 6.7 / 6.8 us at 4.2 MB, 12.2 / 12.9 us at 16.7 MB, 4 / 16 tokens; the plain second launch 8.4 / 14.0-14.4)
PAIRED_MULTI_TOKEN_COST = {"lowrank": (4.8, 2170.0)}
#: Monarch above one token, by stage: (fixed us, GB/s on the first stage's weight R, GB/s on the second's L). The two
#: paths stream the stages differently: decode's gemv pair takes R (a long reduction) better, the Triton path's cuBLAS
#: second stage takes a wide L far better, so at equal bytes 2048->8192 and 8192->2048 measured opposite (session 13
#: round 6). Fitted on the H200 at 2-64 tokens, cold, to 12 Monarchs (the bench model's layers and `bench kernels`'
#: rows: nb=4 and 8 at 2048^2, 4096^2, 2048->8192, 8192->2048; decode-layers-20261204T165753Z.json and -170448Z.json):
#: picking by it cost 2.6 us over the 54 cases (one pick off by more than 0.5 us), the bytes-only fit above 15 us
#: over the 36 at 2-16 tokens. (A per-token term did not pick better.)
MONARCH_STAGE_COST = {"decode": (5.24, 2269.0, 1690.0), "triton": (6.48, 1988.0, 4943.0)}
FP32_TRITON_MONARCH_EFF = 0.08  # IEEE fp32 dots in the Triton kernel measured far below cuBLAS's fp32 path


def _peak(dtype: torch.dtype) -> float:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return 395.0
    return PEAK_TFLOPS.get(dtype, 51.0)


def estimate_us(op: str, backend: str, flops: float, nbytes: float, dtype: torch.dtype, training: bool = False,
                nblocks: int = 4, graphed: bool = False, tokens: int = 1, paired: bool = False,
                stages: tuple[float, float] | None = None) -> float:
    """Estimated microseconds of one call: host-bound or device-bound, whichever is larger. ``flops`` and
    ``nbytes`` are the forward's; training triples both (grad input and grad weights). ``graphed``: the call is
    replayed from a CUDA graph (captured, or compiled for one), where the host cost is gone: the GPU time alone."""
    device = device_us(op, backend, flops, nbytes, dtype, training, tokens, paired, stages)
    return device if graphed else max(host_us(op, backend, nblocks, training), device)


def device_us(op: str, backend: str, flops: float, nbytes: float, dtype: torch.dtype, training: bool = False,
              tokens: int = 1, paired: bool = False, stages: tuple[float, float] | None = None) -> float:
    """Estimated GPU microseconds of one call: FLOP-bound or byte-bound, whichever is larger (in inference, plus the
    path's fixed cost per call, FEW_TOKEN_COST). ``stages``: the two weights' bytes of a two-stage product (Monarch's
    R and L), for the by-stage fits above one token (MONARCH_STAGE_COST)."""
    eff = EFFICIENCY[backend]
    eff = eff[op] if isinstance(eff, dict) else eff
    if dtype == torch.float32 and backend == "triton" and op == "monarch":
        eff = FP32_TRITON_MONARCH_EFF
    flop_us = flops / (_peak(dtype) * 1e12 * eff) * 1e6
    staged = MONARCH_STAGE_COST.get(backend) if op == "monarch" and stages is not None else None
    if staged is not None and not training and 1 < tokens <= DECODE_MAX_TOKENS:
        fixed, gbs1, gbs2 = staged
        return max(flop_us, stages[0] / (gbs1 * 1e3) + stages[1] / (gbs2 * 1e3)) + fixed
    few = None if training else FEW_TOKEN_COST.get((op, backend))
    if few is not None and paired and backend == "decode" and tokens > 1:
        fixed, gbs = PAIRED_MULTI_TOKEN_COST[op]
        few = (few[0], fixed, gbs)
    if few is not None:
        us = max(flop_us, nbytes / (few[2] * 1e3)) + (few[0] if tokens <= 1 else few[1])
        table = PDL_ONE_TOKEN_COST if _pdl_enabled() else FUSED_ONE_TOKEN_COST
        fused = table.get(op) if backend == "decode" and tokens <= 1 else None
        if fused is not None and _fused_enabled():
            one = max(flop_us, nbytes / (fused[1] * 1e3)) + fused[0]
            us = min(us, one)  # (the plan takes whichever form is cheaper: low-rank's fused form always is)
        return us
    bandwidth = BANDWIDTH_GBS * 1e9 * BW_FRACTION.get(backend, BW_FRACTION["other"])
    return (3.0 if training else 1.0) * max(flop_us, nbytes / bandwidth * 1e6)


def _fused_enabled() -> bool:
    return decode is not None and decode._triton_decode.FUSED[0]


def _pdl_enabled() -> bool:
    """The PDL pair is on (where the GPU has it: the cost model does not see the device; older GPUs take the one
    grid, whose cost is higher, so a choice made with these numbers may be optimistic there)."""
    return _fused_enabled() and decode._triton_decode.PDL[0]


def choose(op: str, n: int, in_features: int, out_features: int, struct_flops: float, struct_bytes: float,
           dtype: torch.dtype, nblocks: int, training: bool, factor_grad: bool, kernels_ok: bool,
           graphed: bool = False, exclude: tuple[str, ...] = (), paired: bool = False,
           stages: tuple[float, float] | None = None) -> str:
    """The automatic choice, from shapes only (the benchmark's offline check calls this too). ``graphed``: the call
    runs inside a CUDA graph or a compiled graph, so the GPU time decides; otherwise (eager) the host's cost counts
    too, and at few tokens it is the larger. Inference above DECODE_MAX_TOKENS (prefill) is device-bound as a whole
    (the host queues a forward's kernels faster than the GPU runs them), so the GPU time decides there too.
    ``exclude``: backends this layer's shapes rule out (see ``TRITON_MONARCH_CHUNK``); ``stages``: ``device_us``'s."""
    graphed = graphed or (not training and n > DECODE_MAX_TOKENS)
    est = {"reference": estimate_us(op, "reference", struct_flops, struct_bytes, dtype, training, nblocks, graphed, n,
                                    stages=stages)}
    if kernels_ok and op in ("monarch", "blockdiag"):
        for be in ("triton", "cublas"):
            if be in exclude:
                continue
            est[be] = estimate_us(op, be, struct_flops, struct_bytes, dtype, training, nblocks, graphed, n,
                                  stages=stages)
    if kernels_ok and not training and n <= DECODE_MAX_TOKENS:  # few tokens: the time is the weight's bytes
        est["decode"] = estimate_us(op, "decode", struct_flops, struct_bytes, dtype, training, nblocks, graphed, n,
                                    paired, stages)
    # Never the dense merge: cached, it is a hidden dense copy of every layer (a "compressed" model then holds more
    # memory than the dense one: issue 12); merged differentiably every step it measured slower than every structured
    # path at every token count (run 6, kernels-20261201T012737Z.json). merge_for_inference() is the explicit choice.
    # Ties (host-bound at few tokens) go to the path with less GPU time: under CUDA graphs (torch.compile's
    # reduce-overhead, a captured decode step) the host cost is gone and only that remains.
    best, best_key = "reference", None
    for be, us in est.items():  # (a plain loop: min(key=...) is a graph break under torch.compile)
        key = (us, device_us(op, be, struct_flops, struct_bytes, dtype, training, n, paired, stages))
        if best_key is None or key < best_key:
            best, best_key = be, key
    return best


_decisions: dict[tuple, str] = {}
_GRAPHED: list[bool | None] = [None]  # set by the planner to ask what a captured call would choose


def _pick(op: str, x: Tensor, factors: tuple[Tensor, ...], cost: Callable[[int], tuple[float, float]],
          out_features: int, nblocks: int = 1, exclude: Callable[[int], tuple[str, ...]] | None = None,
          paired: Callable[[int], bool] | None = None, stages: tuple[float, float] | None = None) -> str:
    """Resolve ``auto`` (and impossible forced choices) to a concrete backend. ``cost(tokens)`` gives the
    structure's forward (FLOPs, bytes) at that many tokens; ``exclude(tokens)``: backends ruled out there;
    ``paired(tokens)``: its decode kernels run as a PDL pair there (``PAIRED_MULTI_TOKEN_COST``); ``stages``: the
    two stages' weight bytes (``device_us``)."""
    backend = get_backend()
    if backend in ("reference", "dense"):
        return backend
    if not (x.is_cuda or INTERPRET):  # (the interpreter runs the kernels on CPU tensors: tests)
        return "reference"
    kernels_ok = ops is not None and _kernel_dtype_ok(x, factors)
    if backend in ("triton", "cublas"):
        return backend if kernels_ok else "reference"
    grad = torch.is_grad_enabled()
    factor_grad = grad and any(f.requires_grad for f in factors)
    training = factor_grad or (grad and x.requires_grad)
    if backend == "decode":
        return "decode" if kernels_ok and not training and x.shape[0] <= DECODE_MAX_TOKENS else "reference"
    if torch.compiler.is_compiling():
        # Decided while tracing and baked into the graph, with one guard on the token count (few or many): the cost
        # model on a symbolic count would guard on every comparison it makes and recompile whenever one flips, and
        # reading or writing the decision cache would guard on its contents. The choice changes speed, never math.
        # A compiled decode graph is replayed from a CUDA graph (reduce-overhead, cudagraphs): the GPU time decides.
        # A static count (a plain int: dynamo already specialized the graph on it, e.g. batch-1 decode with a static
        # cache) is decided for itself, so one token gets the one-token kernels.
        n = x.shape[0]
        if not isinstance(n, int):
            n = DECODE_MAX_TOKENS if n <= DECODE_MAX_TOKENS else TRACE_MANY_TOKENS
        # (``paired is not None``, never the function's truthiness: dynamo breaks the graph on a jump on a function)
        return choose(op, n, x.shape[1], out_features, *cost(n), x.dtype, nblocks, training, factor_grad,
                      kernels_ok, graphed=True, exclude=() if exclude is None else exclude(n),
                      paired=paired is not None and bool(paired(n)), stages=stages)
    graphed = _GRAPHED[0] if _GRAPHED[0] is not None else x.is_cuda and torch.cuda.is_current_stream_capturing()
    key = (op, tuple(x.shape), tuple(tuple(f.shape) for f in factors), x.dtype, training, factor_grad, kernels_ok,
           graphed)
    hit = _decisions.get(key)
    if hit is None:
        n = x.shape[0]
        hit = choose(op, n, x.shape[1], out_features, *cost(n), x.dtype, nblocks, training, factor_grad, kernels_ok,
                     graphed, () if exclude is None else exclude(n), paired is not None and bool(paired(n)), stages)
        if len(_decisions) < 4096:
            _decisions[key] = hit
    return hit


def _record(op: str, choice: str) -> None:
    LAST_CHOICE[op] = choice  # (under torch.compile a write, never read there: no guard on the dict's contents)


def _kernel_dtype_ok(x: Tensor, factors: tuple[Tensor, ...]) -> bool:
    return (x.dtype in (torch.float16, torch.bfloat16, torch.float32) and all(f.dtype == x.dtype for f in factors)
            and all(f.device == x.device for f in factors) and x.dim() == 2
            and max(t.numel() for t in (x, *factors)) < 2**31)


def _autocast(*tensors: Tensor) -> tuple[Tensor, ...]:
    x = tensors[0]
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")  # (floating tensors only: N:M's packed positions stay as they are)
        return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors)
    return tensors


# ----------------------------------------------------------------------------------------------------------------
# The fast paths registered with structures.base.run_op
# ----------------------------------------------------------------------------------------------------------------


# Each op: its choice for these inputs (``_<op>_choice``, after autocast), and the call that runs a choice. The fast
# path (``<op>_fast``) decides on every call; the planner (``<op>_plan``, used by ``run_op`` when gradients are off)
# decides once per shape and returns the chosen call, which the layer replays while the shapes hold.


def _blockdiag_choice(x: Tensor, W: Tensor) -> str:
    b, u, p = W.shape
    es = x.element_size()
    return _pick("blockdiag", x, (W,), lambda n: (2.0 * n * W.numel(), es * (W.numel() + n * b * (u + p))), b * u, b)


def _blockdiag_call(choice: str) -> Callable[..., Tensor] | None:
    if choice == "dense":
        return lambda x, W: F.linear(x, merged_weight(merge_blockdiag, (W,), x.dtype))
    if choice == "decode":
        return decode.blockdiag
    if choice in ("triton", "cublas"):
        return lambda x, W: ops.blockdiag(x, W, choice)
    return None


#: The Triton grouped GEMM stores Monarch's stage 1 (and its gradient) in chunks of the block rank c; a chunk that is
#: not a multiple of its narrowest tile (64 columns) takes a scattered per-column store instead of contiguous rows.
#: Measured on the H200 at 8192 tokens, block rank 200 (the bench model's 2048<->8192 layers): 0.60 ms under
#: "triton" vs 0.25 ms under "cublas" (dense 0.40 / 0.37 ms; prefill-layers-20261203T204450Z.json), so such layers
#: take the Triton path above TRITON_CHUNK_FREE_TOKENS tokens only if it is forced. At 2-64 tokens the scattered store
#: is a few rows: there the same layers measured fastest on it, 2048->8192 at 2 / 4 / 16 / 32 / 64 tokens 10.4-11.4 /
#: 10.4-11.3 / 12.5-12.6 / 12.8 / 14.1 us against decode's 14.1 / 14.1 / 13.9 / 17.1 / 23.2 (dense 10.6-11.2;
#: decode-layers-20261204T165753Z.json, -170448Z.json).
TRITON_MONARCH_CHUNK = 64
TRITON_CHUNK_FREE_TOKENS = 64
#: Inference at many tokens with a wide block rank: cuBLAS's per-chunk strided-batched calls run stage 1 faster than
#: the Triton grouped GEMM once each call is large. Measured on the H200, bf16, from CUDA graphs
#: (monarch-many-20261205T031840Z.json): 4096^2 nb=4 (block rank 256) at 8192 tokens 0.2225 ms cuBLAS against
#: 0.243 Triton, where at 1024 tokens Triton led (0.033 against 0.041), and at block rank 128 / 64 (2048^2 nb=4,
#: 4096^2 nb=8) Triton led at 8192 tokens too (0.074 / 0.146 against 0.083 / 0.257). The cost model gives both the
#: same efficiency (a tie goes to Triton), so this rule, fitted to those four points, sends such layers to cuBLAS.
CUBLAS_MONARCH_MIN_CHUNK = 256
CUBLAS_MONARCH_MIN_TOKENS = 8192


def _monarch_choice(x: Tensor, R: Tensor, L: Tensor) -> str:
    b, bc, p = R.shape
    u = L.shape[1]
    es, numel = x.element_size(), R.numel() + L.numel()
    # (the opt-in one-launch inference forward, ops.MONARCH_FUSED, has no chunked store: nothing to exclude there)
    inference = ops is not None and not ops._needs_autograd(x, R, L)
    c = bc // b
    aligned = c % TRITON_MONARCH_CHUNK == 0

    def exclude(n: int) -> tuple[str, ...]:
        if inference and ops.fused_applies(n, x, R, L, "triton"):
            return ()  # (the opt-in one-launch forward, asked for)
        if inference and n >= CUBLAS_MONARCH_MIN_TOKENS and c >= CUBLAS_MONARCH_MIN_CHUNK:
            return ("triton",)  # (measured slower than cuBLAS there)
        return () if aligned or n <= TRITON_CHUNK_FREE_TOKENS else ("triton",)

    return _pick("monarch", x, (R, L), lambda n: (2.0 * n * numel, es * (numel + n * (b * p + 2 * b * bc + b * u))),
                 b * u, b, exclude, stages=(es * R.numel(), es * L.numel()))


def _monarch_call(choice: str) -> Callable[..., Tensor] | None:
    if choice == "dense":
        return lambda x, R, L: F.linear(x, merged_weight(merge_monarch, (R, L), x.dtype))
    if choice == "decode":
        return decode.monarch
    if choice in ("triton", "cublas"):
        return lambda x, R, L: ops.monarch(x, R, L, choice)
    return None


def _lowrank_choice(x: Tensor, U: Tensor, V: Tensor) -> str:
    r = U.shape[1]
    es, numel, io = x.element_size(), U.numel() + V.numel(), U.shape[0] + V.shape[1]
    choice = _pick("lowrank", x, (U, V), lambda n: (2.0 * n * r * io, es * (numel + n * (io + 2 * r))), U.shape[0],
                   paired=lambda n: decode is not None and decode._triton_decode.pdl_dot_ok(n, r, U.numel() * es,
                                                                                            x.device))
    # every other backend: two cuBLAS GEMMs are the fastest correct implementation (see the module docstring)
    return choice if choice in ("dense", "decode", "reference") else "cublas"


def _lowrank_call(choice: str) -> Callable[..., Tensor] | None:
    if choice == "dense":
        return lambda x, U, V: F.linear(x, merged_weight(merge_lowrank, (U, V), x.dtype))
    return decode.lowrank if choice == "decode" else None


def _nm_choice(x: Tensor, values: Tensor, positions: Tensor, n: int, m: int) -> str:
    if positions.dtype != torch.uint8 or values.stride(1) != 1 or positions.stride(1) != 1:
        return "reference"
    es, numel = x.element_size(), values.numel()
    weight = es * numel + positions.numel()  # (values and packed positions)
    choice = _pick("nm", x, (values,), lambda t: (2.0 * t * numel, weight + es * t * (x.shape[1] + values.shape[0])),
                   values.shape[0])
    if choice == "decode":
        return choice
    if (x.shape[0] > DECODE_MAX_TOKENS and get_backend() in ("auto", "triton") and ops is not None
            and (x.is_cuda or INTERPRET)
            and not ops._needs_autograd(x, values) and _kernel_dtype_ok(x, (values,))):
        # many tokens in inference: the reference's tiles, each rebuilt by one Triton kernel (``ops.nm``) instead of
        # ~10 PyTorch kernels (2:4 prefill 0.35x dense on the H200 with those)
        return "triton"
    return "reference"


def _nm_call(choice: str) -> Callable[..., Tensor] | None:
    return decode.nm if choice == "decode" else ops.nm if choice == "triton" else None


_OPS = {"blockdiag": (_blockdiag_choice, _blockdiag_call), "monarch": (_monarch_choice, _monarch_call),
        "lowrank": (_lowrank_choice, _lowrank_call), "nm": (_nm_choice, _nm_call)}


def _fast(op: str, x: Tensor, *rest) -> Tensor | None:
    x, *rest = _autocast(x, *rest)
    choose_, call_ = _OPS[op]
    choice = choose_(x, *rest)
    _record(op, choice)
    fn = call_(choice)
    return None if fn is None else fn(x, *rest)


def blockdiag_fast(x: Tensor, W: Tensor) -> Tensor | None:
    return _fast("blockdiag", x, W)


def monarch_fast(x: Tensor, R: Tensor, L: Tensor) -> Tensor | None:
    return _fast("monarch", x, R, L)


def lowrank_fast(x: Tensor, U: Tensor, V: Tensor) -> Tensor | None:
    return _fast("lowrank", x, U, V)


def nm_fast(x: Tensor, values: Tensor, positions: Tensor, n: int, m: int) -> Tensor | None:
    """N:M at few tokens in inference: the decode kernel on the compressed values and packed positions; otherwise
    the reference (a few rows of the weight rebuilt at a time)."""
    return _fast("nm", x, values, positions, n, m)


def eager_form(layer, x: Tensor) -> Callable[[Tensor], Tensor] | None:
    """``structures.base.EAGER_FORM``: the layer's whole eager call for inputs like ``x`` (N-D, contiguous), where
    its cached plan for them (just made by its first call) runs a decode kernel: that kernel's plan on ``x`` as it
    comes, the output allocated in its final shape, the factors read from the layer on each call (a plan never
    holds them). Few-token eager decode is host-bound: this is one Python call and one launch where the layer's
    path makes several calls, two reshapes and the plan lookup. None anywhere else (a padded layer, another
    choice, a CUDA graph capture, a bias in another dtype)."""
    from ..siblings import _LAYOUT, _padded

    if decode is None or _padded(layer) or layer.name not in _LAYOUT or (
            x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    op, layout = _LAYOUT[layer.name]
    if op not in decode.PLANS:
        return None
    if not getattr(layer._plans.get(plan_key(x.reshape(-1, x.shape[-1]))), "decode", False):  # (run_op's plan)
        return None
    sources = tuple((layer._buffers if buffer else layer._parameters, name) for name, _, buffer in layout)
    extra = (layer.n, layer.m) if op == "nm" else ()
    plan = decode.PLANS[op](x, *(d[n] for d, n in sources), *extra)
    if len(sources) == 1:
        (d0, n0), = sources
        run = lambda x: plan(x, d0[n0], *extra)  # noqa: E731
    else:
        (d0, n0), (d1, n1) = sources
        run = lambda x: plan(x, d0[n0], d1[n1], *extra)  # noqa: E731
    bias = layer._parameters.get("bias")
    if bias is None:
        return run
    if bias.dtype != x.dtype:
        return None
    params = layer._parameters
    return lambda x: run(x).add_(params["bias"])


def ready_captured(op: str, x: Tensor, *rest, ran: str | None = None,
                   reference: Callable[..., Tensor] | None = None) -> None:
    """Run ``op`` on these inputs once now as a CUDA-graph capture of them would (its choice by GPU time alone), so
    its kernels are compiled, loaded and autotuned before a capture, never inside one: always the captured form of
    the decode kernels (eager plans may take other kernels, ``decode._eager``), another path only where it is not
    ``ran`` (what this eager call ran) nor the dense merge. ``reference``: the call where the choice has none."""
    choose_, call_ = _OPS[op]
    _GRAPHED[0] = True
    try:
        graphed = choose_(x, *rest)
    finally:
        _GRAPHED[0] = None
    if graphed == "decode":
        with decode.captured_form():
            decode.PLANS[op](x, *rest)(x, *rest)
    elif graphed not in (ran, "dense"):
        fn = call_(graphed) or reference
        if fn is not None:
            fn(x, *rest)


def planner(op: str) -> Callable[..., Callable[..., Tensor] | None]:
    """``run_op``'s planner for ``op``: the call chosen for these inputs, replayed by the layer while the shapes,
    dtypes, device, backend setting and autocast state are those of the key ``run_op`` caches it under. Not under
    autocast (the casts are per call) nor for the dense merge (its cache checks the factors' versions per call)."""
    choose_, call_ = _OPS[op]

    def plan(reference: Callable[..., Tensor], x: Tensor, *rest) -> Callable[..., Tensor] | None:
        if x.is_cuda and torch.is_autocast_enabled("cuda"):
            return None
        choice = choose_(x, *rest)
        if choice == "dense":
            return None
        # decode: the kernels' own plan for this shape (tile plans, grids and constant arguments made once)
        fn = decode.PLANS[op](x, *rest) if choice == "decode" else call_(choice) or reference
        if x.is_cuda and not torch.cuda.is_current_stream_capturing():
            ready_captured(op, x, *rest, ran=choice, reference=reference)

        def run(*args: Tensor) -> Tensor:
            _record(op, choice)
            return fn(*args)

        run.decode = choice == "decode"  # (eager_form builds the layer's whole call on it)
        return run

    return plan
