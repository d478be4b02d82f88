r"""Compression of a pretrained model in one call: calibrate, choose (a plan or the budget solver), project, swap.

:class:`Compressor` is the library call the CLI, the demo and the sweep use::

    comp = Compressor(model, batches, scope=r".*layers\.\d+\..*", device="cuda", sequential=True)
    half = comp.budget(0.5)                      # a compressed copy: .model, .report, .plan
    quarter = comp.budget(0.25)                  # statistics, prices and sensitivities are reused
    wanda = comp.uniform({r".*": Target("nm:n=2,m=4", "wanda")})

Two ways to calibrate:
- one-shot: statistics of every in-scope layer's input are collected in one pass over the ORIGINAL model, once,
  and reused for every plan and target;
- layer-sequential (``sequential=True``): blocks are processed in order; the inputs of block l are the outputs of
  the already-compressed blocks < l, so later layers are fitted to what they will really see. It works for any
  model whose repeated blocks sit in an ``nn.ModuleList`` (found automatically: the one holding the most linear
  layers).

``device=`` is where statistics and projections are computed; ``offload=True`` keeps the model on the CPU and
onloads one block at a time (everything outside the blocks — embeddings, norms, head — visits the device only to
compute the first block's inputs), so device memory is bounded by one block, its statistics, the calibration
activations and one forward piece or one layer's projection (see :func:`blockwise`). Statistics are float32 by
default (``stats_dtype=torch.float64`` for float64 projections too). Layers that share an input (q/k/v,
gate/up) share one statistics object and therefore one factorization.

Budget mode prices every layer's candidates (each allowed structure's size ladder) on the one-shot statistics of
the original model — the solver needs every layer's options before it chooses — then applies its choice
(sequentially if asked).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .calibrate import InputStats, assemble, collect_input_stats
from .calibrate.stats import linear_in_features
from .modules import dense_weight, linear_modules
from .plan import Plan, Target
from .project import batches_inputs, check_method, default_allow, price, price_many, stacks_rows
from .project.budget_solver import Candidate, solve_budget
from .structures import structure_class
from .structures.base import RatioSpec, parse_spec
from .surgery import Report, check_plan_fits, structurize

DEFAULT_ALLOW = default_allow()  # from the registrations (budget_default=)
# tokens per block forward in block-by-block passes on a GPU: the working set of a 1B-shaped block's forward
# (SwiGLU intermediates, the float32 copy of down_proj's input) is then ~0.1 GB instead of ~0.5 GB for a
# 4096-token batch, and matrices of 1024 rows still keep the GPU busy
AUTO_FORWARD_TOKENS = 1024


# ------------------------------------------------------------------------------------------------
# Running calibration batches
# ------------------------------------------------------------------------------------------------

def _call_model(model: nn.Module, batch: dict[str, Tensor]) -> Any:
    kwargs = dict(batch)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False  # a KV cache would grow across calibration batches
    return model(**kwargs)


def run_batches(model: nn.Module, batches: Sequence[dict[str, Tensor]], progress: bool = False) -> Callable[[], None]:
    def run() -> None:
        from tqdm.auto import tqdm

        with torch.no_grad():
            for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
                _call_model(model, batch)
    return run


def matched_layers(model: nn.Module, plan: Plan) -> dict[str, Target]:
    """Module name -> target for every linear layer the plan structures (skips and unmatched dropped)."""
    out = {}
    for name in linear_modules(model):
        target = plan.match(name)
        if target is not None:
            out[name] = target
    return out


def calibrate(model: nn.Module, names: Iterable[str], batches: Sequence[dict[str, Tensor]],
              progress: bool = False, dtype: torch.dtype = torch.float64) -> dict[str, InputStats]:
    """One-shot statistics of the inputs of ``names`` over ``batches``."""
    return collect_input_stats(model, list(names), run_batches(model, batches, progress), dtype=dtype)


def check_plan(plan: Any) -> Plan:
    """A Plan whose every target names a known structure and a projection method that applies to it, with valid
    options: checked before any model is loaded or any batch is run."""
    plan = Plan.coerce(plan)
    for entry in plan.entries:
        target = entry.target
        if target is None:
            continue
        structure = target.spec.structure if isinstance(target.spec, RatioSpec) else target.spec.name
        try:
            check_method(target.method, structure)
        except ValueError as err:
            raise ValueError(f"plan entry {entry.pattern!r}: {err}") from None
    return plan


# ------------------------------------------------------------------------------------------------
# Block by block
# ------------------------------------------------------------------------------------------------

class _StopForward(Exception):
    pass


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList whose children hold the most linear layers (a transformer's blocks)."""
    linears = list(linear_modules(model))
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            count = sum(1 for n in linears if n.startswith(name + "."))
            if count and (best is None or count > best[0]):
                best = (count, name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no nn.ModuleList of blocks with linear layers was found; "
                         "use one-shot calibration (sequential=False, offload=False)")
    return best[1], best[2]


def _capture_block_inputs(model: nn.Module, block: nn.Module, batches) -> list[tuple[tuple, dict]]:
    captured: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    _call_model(model, batch)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise ValueError("the first block did not run once per calibration batch; cannot compress sequentially")
    return captured


def _hidden_of(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = hidden
    return args, kwargs


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    return value


def _onload(module: nn.Module, device: torch.device) -> None:
    """Put ``module`` on the compute device (the one place offloaded weights travel to the device)."""
    module.to(device)


def _offload(module: nn.Module) -> None:
    """Put ``module`` back on the CPU (the one place offloaded weights travel back)."""
    module.to("cpu")


def _outside_to(model: nn.Module, blocks: nn.ModuleList, move: Callable[[nn.Module], None]) -> None:
    """Apply ``move`` to everything but the blocks (embeddings, norms, head; the blocks stay where they are)."""
    held = list(blocks)
    for i in range(len(held)):
        blocks[i] = nn.Identity()
    try:
        move(model)
    finally:
        for i, block in enumerate(held):
            blocks[i] = block


def _rows_of(value: Any, batch: int, lo: int, hi: int) -> Any:
    """``value`` with every tensor of 2+ dimensions whose first dimension is ``batch`` cut to rows lo:hi (the
    hidden state, a per-sequence attention mask); other tensors (position embeddings of shape (1, T, d), a
    cache_position (T,)) are shared by every row and pass unchanged."""
    if isinstance(value, Tensor):
        return value[lo:hi] if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _rows_of(v, batch, lo, hi) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_rows_of(v, batch, lo, hi) for v in value)
    return value


def _hidden_in(args: tuple, kwargs: dict) -> Tensor:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, Tensor):
        raise ValueError("block-by-block calibration: the first block was not called with a hidden-state tensor "
                         "(first argument or hidden_states=)")
    return hidden


def _block_forward(block: nn.Module, args: tuple, kwargs: dict, forward_tokens: int | None,
                   keep: bool, device: torch.device | None = None) -> tuple[tuple, dict] | None:
    """Run ``block`` on one captured batch, at most ``forward_tokens`` tokens (whole sequences, at least one) at a
    time, so the forward's working set (MLP intermediates, attention, the statistics' float32 copies of a layer's
    input) scales with ``forward_tokens``, not with the batch. ``keep``: return the batch's (args, kwargs) with the
    output as hidden state, written over the input where shapes and dtypes agree (the input is not needed any more,
    and sequences are independent, so a piece's output never overwrites a row another piece still reads).
    ``device``: the block's device when the inputs live elsewhere (on the CPU with ``offload="all"``): each piece
    travels there and its output comes back."""
    hidden = _hidden_in(args, kwargs)

    def run(piece_args: tuple, piece_kwargs: dict) -> Tensor:
        if device is not None:
            piece_args, piece_kwargs = _move(piece_args, device), _move(piece_kwargs, device)
        return _hidden_of(block(*piece_args, **piece_kwargs))

    # only a (batch, sequence, ..., features) hidden state is split, by whole sequences: rows of a 2-D one may be
    # tokens of one sequence that attend to each other
    batch = hidden.shape[0] if hidden.dim() >= 3 else 1
    per_sequence = max(1, hidden.numel() // max(1, batch * hidden.shape[-1]))
    rows = batch if forward_tokens is None else max(1, forward_tokens // per_sequence)
    if rows >= batch:
        out = run(args, kwargs)
        if not keep:
            return None
        if out.device != hidden.device:  # back where the inputs live, over them where shapes and dtypes agree
            out = hidden.copy_(out) if out.shape == hidden.shape and out.dtype == hidden.dtype else \
                out.to(hidden.device)
        return _with_hidden(args, kwargs, out)
    pieces: list[Tensor] = []
    in_place = keep
    for lo in range(0, batch, rows):
        hi = min(batch, lo + rows)
        out = run(_rows_of(args, batch, lo, hi), _rows_of(kwargs, batch, lo, hi))
        if not keep:
            continue
        if in_place and out.shape == hidden[lo:hi].shape and out.dtype == hidden.dtype:
            hidden[lo:hi].copy_(out)
        else:  # an output of another shape or dtype: gather the pieces (rows written so far come back out)
            if in_place:
                pieces, in_place = [hidden[:lo].clone()] if lo else [], False
            pieces.append(out.to(hidden.device))
    if not keep:
        return None
    return _with_hidden(args, kwargs, hidden if in_place else torch.cat(pieces))


def _own_hidden(inputs: list[tuple[tuple, dict]], batches: Sequence[dict[str, Tensor]]) -> None:
    """Copy a captured hidden state that IS a calibration batch tensor (e.g. ``inputs_embeds`` passed straight to
    the first block): block outputs are written over the inputs, which must never change the caller's batches."""
    theirs = {v.untyped_storage().data_ptr() for b in batches for v in b.values() if isinstance(v, Tensor)}
    for k, (a, kw) in enumerate(inputs):
        hidden = _hidden_in(a, kw)
        if hidden.untyped_storage().data_ptr() in theirs:
            inputs[k] = _with_hidden(a, kw, hidden.clone())


def check_forward_tokens(forward_tokens: Any, owner: str) -> int | None:
    if forward_tokens is None:
        return None
    if isinstance(forward_tokens, bool) or not isinstance(forward_tokens, int) or forward_tokens < 1:
        raise ValueError(f"{owner}: forward_tokens must be a positive int (tokens per block forward), None (whole "
                         f"batches) or 'auto', got {forward_tokens!r}")
    return forward_tokens


OFFLOAD_MODES = ("blocks", "all")


def check_offload(offload: Any, owner: str) -> str | None:
    """None (model on the device), "blocks" (also True: the model on the CPU, one block on the device at a time) or
    "all" (also the calibration activations, the statistics and the projections too large for the device budget
    stay on the CPU)."""
    if offload is None or offload is False:
        return None
    if offload is True:
        return "blocks"
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"{owner}: offload must be False, True (= 'blocks') or one of {OFFLOAD_MODES}, "
                         f"got {offload!r}")
    return offload


def _module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


# the working set of a block forward per token and per input feature of the block's linear layers (its
# intermediates, attention, the statistics' float32 copies of a layer's input): measured 7.6 bytes on the
# 1B-shaped Llama block at 1024 tokens (159 MB over 20480 input features), rounded up
FORWARD_BYTES_PER_TOKEN_FEATURE = 12


def _stat_passes(widths: dict[str, int], budget: int, itemsize: int) -> list[dict[str, tuple[int, int] | None]]:
    """Group the statistics of distinct inputs (name -> input width) into passes whose accumulators fit ``budget``
    bytes. A Gram too large for a pass is split into column slices (name -> (lo, hi); None: the whole Gram). A slice
    is at least an eighth of its Gram, so no input takes more than ~8 passes however small the budget."""
    passes: list[dict[str, tuple[int, int] | None]] = []
    current: dict[str, tuple[int, int] | None] = {}
    free = budget
    for name, n in widths.items():
        whole = (n * n + n) * itemsize
        lo = 0
        while lo < n:
            if lo == 0 and whole <= free:
                current[name], free = None, free - whole
                break
            width = min(n - lo, max(0, free // itemsize - n) // n)
            if width < min(n - lo, max(1, n // 8)):
                if current:  # too little room left in this pass: start the next one
                    passes.append(current)
                    current, free = {}, budget
                    continue
                width = min(n - lo, max(1, n // 8))  # even an empty pass is too small: the smallest slice
            current[name] = (lo, lo + width)
            free -= (n * width + n) * itemsize
            lo += width
            if lo < n:
                passes.append(current)
                current, free = {}, budget
    if current:
        passes.append(current)
    return passes


def _host_statistics(model: nn.Module, names: list[str], run: Callable[[bool], None], probe: Callable[[], None],
                     budget: int, dtype: torch.dtype) -> dict[str, InputStats]:
    """The statistics of ``names`` on the CPU, accumulated on the device in passes (``run(last)`` pushes every
    calibration piece through the block once; ``last``: the final pass) whose accumulators fit ``budget`` bytes;
    each pass's are moved to the CPU when it ends. Which layers share an input is found first by ``probe()`` (one
    batch, one Gram column per layer), so layers sharing an input share one object and one pass, as in one pass."""
    width_of = {n: linear_in_features(model.get_submodule(n)) for n in names}
    found = collect_input_stats(model, names, probe, dtype=dtype, columns={n: (0, 1) for n in names})
    groups: dict[int, list[str]] = {}
    for n in names:
        groups.setdefault(id(found[n]), []).append(n)
    del found
    widths = {members[0]: width_of[members[0]] for members in groups.values()}
    members_of = {members[0]: members for members in groups.values()}
    itemsize = torch.empty((), dtype=dtype).element_size()
    # at least a quarter of the widest Gram per pass: a budget too small for that costs passes, not correctness
    plan = _stat_passes(widths, max(budget, max(widths.values()) ** 2 * itemsize // 4), itemsize)
    parts: dict[str, list] = {n: [] for n in names}
    for index, spans in enumerate(plan):
        columns = {n: span for first, span in spans.items() for n in members_of[first]}
        for n, part in _pass_to_host(model, columns, functools.partial(run, index == len(plan) - 1), dtype).items():
            parts[n].append(part)
    out: dict[str, InputStats] = {}
    assembled: dict[tuple[int, ...], InputStats] = {}
    for n in names:
        key = tuple(id(p) for p in parts[n])
        if key not in assembled:  # names whose parts are the same objects share one result
            assembled[key] = assemble(parts[n], "cpu")
        out[n] = assembled[key]
    return out


def _pass_to_host(model: nn.Module, columns: dict[str, tuple[int, int] | None], run: Callable[[], None],
                  dtype: torch.dtype) -> dict[str, Any]:
    """One statistics pass (``columns``: name -> Gram columns, None for all), its results moved to the CPU (shared
    objects once, still shared). A function of its own so that no name outlives the pass and keeps a device
    accumulator alive into the next one."""
    found = collect_input_stats(model, list(columns), run, dtype=dtype,
                                columns={n: c for n, c in columns.items() if c is not None})
    on_host: dict[int, Any] = {}
    for part in found.values():
        if id(part) not in on_host:
            on_host[id(part)] = part if part.gram.device.type == "cpu" else dataclasses.replace(
                part, gram=part.gram.cpu(), abs_sum=part.abs_sum.cpu())
    return {n: on_host[id(part)] for n, part in found.items()}


# Device bytes per weight element of a projection, beyond the weight, the new layer, the Gram and one factor of its
# size: float32 copies of the weight, SVD results and cuSOLVER's workspace. Measured on an H200 for the whitened
# low-rank projection of each 1B-block shape (projection-peak-20261203T203624Z.json): 2048 x 2048 26.1, 512 x 2048
# 17.0, 8192 x 2048 20.8, 2048 x 8192 12.0; rounded up to 7 float32 copies.
PROJECTION_BYTES_PER_ELEMENT = 28


def _projection_bytes(module: nn.Module, stats: InputStats | None) -> int:
    """An upper bound on the device memory of projecting ``module`` there: its weight and the new layer (at most as
    large), the Gram and one factor of its size, and ``PROJECTION_BYTES_PER_ELEMENT`` per weight element."""
    gram = 0 if stats is None else 2 * stats.gram.numel() * stats.gram.element_size()
    return 2 * _module_bytes(module) + gram + PROJECTION_BYTES_PER_ELEMENT * dense_weight(module).numel()


def _project_layer(model: nn.Module, name: str, target: Target, host: InputStats | None, device: torch.device,
                   budget: int, visiting: dict[int, InputStats]) -> Report:
    """Project one layer (see :func:`_project_within`); ``visiting``: the statistics on the device, by the id of
    their host object (at most one group's). A function of its own so no name keeps the old layer on the device."""
    module = model.get_submodule(name)
    if _projection_bytes(module, host) > budget:  # (on a CPU device every move is a no-op)
        local = host
    else:
        if host is not None and id(host) not in visiting:
            visiting.clear()  # the previous group's statistics leave the device first
            visiting[id(host)] = host.to(device)
        local = None if host is None else visiting[id(host)]
        _onload(module, device)
    del module  # swapped out below: nothing may keep the old layer (on the device) alive
    try:
        return structurize(model, Plan.exact({name: target}), calibration=None if local is None else {name: local})
    finally:
        _offload(model.get_submodule(name))  # the new layer (or, after a failure, the old one) back on the CPU


def _project_within(model: nn.Module, targets: dict[str, Target], stats: dict[str, InputStats], device: torch.device,
                    budget: int) -> Report:
    """Structure ``targets`` (layers and statistics on the CPU) one layer at a time: on ``device`` where its
    projection fits ``budget`` bytes (the layer visits the device, the new one comes back; statistics shared by
    several layers visit once), else on the CPU."""
    visiting: dict[int, InputStats] = {}
    reports = [_project_layer(model, name, target, stats.get(name), device, budget, visiting)
               for name, target in targets.items()]
    visiting.clear()
    return Report.concat(reports)


def blockwise(model: nn.Module, batches: Sequence[dict[str, Tensor]], names: Sequence[str], *,
              plan: Plan | None = None, sequential: bool = True, device: torch.device | None = None,
              offload: bool | str = False, stats_dtype: torch.dtype = torch.float64, progress: bool = False,
              keep_stats: bool = False, stats_device: torch.device | str | None = None,
              on_stage: Callable[[str, int], None] | None = None,
              forward_tokens: int | None = None, device_budget: int | None = None,
              info: dict | None = None) -> tuple[Report, dict[str, InputStats]]:
    """One pass over the blocks: collect the statistics of ``names`` inside each block and, with a ``plan``,
    structure the block's matched layers before moving on. ``sequential``: the next block's inputs come from the
    compressed block (else from the original one). ``offload``: the model lives on the CPU; the weights outside
    the blocks visit ``device`` only to compute the first block's inputs, then each block visits it in turn.
    ``forward_tokens``: each block forward runs on at most this many tokens at a time (whole sequences; None:
    whole batches). Returns the report and (with ``keep_stats``) the statistics, moved to ``stats_device``.

    What is on the device at any time (with ``offload``): the first block's inputs of every calibration batch
    (hidden states + the block's other arguments), which each block's outputs overwrite batch by batch; one
    block; its statistics; and either one forward's working set (``forward_tokens`` tokens) or one layer's
    projection. While the first block's inputs are computed, the weights outside the blocks instead of a block.
    With ``offload="all"`` the device holds at most ``device_budget`` bytes (default: one block + the calibration
    activations, the bound of the layer-sequential methods): the first block's inputs are computed on the CPU and
    stay there (pinned), each forward piece travels to the device and its output back; the statistics are
    accumulated on the device in passes sized to fit beside the block and one forward piece (a wide Gram a slice of
    columns per pass) and kept on the CPU; the block leaves the device while it is projected, one layer at a time,
    on the device where that projection fits the budget, else on the CPU. The budget used is stored in
    ``info["device_budget"]`` when ``info`` is given.
    ``on_stage(stage, block)`` is called after each stage ("inputs" with block -1, then per block "onload",
    "calibrate", "project", "propagate", "offload"), e.g. to record device memory per stage."""
    from tqdm.auto import tqdm

    stage = on_stage or (lambda _stage, _block: None)
    forward_tokens = check_forward_tokens(forward_tokens, "blockwise")
    mode = check_offload(offload, "blockwise")
    host = mode == "all"  # activations, statistics and oversized projections on the CPU

    prefix, blocks = find_blocks(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    outside = [n for n in names if not n.startswith(prefix + ".")]
    if outside:
        raise ValueError(f"layers {outside[:3]} lie outside the blocks {prefix!r}; block-by-block calibration "
                         "covers the layers inside the blocks: narrow the scope (e.g. r'.*layers\\.\\d+\\..*') "
                         "or calibrate one-shot without offload")
    if mode == "blocks":
        _outside_to(model, blocks, functools.partial(_onload, device=device))
    moved = [_move(b, torch.device("cpu") if host else device) for b in batches]
    inputs = _capture_block_inputs(model, blocks[0], moved)
    _own_hidden(inputs, moved)
    del moved  # the token ids on the device are not needed any more
    if mode == "blocks":  # embeddings, final norm and head are not needed until the next full forward
        _outside_to(model, blocks, _offload)
    piece_device = None
    if host:
        if device.type == "cuda":  # pinned: the pieces' copies to and from the device run at full speed
            for k, (a, kw) in enumerate(inputs):
                inputs[k] = _with_hidden(a, kw, _hidden_in(a, kw).pin_memory())
        piece_device = device
        hidden_states = [_hidden_in(a, kw) for a, kw in inputs]
        activations = sum(h.numel() * h.element_size() for h in hidden_states)
        budget = device_budget or max(_module_bytes(b) for b in blocks) + activations
        per_piece = forward_tokens or max(h.numel() // h.shape[-1] for h in hidden_states)
        del hidden_states
        if info is not None:
            info["device_budget"] = budget
    stage("inputs", -1)
    reports: list[Report] = []
    kept: dict[str, InputStats] = {}
    # the calibration forward's outputs are the next block's inputs when the block does not change afterwards
    final = not sequential or plan is None
    for index, block in enumerate(tqdm(blocks, desc="blocks", unit="block", disable=not progress)):
        block_prefix = f"{prefix}.{index}."
        here = [n for n in names if n.startswith(block_prefix)]
        if mode:
            _onload(block, device)
        stage("onload", index)
        with torch.no_grad():
            if here:
                def run(last: bool = True) -> None:
                    for k in range(len(inputs)):
                        out = _block_forward(block, *inputs[k], forward_tokens, keep=final and last,
                                             device=piece_device)
                        if final and last:
                            inputs[k] = out
                if host:  # what a forward piece needs beside the block stays free of statistics
                    def probe() -> None:
                        _block_forward(block, *inputs[0], forward_tokens, keep=False, device=piece_device)
                    features = sum(dense_weight(m).shape[1] for m in linear_modules(block).values())
                    working = FORWARD_BYTES_PER_TOKEN_FEATURE * per_piece * features
                    stats = _host_statistics(model, here, run, probe, budget - _module_bytes(block) - working,
                                             stats_dtype)
                else:
                    stats = collect_input_stats(model, here, run, dtype=stats_dtype)
                stage("calibrate", index)
                if plan is not None:
                    targets = {n: plan.match(n) for n in here}
                    targets = {n: t for n, t in targets.items() if t is not None}
                    if targets and host:  # the block leaves the device; each layer visits it
                        _offload(block)
                        reports.append(_project_within(model, targets, stats, device, budget))
                        _onload(block, device)
                    elif targets:
                        reports.append(structurize(model, Plan.exact(targets), calibration=stats))
                for shared in stats.values():
                    shared.clear_cache()
                del shared  # a loop variable outlives its loop: it would keep the block's last Gram alive
                if keep_stats:  # shared objects stay shared after the move (keyed by id within this block
                    moved: dict[int, InputStats] = {}  # only: a freed object's id is reused)
                    for n in stats:
                        if id(stats[n]) not in moved:
                            there = stats_device is None or stats[n].device == torch.device(stats_device)
                            moved[id(stats[n])] = stats[n] if there else stats[n].to(stats_device)
                        kept[n] = moved[id(stats[n])]
                    del moved
                del stats  # the block's Grams are not needed while its outputs are computed
                stage("project", index)
            if not (here and final):  # each batch's outputs written over its inputs, one batch at a time
                for k in range(len(inputs)):
                    inputs[k] = _block_forward(block, *inputs[k], forward_tokens, keep=True, device=piece_device)
            stage("propagate", index)
        if mode:
            _offload(block)
        stage("offload", index)
    return Report.concat(reports), kept


def compress_sequential(model: nn.Module, plan: Plan, batches: Sequence[dict[str, Tensor]],
                        progress: bool = False) -> Report:
    """Compress block by block; each block is calibrated on the outputs of the compressed blocks before it.
    Layers outside the blocks (e.g. a pooler) are compressed one-shot on the original model first."""
    plan = Plan.coerce(plan)
    prefix, _ = find_blocks(model)
    targets = matched_layers(model, plan)
    check_plan_fits(model, Plan.exact(targets))  # every target fits its layer, before block 0 is touched
    reports = []
    outside = {n: t for n, t in targets.items() if not n.startswith(prefix + ".")}
    if outside:
        stats = calibrate(model, outside, batches)
        reports.append(structurize(model, Plan.exact(outside), calibration=stats, progress=progress))
    inside = [n for n in targets if n.startswith(prefix + ".")]
    reports.append(blockwise(model, batches, inside, plan=plan, sequential=True, progress=progress)[0])
    return Report.concat(reports)


# ------------------------------------------------------------------------------------------------
# Budget mode
# ------------------------------------------------------------------------------------------------

def output_sensitivity(model: nn.Module, names: Iterable[str], batches: Sequence[dict[str, Tensor]],
                       seed: int = 0) -> dict[str, float]:
    """How much a unit of squared error in each layer's output moves the model's final output, to first order:
    the mean over tokens and features of (d (u . y) / d out_l)^2, with y the model's first output tensor
    (hidden states or logits) and u a fresh standard-normal probe per batch (so E[g g^T] = J J^T)."""
    names = list(names)
    modules = linear_modules(model)
    sums: dict[str, Tensor | float] = {n: 0.0 for n in names}  # device tensors: read once at the end, not
    counts = {n: 0 for n in names}                              # one GPU sync per layer and batch
    handles = []

    def make_hook(name):
        def forward_hook(_module, _inputs, output):
            def grad_hook(grad):
                sums[name] = sums[name] + grad.detach().double().square().sum()
                counts[name] += grad.numel()
            if output.requires_grad:
                output.register_hook(grad_hook)
        return forward_hook

    flags = {p: p.requires_grad for p in model.parameters()}
    generators: dict[torch.device, torch.Generator] = {}  # the probe is drawn where the output is: a causal
    # LM's logits are (batch, seq, vocab), ~100M numbers per batch for SmolLM2, too many to draw on the CPU
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None

    def track_from_embeddings(_module, _inputs, output):
        output.requires_grad_(True)  # a leaf: the gradient reaches every layer's output, no weight's

    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        if isinstance(embed, nn.Module):  # only activation gradients are needed: none for the weights
            handles.append(embed.register_forward_hook(track_from_embeddings))
            for p in flags:
                p.requires_grad_(False)
        else:
            for p in flags:
                p.requires_grad_(True)
        for batch in batches:
            out = _call_model(model, batch)
            y = out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))
            generator = generators.get(y.device)
            if generator is None:
                generator = generators[y.device] = torch.Generator(device=y.device).manual_seed(seed)
            probe = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
            loss = (y * probe).sum()
            if not torch.isfinite(loss):
                raise ValueError("output_sensitivity: the model produced a non-finite output on a calibration batch")
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)
    missing = [n for n in names if counts[n] == 0]
    if missing:
        raise ValueError(f"output_sensitivity: layers {missing[:3]} never ran on the calibration batches")
    return {n: float(sums[n]) / counts[n] for n in names}


@dataclass(frozen=True)
class Allowed:
    """A structure family the budget solver may use for a layer, the projection method to use for it, and any
    arguments of its size ladder held fixed (e.g. Monarch's ``nblocks``)."""

    structure: str
    method: str = "data-free"
    nblocks: int | None = None  # kept for the common case; equivalent to fixed=(("nblocks", b),)
    fixed: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        cls = structure_class(self.structure)
        check_method(self.method, cls.name)
        names = {f.name for f in dataclasses.fields(cls.Config)} if hasattr(cls, "Config") else set()
        unknown = sorted({k for k, _ in self.fixed_args.items()} - names)
        if unknown:
            raise ValueError(f"allowed structure {self.text!r}: {cls.name} has no argument(s) {unknown}; "
                             f"valid: {', '.join(sorted(names)) or 'none'}")
        try:
            cls.size_ladder(64, 64, 1, **self.fixed_args)
        except TypeError as err:
            raise ValueError(f"allowed structure {self.text!r}: {err}") from None

    @property
    def fixed_args(self) -> dict[str, Any]:
        return {**dict(self.fixed), **({"nblocks": self.nblocks} if self.nblocks is not None else {})}

    @property
    def text(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.fixed_args.items())
        return f"{self.structure}@{self.method}" + (f":{args}" if args else "")

    @classmethod
    def parse(cls, text: str) -> "Allowed":
        """``lowrank``, ``lowrank@whitened``, ``monarch@whitened:nblocks=4``, ``nm@sparsegpt:m=8``."""
        head, _, args = text.strip().partition(":")
        structure, _, method = head.partition("@")
        fixed = []
        for part in filter(None, (p.strip() for p in args.split(","))):
            key, eq, value = part.partition("=")
            if not eq:
                raise ValueError(f"allowed structure {text!r}: write key=value after ':', got {part!r}")
            try:
                parsed: Any = int(value)
            except ValueError:
                parsed = {"true": True, "false": False}.get(value.strip().lower(), value.strip())
            fixed.append((key.strip(), parsed))
        nblocks = dict(fixed).pop("nblocks", None)
        return cls(structure.strip(), method.strip() or "data-free", nblocks,
                   tuple((k, v) for k, v in fixed if k != "nblocks"))


def _dense_candidate(name: str, weight: Tensor) -> Candidate:
    out_f, in_f = weight.shape
    return Candidate(name, parse_spec("dense"), "none", in_f * out_f, 2 * in_f * out_f, 0.0, in_f * out_f)


def price_layers(model: nn.Module, allowed: dict[str, Sequence[Allowed]] | Sequence[Allowed],
                 stats: dict[str, InputStats] | None, names: Iterable[str] | None = None, progress: bool = False,
                 device: torch.device | str | None = None, timings: dict[str, float] | None = None
                 ) -> dict[str, list[Candidate]]:
    """Every in-scope layer's candidates with their relative squared output errors, computed on ``device``
    (default: where the weight is). Layers that share statistics are priced one after the other, so their
    shared factorization is computed once. ``timings``: seconds per allowed structure are added to it (the
    device is synchronized around each call, so the split is true on a GPU; "stacked ..." for the stacked
    calls of layers sharing an input)."""
    from tqdm.auto import tqdm

    modules = linear_modules(model)
    names = list(names) if names is not None else list(modules)
    if stats is not None:  # group layers with one statistics object (q/k/v, gate/up) together
        order = {id(stats[n]): i for i, n in reversed(list(enumerate(names)))}
        names = sorted(names, key=lambda n: order[id(stats[n])])
    def options_for(name: str):
        return allowed if not isinstance(allowed, dict) else next(
            (v for pattern, v in allowed.items() if Plan.from_dict({pattern: "dense"}).match(name) is not None), None)

    def weight_of(name: str) -> Tensor:
        weight = dense_weight(modules[name])
        return weight if device is None else weight.to(device)

    per_layer = {}
    known: dict[str, dict[Allowed, list]] = {}
    if stats is not None:
        known = _batched_prices(names, stats, options_for, weight_of,
                                {n: tuple(dense_weight(modules[n]).shape) for n in names},
                                torch.device(device) if device is not None else None, timings)
    current: tuple[int, InputStats | None] = (-1, None)
    for name in tqdm(names, desc="pricing", unit="layer", disable=not progress):
        options = options_for(name)
        if options is None:
            continue
        weight = weight_of(name)
        layer_stats = None
        if stats is not None:
            if current[0] != id(stats[name]):
                if current[1] is not None:
                    current[1].clear_cache()
                moved = stats[name] if device is None else stats[name].to(device)
                current = (id(stats[name]), moved)
            layer_stats = current[1]
        per_layer[name] = candidates_for(name, weight, options, layer_stats, known=known.pop(name, None),
                                         timings=timings)
    if current[1] is not None:
        current[1].clear_cache()
    return {n: per_layer[n] for n in sorted(per_layer, key=list(modules).index)}


class _Clock:
    """Adds the synchronized wall time of a block to ``timings[key]`` (no-op without ``timings``)."""

    def __init__(self, timings: dict[str, float] | None, key: str, device: torch.device | None) -> None:
        self.timings, self.key = timings, key
        self.cuda = timings is not None and device is not None and device.type == "cuda"

    def __enter__(self) -> "_Clock":
        if self.cuda:
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.timings is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        self.timings[self.key] = self.timings.get(self.key, 0.0) + time.perf_counter() - self.start


# Elements of one stacked pricing call (weights of every size, 4 bytes each): big enough to batch the same layer of
# every block of a small model into one call, small enough to stay a fraction of one large layer's working memory.
_STACK_ELEMENTS = 1 << 26


def _batched_prices(names: list[str], stats: dict[str, InputStats], options_for, weight_of,
                    shapes: dict[str, tuple[int, int]], device: torch.device | None,
                    timings: dict[str, float] | None = None, sizes: int = 4) -> dict[str, dict[Allowed, list]]:
    """The prices of every allowed structure whose pricer batches inputs (:func:`structmat.project.price_many`),
    for all layers at once: layers (or, where the pricer also stacks rows, e.g. SparseGPT N:M, the layers sharing
    one input: q/k/v, gate/up, stacked as rows) of one shape -- the same layers in every block -- are priced in
    batched calls, so a launch-bound pricer runs once per kind of layer, not once per layer."""
    groups: dict[int, list[str]] = {}
    for n in names:
        groups.setdefault(id(stats[n]), []).append(n)
    buckets: dict[tuple, list[list[str]]] = {}
    for group in groups.values():
        options = options_for(group[0])
        if options is None or any(options_for(n) != options for n in group):
            continue
        for a in options:
            cls = structure_class(a.structure)
            if cls.name == "dense" or not batches_inputs(a.method, cls.name):
                continue
            stacked = stacks_rows(a.method, cls.name)
            for part in ([group] if stacked else [[n] for n in group]):
                fits = [[c for c, _ in _fits(cls, a, shapes[n][1], shapes[n][0], sizes)] for n in part]
                if not fits[0] or any(f != fits[0] for f in fits):
                    continue  # sizes differ between the layers: each is priced alone
                signature = (a, stacked, tuple(shapes[n] for n in part), tuple(str(c) for c in fits[0]))
                buckets.setdefault(signature, []).append(part)
    out: dict[str, dict[Allowed, list]] = {}
    for (a, stacked, group_shapes, _), members in buckets.items():
        cls = structure_class(a.structure)
        fits = [c for c, _ in _fits(cls, a, group_shapes[0][1], group_shapes[0][0], sizes)]
        rows = sum(r for r, _ in group_shapes)
        per_call = max(1, _STACK_ELEMENTS // (rows * group_shapes[0][1] * len(fits)))
        for c0 in range(0, len(members), per_call):
            chunk = members[c0:c0 + per_call]
            weights = [torch.cat([weight_of(n) for n in group]) for group in chunk]
            moved = [stats[g[0]] if device is None or stats[g[0]].device == device else stats[g[0]].to(device)
                     for g in chunk]
            with _Clock(timings, f"stacked {a.text}", weights[0].device):
                prices = price_many(weights, fits, a.method, moved,
                                    row_splits=[r for r, _ in group_shapes] if stacked else None)
            for group, per_group in zip(chunk, prices):
                for n, p in zip(group, per_group if stacked else [per_group]):
                    out.setdefault(n, {})[a] = p
            for s in moved:
                s.clear_cache()
    return out


def _weighted(model: nn.Module, name: str, options: list[Candidate], stats: dict[str, InputStats] | None,
              sensitivity: float) -> list[Candidate]:
    if stats is None:
        raise ValueError("sensitivity weighting needs calibration statistics")
    w = dense_weight(linear_modules(model)[name]).to(torch.float64)
    gram = stats[name].gram.to(w.device, torch.float64)
    energy = float(((w @ gram) * w).sum())
    return [dataclasses.replace(c, error=c.error * energy * sensitivity) for c in options]


@functools.lru_cache(maxsize=1024)
def _fits(cls, a: "Allowed", in_f: int, out_f: int, sizes: int) -> tuple[tuple[Any, tuple[int, int]], ...]:
    """The sizes of ``a``'s ladder that fit an (out_f, in_f) layer and are smaller than dense: (config, (params,
    flops)) each. Cached: a model repeats a few shapes many times (each answer builds a layer per size)."""
    fits = []
    for config in cls.size_ladder(in_f, out_f, sizes, **a.fixed_args):
        try:
            layer = cls.from_config(config, in_f, out_f, bias=False, device="meta")
        except ValueError:
            continue  # this size does not fit this layer
        if layer.param_count() < in_f * out_f:
            fits.append((config, (layer.param_count(), layer.flops(1))))
    return tuple(fits)


def candidates_for(name: str, weight: Tensor, allowed: Sequence[Allowed], stats: InputStats | None,
                   sizes: int = 4, known: dict[Allowed, list] | None = None,
                   timings: dict[str, float] | None = None) -> list[Candidate]:
    """Every candidate (structure, size, method) for one layer with its predicted error: each allowed structure
    offers its own size ladder, priced by the projection registry (one decomposition for every size where the
    method registered a pricer). ``known``: prices already computed for some allowed structures (aligned with
    their fitting sizes), e.g. by one stacked call for the layers that share this input."""
    out_f, in_f = weight.shape
    found = [_dense_candidate(name, weight)]
    for a in allowed:
        cls = structure_class(a.structure)
        if cls.name == "dense":
            continue
        fits = _fits(cls, a, in_f, out_f, sizes)
        if not fits:
            continue
        method = a.method if stats is not None else "data-free"
        errors = (known or {}).get(a)
        if errors is None:
            with _Clock(timings, a.text, weight.device):
                errors = price(weight, [c for c, _ in fits], method, stats)
        for (config, (params, flops)), err in zip(fits, errors):
            if err is not None:
                found.append(Candidate(name, config, a.method, params, flops, float(err), in_f * out_f))
    unique = {}
    for c in found:
        unique.setdefault((str(c.spec), c.method), c)
    return list(unique.values())


def budget_plan(model: nn.Module, allowed: dict[str, Sequence[Allowed]] | Sequence[Allowed],
                stats: dict[str, InputStats] | None, target: float, key: str = "params",
                names: Iterable[str] | None = None, sensitivity: dict[str, float] | None = None,
                candidates: dict[str, list[Candidate]] | None = None) -> tuple[Plan, dict[str, Candidate]]:
    """Choose every layer's structure and size so the chosen layers hold ``target`` of their dense params
    (or FLOPs), minimizing the summed predicted output error.

    Without ``sensitivity`` a layer's predicted error is its relative squared output error on the calibration
    inputs (every layer counts alike). With it (see :func:`output_sensitivity`), the error is in units of the
    model's final output: relative error x the layer's output energy tr(W H W^T) x its sensitivity — a
    first-order estimate of how much the final output moves, which lets the solver spend parameters where they
    matter. ``candidates`` (from :func:`price_layers`) avoids re-pricing when several targets are solved."""
    if not 0 < target <= 1:
        raise ValueError(f"target must lie in (0, 1], got {target}")
    per_layer = candidates if candidates is not None else price_layers(model, allowed, stats, names)
    if sensitivity is not None:
        per_layer = {n: _weighted(model, n, c, stats, sensitivity[n]) for n, c in per_layer.items()}
    dense_total = sum(c[0].cost(key) for c in per_layer.values())
    chosen = solve_budget(per_layer, target * dense_total, key=key)
    targets = {n: (None if c.method == "none" else Target(c.spec, c.method)) for n, c in chosen.items()}
    return Plan.exact({n: t for n, t in targets.items() if t is not None}), chosen



# ------------------------------------------------------------------------------------------------
# One call
# ------------------------------------------------------------------------------------------------

@dataclass
class Compressed:
    """A compressed model with what was done to it: the plan applied, the per-layer report, the wall time."""

    model: nn.Module
    report: Report
    plan: Plan
    target: float | None = None
    seconds: float = 0.0
    chosen: dict[str, Candidate] | None = None

    def mix(self) -> dict[str, int]:
        """How many layers took each structure@method (the budget solver's mix)."""
        counts: dict[str, int] = {}
        for row in self.report.rows:
            key = f"{row.spec.partition(':')[0]}@{row.method}"
            counts[key] = counts.get(key, 0) + 1
        return counts


def parse_allow(allow: str | Sequence[str | Allowed]) -> list[Allowed]:
    """``"lowrank@whitened,monarch@whitened:nblocks=4,nm@sparsegpt"`` or a list of texts / Allowed."""
    if isinstance(allow, str):
        parts, current = [], ""
        for item in allow.split(","):  # commas also separate fixed arguments: "monarch@whitened:nblocks=4,rank=2"
            if current and "=" in item and "@" not in item and ":" not in item:
                current += "," + item
            else:
                if current:
                    parts.append(current)
                current = item
        if current:
            parts.append(current)
        allow = [p for p in parts if p.strip()]
    out = [a if isinstance(a, Allowed) else Allowed.parse(a) for a in allow]
    if not out:
        raise ValueError("allow: name at least one structure, e.g. 'lowrank@whitened'")
    return out


class Compressor:
    """Compress ``model`` on calibration ``batches``, restricted to the linear layers ``scope`` matches (a full
    regex, a list of names/suffixes, or a Plan whose non-skip entries define the scope).

    * :meth:`uniform` applies a plan; :meth:`budget` solves for a parameter (or FLOPs) target over the ``allow``ed
      structures. Both return a :class:`Compressed` copy (``inplace=True`` changes ``model`` itself).
    * One-shot statistics, candidate prices and output sensitivities are computed once and reused across calls.
    * ``sequential``: block by block, each block calibrated on the compressed blocks before it.
    * ``device``: where calibration and projections run; ``offload``: the model stays on the CPU and blocks
      are onloaded one at a time (implies block-by-block calibration; sensitivity weighting is off since it needs
      a backward pass through the whole model). ``offload="all"``: the device also never holds the calibration
      activations or a whole block's statistics, and projects on the CPU what does not fit ``device_budget`` bytes
      (default one block + the calibration activations; see :func:`blockwise`); the budget solver's pricing then
      runs on the CPU; slower, for the smallest devices.
    * ``stats_dtype``: float32 (default) or float64 statistics; projections run in the same precision.
    * ``on_stage(stage, block)``: called after each stage of a block-by-block pass (see :func:`blockwise`).
    * ``forward_tokens``: in block-by-block passes, each block forward runs on at most this many tokens at a
      time (whole sequences; the statistics are the same up to summation order), which bounds the forward's
      device memory by the piece instead of the batch. ``"auto"`` (default): 1024 on a CUDA device (512 with
      ``offload="all"``), whole batches elsewhere; None: whole batches.
    """

    def __init__(self, model: nn.Module, batches: Sequence[dict[str, Tensor]], scope: Any = r".*", *,
                 device: torch.device | str | None = None, offload: bool = False, sequential: bool = False,
                 stats_dtype: torch.dtype = torch.float32, sensitivity: bool = True, progress: bool = False,
                 log: Callable[[str], None] | None = None,
                 on_stage: Callable[[str, int], None] | None = None,
                 forward_tokens: int | str | None = "auto", device_budget: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Compressor: model must be an nn.Module, got {type(model).__name__}")
        if not batches or not all(isinstance(b, Mapping) for b in batches):
            raise ValueError("Compressor: batches must be a non-empty list of dicts of model inputs "
                             "(e.g. [{'input_ids': ...}, ...])")
        if stats_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Compressor: stats_dtype must be torch.float32 or torch.float64, got {stats_dtype}")
        self.scope = self._scope(scope)
        self.names = [n for n in linear_modules(model) if self.scope.match(n) is not None]
        if not self.names:
            raise ValueError(f"Compressor: scope {scope!r} matches no linear layer of {type(model).__name__}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.offload = check_offload(offload, "Compressor")
        if forward_tokens == "auto":
            forward_tokens = None if self.device.type != "cuda" else \
                AUTO_FORWARD_TOKENS // 2 if self.offload == "all" else AUTO_FORWARD_TOKENS
        self.forward_tokens = check_forward_tokens(forward_tokens, "Compressor")
        if device_budget is not None and (isinstance(device_budget, bool) or not isinstance(device_budget, int)
                                          or device_budget < 1 or self.offload != "all"):
            raise ValueError(f"Compressor: device_budget must be a positive number of bytes, with offload='all', "
                             f"got {device_budget!r} with offload={offload!r}")
        self.device_budget = device_budget
        self._budget: dict[str, int] = {}  # the device budget of offload="all", set by the statistics' pass
        self.sequential, self.stats_dtype = bool(sequential), stats_dtype
        self.progress, self.on_stage = progress, on_stage
        self.log = log or ((lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda _: None))
        if self.offload:
            find_blocks(model)  # raises when there are no blocks to onload
            model.to("cpu")
        elif model is not None:
            model.to(self.device)
        self.model = model
        self.batches = [_move(b, torch.device("cpu") if self.offload else self.device) for b in batches]
        self.use_sensitivity = bool(sensitivity) and not self.offload
        self._stats: dict[str, InputStats] | None = None
        self._prices: dict[tuple, dict[str, list[Candidate]]] = {}
        self._sensitivity: dict[str, float] | None = None

    @staticmethod
    def _scope(scope: Any) -> Plan:
        if isinstance(scope, Plan):
            return Plan([(e.pattern, None if e.target is None else "dense") for e in scope.entries])
        if isinstance(scope, (str, list, tuple)):
            return Plan([(scope if isinstance(scope, str) else list(scope), "dense")])
        raise TypeError(f"Compressor: scope must be a regex string, a list of names or a Plan, got {scope!r}")

    def share_cache(self, other: "Compressor") -> None:
        """Use ``other``'s one-shot statistics, prices and sensitivities (and add to them): for a second
        Compressor on the same model, batches and scope, e.g. a sequential one beside a one-shot one."""
        if other.model is not self.model or other.names != self.names or len(other.batches) != len(self.batches):
            raise ValueError("Compressor.share_cache: the other Compressor must have the same model, scope and "
                             "calibration batches")
        if other._stats is None:
            other.statistics()
        self._stats, self._prices = other._stats, other._prices
        if other.use_sensitivity == self.use_sensitivity:
            self._sensitivity = other.sensitivity()

    # --- cached work -------------------------------------------------------------------------------
    def statistics(self) -> dict[str, InputStats]:
        """One-shot statistics of every in-scope layer on the original model (computed once)."""
        if self._stats is None:
            start = time.perf_counter()
            self.log(f"calibrating {len(self.names)} layers on {len(self.batches)} batches "
                     f"({'block by block, offloaded' if self.offload else 'one-shot'}, {self.stats_dtype})")
            if self.offload:
                _, self._stats = blockwise(self.model, self.batches, self.names, plan=None, sequential=False,
                                           device=self.device, offload=self.offload, stats_dtype=self.stats_dtype,
                                           progress=self.progress, keep_stats=True, stats_device="cpu",
                                           on_stage=self.on_stage, forward_tokens=self.forward_tokens,
                                           device_budget=self.device_budget, info=self._budget)
            else:
                self._stats = calibrate(self.model, self.names, self.batches, progress=self.progress,
                                        dtype=self.stats_dtype)
            self.log(f"calibrated in {self._elapsed(start):.1f} s")
        return self._stats

    def prices(self, allow: Sequence[Allowed]) -> dict[str, list[Candidate]]:
        key = tuple(allow)
        if key not in self._prices:
            stats = self.statistics()
            start = time.perf_counter()
            self.log(f"pricing {len(self.names)} layers x {', '.join(a.text for a in allow)}")
            split: dict[str, float] = {}
            # offload="all": priced where the weights are (the CPU); the batched pricing calls hold a kind of
            # layer of every block at once, more than one block + activations on the device
            self._prices[key] = price_layers(self.model, list(allow), stats, self.names, progress=self.progress,
                                             device=None if self.offload == "all" else self.device, timings=split)
            total = self._elapsed(start)
            parts = ", ".join(f"{k} {v:.1f} s" for k, v in split.items())
            self.log(f"priced in {total:.1f} s ({parts}; the rest {total - sum(split.values()):.1f} s)")
        return self._prices[key]

    def sensitivity(self) -> dict[str, float] | None:
        if not self.use_sensitivity:
            return None
        if self._sensitivity is None:
            start = time.perf_counter()
            self.log("measuring output sensitivities (one backward pass per batch)")
            self._sensitivity = output_sensitivity(self.model, self.names, self.batches)
            self.log(f"sensitivities in {self._elapsed(start):.1f} s")
        return self._sensitivity

    def _elapsed(self, start: float) -> float:
        """Seconds since ``start``, after the device's queued work is done (so each stage's wall time is its own,
        not the next stage's first sync)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    # --- the two entry points -----------------------------------------------------------------------
    def budget(self, target: float, allow: str | Sequence[str | Allowed] = DEFAULT_ALLOW, flops: bool = False,
               inplace: bool = False) -> Compressed:
        """Solve every in-scope layer's structure and size so they keep ``target`` of their dense parameters
        (FLOPs with ``flops=True``) at the least predicted error, then apply that plan."""
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
            raise ValueError(f"Compressor.budget: target must lie in (0, 1], got {target!r}")
        allowed = parse_allow(allow)
        start = time.perf_counter()
        candidates = self.prices(allowed)
        sensitivity = self.sensitivity()
        solving = time.perf_counter()
        self.log(f"solving the budget for {target:.2f} of the {'FLOPs' if flops else 'params'}")
        plan, chosen = budget_plan(self.model, allowed, self.statistics(), target, key="flops" if flops else "params",
                                   names=self.names, sensitivity=sensitivity, candidates=candidates)
        self.log(f"solved in {self._elapsed(solving):.1f} s")
        done = self._apply(plan, inplace)
        done.target, done.chosen = target, chosen
        done.seconds = time.perf_counter() - start  # pricing on the first call included
        return done

    def uniform(self, plan: Any, inplace: bool = False) -> Compressed:
        """Apply ``plan`` (patterns -> targets) to the in-scope layers."""
        plan = check_plan(plan)
        return self._apply(plan, inplace)

    def _apply(self, plan: Plan, inplace: bool) -> Compressed:
        start = time.perf_counter()
        targets = {n: t for n, t in matched_layers(self.model, plan).items() if n in set(self.names)}
        exact = Plan.exact(targets)
        model = self.model if inplace else copy.deepcopy(self.model)
        self.log(f"projecting {len(targets)} layers ({'sequential' if self.sequential else 'one-shot'})")
        if self.sequential:
            prefix, _ = find_blocks(model)
            outside = {n: t for n, t in targets.items() if not n.startswith(prefix + ".")}
            reports = []
            if outside:  # e.g. a pooler: one-shot on the original model, before the blocks change
                stats = self.statistics()
                reports.append(structurize(model, Plan.exact(outside), calibration={n: stats[n] for n in outside}))
            inside = [n for n in targets if n not in outside]
            reports.append(blockwise(model, self.batches, inside, plan=exact, sequential=True, device=self.device,
                                     offload=self.offload, stats_dtype=self.stats_dtype,
                                     progress=self.progress, on_stage=self.on_stage,
                                     forward_tokens=self.forward_tokens, device_budget=self.device_budget)[0])
            report = Report.concat(reports)
        elif self.offload:
            report = self._apply_offloaded(model, exact, targets)
        else:
            stats = self.statistics()
            report = structurize(model, exact, calibration={n: stats[n] for n in targets}, progress=self.progress)
            for s in {id(stats[n]): stats[n] for n in targets}.values():
                s.clear_cache()
        self._count_scope(model, report)
        self.log(f"projected in {self._elapsed(start):.1f} s")
        return Compressed(model, report, exact, None, time.perf_counter() - start)

    def _apply_offloaded(self, model: nn.Module, plan: Plan, targets: dict[str, Target]) -> Report:
        """One-shot statistics, model on the CPU: project each block on the device, then put it back (with
        ``offload="all"``, one group of layers at a time, within the device budget)."""
        prefix, blocks = find_blocks(model)
        stats = self.statistics()
        reports = []
        for index, block in enumerate(blocks):
            here = {n: t for n, t in targets.items() if n.startswith(f"{prefix}.{index}.")}
            if not here:
                continue
            if self.offload == "all":
                # the budget of the statistics' pass (another Compressor's, through share_cache, may not have one:
                # then nothing larger than the block itself visits the device)
                budget = self.device_budget or self._budget.get("device_budget") or _module_bytes(block)
                reports.append(_project_within(model, here, stats, self.device, budget))
                continue
            _onload(block, self.device)
            moved: dict[int, InputStats] = {}
            local = {n: moved.setdefault(id(stats[n]), stats[n].to(self.device)) for n in here}
            reports.append(structurize(model, Plan.exact(here), calibration=local))
            _offload(block)
        return Report.concat(reports)

    def _count_scope(self, model: nn.Module, report: Report) -> None:
        """Make the report's skipped set exactly the in-scope layers left dense (so fractions are over scope)."""
        swapped = {r.name for r in report.rows}
        modules = linear_modules(model)
        report.skipped, report.skipped_flops = {}, {}
        for name in self.names:
            if name in swapped or name not in modules:
                continue
            out_f, in_f = dense_weight(modules[name]).shape
            bias = getattr(modules[name], "bias", None) is not None
            report.skipped[name] = in_f * out_f + (out_f if bias else 0)
            report.skipped_flops[name] = 2 * in_f * out_f + (out_f if bias else 0)


__all__ = ["Compressor", "Compressed", "Allowed", "DEFAULT_ALLOW", "parse_allow", "check_plan", "budget_plan",
           "price_layers", "candidates_for", "output_sensitivity", "compress_sequential", "blockwise", "calibrate",
           "find_blocks", "matched_layers"]
