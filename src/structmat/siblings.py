"""Siblings: structured layers that read the same input (q/k/v, gate/up) run as ONE few-token product.

At decode a layer's time is a fixed cost per launch plus its bytes; a transformer block's q, k and v projections
(and gate and up) read the same input, so three launches can be one over their stacked weights. This is the lever
the one-launch-per-linear bound of issue 12 names: at the bench shape each block linear costs ~4 us of launch and
ramp-up before its bytes.

:func:`fuse_siblings` stacks the factors of each group of equal structured siblings (N:M and dense members may differ
in width: their stacks are rows, ``ROW_STACKS``) into one tensor per factor and makes every member's parameters
*views* of it: no memory is added, state dicts and checkpoints keep their keys and
shapes, in-place updates (a load, an optimizer step) write into the stack. At few tokens in inference, where each
member's own dispatch would take the decode kernels, the first member called runs the group's product once (one
launch for all members: ``structmat.kernels.decode`` with stacked operands) and every member returns its slice:
  * eager: the group keeps the last input it saw (the same tensor object, unmodified) and its output until every
    member has taken its slice;
  * under ``torch.compile`` the same bookkeeping is traced (dynamo compares traced tensors by identity): the graph
    holds one call of the group's custom op per group.
Monarch, low-rank and N:M siblings at many tokens in inference (a prefill) run as one product too, where each
member's own dispatch takes the kernels' GEMMs: two launches for all members (``kernels.ops.monarch_siblings``,
``_lowrank_siblings``), or N:M's tiles over the stacked rows (``kernels.ops.nm``): wider products than the thin
attention projections make alone. Anywhere else (other structures at many tokens, gradients, CPU
without Triton, autocast) each member runs its own path, unchanged.
A member called with another input than its siblings gets a correct result at the cost of the whole group's product;
the group then splits (``SiblingGroup._split``): its members run their own paths in eager calls from then on.

Gated MLPs (``gate_proj``/``up_proj``/``down_proj`` with a SiLU ``act_fn``, as Llama, Mistral, Qwen, SmolLM): where
gate and up fuse and ``down_proj`` is structured, the MLP itself runs as TWO products at few tokens, the down product
forming its input SiLU(gate) * up while it loads it (``act`` of the decode kernels): no activation kernel, no
hidden vector written, one module call instead of four (:func:`fuse_siblings`, ``gated_mlp=True``).

Anything that may replace a member's tensors (``.to()``, ``.half()``, a state-dict load, assigning a factor)
dissolves the group (members keep working on their own); :func:`unfuse_siblings` also gives each member its own
storage back. Fuse after moving the model to its device and dtype.
"""

from __future__ import annotations

import types
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import dispatch  # (imports on any machine; its kernels only where Triton does)
from .structures.base import StructuredLinear, plan_key

#: Children of one module that read the same input in the model families structmat targets (Llama/Mistral/Qwen
#: attention and MLP, BERT-style self-attention, Mixtral-style experts).
SIBLING_NAMES: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                                              ("query", "key", "value"), ("w1", "w3"))
#: A gated MLP's (gate, up, down) children: down(act_fn(gate(x)) * up(x)) with act_fn SiLU
GATED_MLP = ("gate_proj", "up_proj", "down_proj")
#: Structures whose fused siblings also run one product at many tokens in inference (a prefill): two launches for
#: all members, the first over every member's factors at once (``_lowrank_siblings``, ``ops.monarch_siblings``);
#: N:M's stacked rows are one taller layer, so its many-token tiles (``ops.nm``) each serve every member
MANY_TOKEN_OPS = ("monarch", "lowrank", "nm")


# How each structure stacks: (dispatch op, factor names, dim of each factor along which members are stacked,
# whether the factor is a buffer). Stacked along an existing dim, each member's factor is a view of the stack.
# Monarch's R and block-diagonal's weight stack along their row dim inside each block (members' views are strided
# along it; every path takes strides), so one launch over the blocks serves all members (decode.monarch_plan).
_LAYOUT = {
    "lowrank": ("lowrank", (("U", "new", False), ("V", 0, False))),
    "monarch": ("monarch", (("R", 1, False), ("L", 0, False))),
    "blockdiag": ("blockdiag", (("weight", 1, False),)),
    "nm": ("nm", (("values", 0, False), ("index", 0, True))),
    "dense": ("dense", (("weight", 0, False),)),  # (one GEMM over the stacked rows: the classic fused q/k/v)
}


def _padded(layer: StructuredLinear) -> bool:
    return (getattr(layer, "in_padded", layer.in_features) != layer.in_features
            or getattr(layer, "out_padded", layer.out_features) != layer.out_features)


#: Structures whose stacks are the members' rows one after another (each member a block of output rows of one
#: taller layer): their members may differ in width, as a GQA attention's q_proj and k_proj/v_proj do
ROW_STACKS = ("nm", "dense")


def _key(layer: StructuredLinear) -> tuple | None:
    """Members fuse when everything but their numbers is equal (for ROW_STACKS, but their output widths too); None
    for a layer that cannot be fused."""
    if layer.name not in _LAYOUT or _padded(layer) or layer._buffers.get("merged_weight") is not None:
        return None
    tensors = [_get(layer, name, buf) for name, _, buf in _LAYOUT[layer.name][1]]
    if any(t.is_meta or not t.is_contiguous() for t in tensors):
        return None
    rows = layer.name in ROW_STACKS  # (then every stacked tensor's dim 0 is the output rows)
    bias = layer._parameters.get("bias")
    return (layer.name, layer.config, layer.in_features, None if rows else layer.out_features,
            tuple((t.dtype, t.device, tuple(t.shape)[1:] if rows else tuple(t.shape)) for t in tensors),
            None if bias is None else bias.dtype)


def _get(layer: nn.Module, name: str, buffer: bool) -> Tensor:
    return layer._buffers[name] if buffer else layer._parameters[name]


class SiblingGroup:
    """g equal structured layers that read one input, their factors stacked (see the module docstring)."""

    def __init__(self, members: list[StructuredLinear]) -> None:
        self.members = members
        self.op, layout = _LAYOUT[members[0].name]
        # each member's columns of the group's output: [offsets[i], offsets[i] + widths[i]) of width in all (equal
        # widths but for ROW_STACKS)
        self.widths = [m.out_features for m in members]
        self.offsets = [sum(self.widths[:i]) for i in range(len(members))]
        self.width = sum(self.widths)
        stacks = []
        with torch.no_grad():
            for name, dim, buffer in layout:
                parts = [_get(m, name, buffer) for m in members]
                stacks.append(torch.stack(parts) if dim == "new" else torch.cat(parts, dim))
        self.stacks = tuple(stacks)
        for i, m in enumerate(members):  # members' tensors become views of the stacks (their own ones are freed)
            for (name, dim, buffer), stack in zip(layout, self.stacks):
                old = _get(m, name, buffer)
                start = sum(_get(o, name, buffer).shape[dim] for o in members[:i]) if dim != "new" else i
                view = stack[i] if dim == "new" else stack.narrow(dim, start, old.shape[dim])
                if buffer:
                    m._buffers[name] = view
                else:
                    m._parameters[name] = nn.Parameter(view, requires_grad=old.requires_grad)
            if m._plans:
                m._plans.clear()
        # the members' biases stacked too, where each has one in its factors' dtype: the group's product adds them
        # in one go (a launch per group, where each member's output took one), and members add none of their own
        biases = [m._parameters.get("bias") for m in members]
        self.bias = None
        if all(b is not None and b.dtype == self.stacks[0].dtype for b in biases):
            with torch.no_grad():
                self.bias = torch.cat(biases)
            for m, b, lo in zip(members, biases, self.offsets):
                m._parameters["bias"] = nn.Parameter(self.bias.narrow(0, lo, b.shape[0]), requires_grad=b.requires_grad)
        for i, m in enumerate(members):
            m.__dict__["_sibling_group"] = (self, i)
        self._plans: dict = {}
        self._gated_plans: dict = {}
        self._inputs_differ = False  # (set by _split: the members read different inputs)
        self._forget()

    def _split(self) -> None:
        """A group product was not taken by every member before another input came: the members read different
        inputs (an encoder-decoder's cross-attention: q the decoder's states, k and v the encoder's, which its
        decode caches: every step's q would pay for k and v again) or threads interleave their calls. From now on
        the members run their own paths in eager calls (and in traces at many tokens, where the same is seen while
        tracing: a wasted product costs a whole prefill's projections)."""
        self._inputs_differ = True
        for m in self.members:  # (their eager forms, eager_member's, are made again: now none)
            if m._plans:
                m._plans.clear()
        self._held = None
        self._traced_x = self._traced_y = None
        self._traced_pending = 0
        return None

    def _forget(self) -> None:
        # (x, x's version, the group product for x, members still to take their slice), or None. One attribute, read
        # and written whole: threads sharing the model may each replace it (costing a product) but never pair one
        # thread's input with another's output
        self._held = None
        self._traced_x = self._traced_y = None
        self._traced_pending = 0

    @property
    def _x(self) -> Tensor | None:
        held = self._held
        return None if held is None else held[0]

    @property
    def _pending(self) -> int:
        held = self._held
        return 0 if held is None else held[3]

    def dissolve(self) -> None:
        """Every member runs its own path again (their tensors stay views of the stacks until replaced)."""
        for m in self.members:
            m.__dict__.pop("_sibling_group", None)
            if m._plans:  # (what was decided while fused, e.g. no eager form of its own)
                m._plans.clear()
        self._forget()
        self._plans.clear()
        self._gated_plans.clear()

    # --- the product -------------------------------------------------------------------------------------------
    def _factors(self, member: StructuredLinear) -> tuple:
        return _factors_of(member)

    def _biased(self, product: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        """``product`` (the group's, a fresh output) with the stacked biases added in place, where there are."""
        bias = self.bias
        return product if bias is None else (lambda x: product(x).add_(bias))

    def _call(self) -> Callable[[Tensor], Tensor]:
        from .kernels import decode

        stacks = self.stacks
        if self.op == "dense":  # (the bias in cuBLAS's epilogue)
            return lambda x: torch.nn.functional.linear(x, stacks[0], self.bias)
        if self.op == "blockdiag":
            g = len(self.members)
            return self._biased(lambda x: decode.blockdiag(x, stacks[0], g))
        if self.op == "nm":
            n, m = self.members[0].n, self.members[0].m
            return self._biased(lambda x: decode.nm(x, stacks[0], stacks[1], n, m))
        return self._biased(lambda x: getattr(decode, self.op)(x, *stacks))

    def _takes_decode(self, member: StructuredLinear, flat: Tensor) -> bool:
        """Whether the group runs its decode product for this input: where the member's own dispatch takes the
        decode kernels; in eager calls (host-bound: one call for g members) wherever the decode kernels can run,
        unless a backend is forced."""
        if self.op == "dense":
            return True  # (one GEMM for all members, on any device)
        if dispatch.decode is None:
            return False
        choose = dispatch._OPS[self.op][0]
        graphed = (torch.compiler.is_compiling() or dispatch._GRAPHED[0]
                   or (flat.is_cuda and torch.cuda.is_current_stream_capturing()))
        if not graphed and dispatch.get_backend() == "auto":
            with dispatch.asking("decode"):  # (use_backend would invalidate every plan on its way out)
                return choose(flat, *self._factors(member)) == "decode"
        return choose(flat, *self._factors(member)) == "decode"

    def _planned(self, flat: Tensor) -> Callable[[Tensor], Tensor]:
        """The group product for this input's shape with the decode kernels' plan made once (tile plans, grids,
        constants), as a member's own inference plan keeps it: eager few-token calls are host-bound."""
        from .kernels import decode

        if self.op == "dense":
            return self._call()
        args = (len(self.members),) if self.op == "blockdiag" else ()
        args += (self.members[0].n, self.members[0].m) if self.op == "nm" else ()
        operands = (*self.stacks, *args)
        run = decode.PLANS[self.op](flat, *operands)
        return self._biased(lambda x: run(x, *operands))

    def _plan(self, member: StructuredLinear, x: Tensor, key: tuple) -> Callable[[Tensor], Tensor] | None:
        """Eager: the group's call for inputs like ``x`` (None: the members' own paths), made once per key."""
        flat = x.reshape(-1, member.in_features)
        xc = x.contiguous()  # (planned on the input's own shape: the output comes in it, no reshapes)
        run = None
        if flat.shape[0] <= dispatch.DECODE_MAX_TOKENS and not (x.is_cuda and torch.is_autocast_enabled("cuda")):
            run = self._planned(xc) if self._takes_decode(member, flat) else None
            if flat.is_cuda and key[-2] is not True:  # (not capturing: plan_key) compile and load the kernels now,
                # never in a capture
                if run is not None:
                    run(xc)
                self._ready_capture(member, xc, run is not None)
        if len(self._plans) < 64:
            self._plans[key] = run
        return run

    def _ready_capture(self, member: StructuredLinear, x: Tensor, ran: bool | str) -> None:
        """Compile, load and autotune now what a CUDA-graph capture of inputs like ``x`` runs where this eager call
        ran something else (``ran``: True, the group's decode product; a string, its many-token product under that
        engine; False, the members' own paths, whose own plans ready their captured choice): a first build or an
        autotuner's timing inside a capture breaks it. A capture chooses by GPU time alone, so it may take the
        group's decode product in its captured form, the many-token product under another engine, or each member's
        own path (Monarch at 2-64 tokens: the grouped GEMM), which eager calls never ran where the group did."""
        from .kernels import decode

        flat = x.reshape(-1, member.in_features)
        few = flat.shape[0] <= dispatch.DECODE_MAX_TOKENS
        dispatch._GRAPHED[0] = True
        try:
            captured = self._takes_decode(member, flat) if few else self._many_engine(member, flat)
        finally:
            dispatch._GRAPHED[0] = None
        if captured is True:
            with decode.captured_form():
                self._planned(x)(x)
        elif captured and captured != ran:
            self._many_call(captured)(flat)
        elif not captured and ran:
            _ready_own_paths(self.members, flat)

    def _many_engine(self, member: StructuredLinear, flat: Tensor) -> str | None:
        """Many tokens in inference: the engine of the group's product (:meth:`_many_call`) where the member's own
        dispatch takes it for this input (Monarch: "triton" or "cublas"; low-rank: "cublas"; N:M: "triton", its tile
        expansion); None elsewhere (another structure, the reference, Monarch's opt-in one-launch kernel, no
        Triton: each member's own path)."""
        if self.op not in MANY_TOKEN_OPS or dispatch.ops is None:
            return None
        factors = self._factors(member)
        engine = dispatch._OPS[self.op][0](flat, *factors)
        if self.op == "lowrank":  # (its many-token path is cuBLAS's two GEMMs: the group's is too)
            return engine if engine == "cublas" else None
        if self.op == "nm":  # (the tiles of the stacked rows: each tile's expansion and GEMM serve every member)
            return engine if engine == "triton" else None
        if engine not in ("triton", "cublas") or dispatch.ops.fused_applies(flat.shape[0], flat, *factors, engine):
            return None
        return engine

    def _many_call(self, engine: str, traced: bool = False) -> Callable[[Tensor], Tensor]:
        """The group's many-token product on a 2-D input (Monarch's: the custom op while tracing)."""
        if self.op == "lowrank":
            U, V = self.stacks
            return self._biased(lambda flat: _lowrank_siblings(flat, U, V))
        if self.op == "nm":  # (the stacks are the members' rows one after another: one N:M layer g times as tall)
            values, positions = self.stacks
            n, m = self.members[0].n, self.members[0].m
            return self._biased(lambda flat: dispatch.ops.nm(flat, values, positions, n, m))
        ops = dispatch.ops
        R, L = self.stacks
        g = len(self.members)
        if traced:
            return self._biased(lambda flat: ops.monarch_siblings_mm(flat, R, L, g, engine))
        return self._biased(lambda flat: ops.monarch_siblings(flat, R, L, g, engine))

    def _many_plan(self, member: StructuredLinear, x: Tensor, key: tuple) -> Callable[[Tensor], Tensor] | None:
        """Eager, many tokens (a prefill): the group's product in two launches for every member where it applies
        (:meth:`_many_engine`), made once per key; None: the members' own paths."""
        run = None
        if not (x.is_cuda and torch.is_autocast_enabled("cuda")):
            d, width = member.in_features, self.width
            engine = self._many_engine(member, x.reshape(-1, d))
            if engine is not None:
                call, op = self._many_call(engine), self.op

                def run(x: Tensor) -> Tensor:
                    dispatch._record(op, engine)
                    y = call(x.reshape(-1, d))
                    return y if x.dim() == 2 else y.view(*x.shape[:-1], width)

            if x.is_cuda and key[-2] is not True:  # (not capturing: plan_key)
                self._ready_capture(member, x, engine or False)
        if len(self._plans) < 64:
            self._plans[key] = run
        return run

    def eager_member(self, member: StructuredLinear, index: int, x: Tensor) -> Callable[[Tensor], Tensor | None] | None:
        """A member's whole eager call for contiguous inputs like ``x`` (``structures.base``'s per-shape plan), where
        the group's product runs for them (its plan made by the call that asks): the held product's slice, or the
        product, and nothing else asked per call (eager decode is host-bound: a member's call through
        :meth:`output` costs as much host time as its own product's launch). The call returns None where
        :meth:`output` must decide (another input while a product is held: the split; an emulated capture)."""
        if dispatch._GRAPHED[0] is not None or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return None
        run = self._plans.get(plan_key(x, None))  # (the key output() made the group's plan under)
        bias = None if self.bias is not None else member._parameters.get("bias")  # (stacked: in the product)
        if run is None or self._inputs_differ or bias is not None and bias.dtype != x.dtype:
            return None
        lo, out, pending_after = self.offsets[index], self.widths[index], len(self.members) - 1
        params, graphed = member._parameters, dispatch._GRAPHED

        def call(x: Tensor) -> Tensor | None:  # (output()'s bookkeeping, inlined: a helper's frame is host time)
            if graphed[0] is not None:
                return None
            version = -2 if x.is_inference() else x._version
            held = self._held
            if held is not None and held[0] is x and held[1] == version:
                y, pending = held[2], held[3] - 1
            elif held is not None and held[3] > 0 or self._inputs_differ:
                return None
            else:
                y, pending = run(x), pending_after
            self._held = (x, version, y, pending) if pending > 0 else None
            y = y.narrow(-1, lo, out)
            return y if bias is None else y + params["bias"]

        return call

    def output(self, member: StructuredLinear, index: int, x: Tensor) -> Tensor | None:
        """Member ``index``'s output for ``x`` (its weight only, in x's shape with out features), or None: the
        member runs its own path."""
        if torch.is_grad_enabled() and (x.requires_grad or any(
                isinstance(f, Tensor) and f.requires_grad for f in self._factors(member))):
            return None
        lo, out = self.offsets[index], self.widths[index]
        if torch.compiler.is_compiling():
            return self._traced(member, x, lo, out)
        # eager: every check below is host time paid per member and token, so the cheap ones come first
        many = _many_tokens(x)
        if self._inputs_differ or many and self.op not in MANY_TOKEN_OPS:  # (each member's own path: no lookup)
            return None
        version = -2 if x.is_inference() else x._version  # (inference tensors keep no version counter)
        held = self._held
        if held is not None and held[0] is x and held[1] == version:
            y, pending = held[2], held[3] - 1
        else:
            if held is not None and held[3] > 0:  # (the last product was not taken by every member)
                return self._split()
            key = plan_key(x, dispatch._GRAPHED[0])
            run = self._plans[key] if key in self._plans else (self._many_plan if many else self._plan)(member, x, key)
            if run is None:
                return None
            y, pending = run(x.contiguous()), len(self.members) - 1
        # (every member has its slice: nothing of this step stays alive)
        self._held = (x, version, y, pending) if pending > 0 else None
        return y.narrow(-1, lo, out)

    def _traced(self, member: StructuredLinear, x: Tensor, lo: int, out: int) -> Tensor | None:
        """Under torch.compile: the same bookkeeping on trace-time attributes (dynamo tracks the mutation and
        compares traced tensors by identity), so the graph holds one call per group; it ends with them cleared."""
        flat = x if x.dim() == 2 else x.reshape(-1, member.in_features)
        if flat.is_cuda and torch.is_autocast_enabled("cuda"):
            return None
        if flat.shape[0] > dispatch.DECODE_MAX_TOKENS:
            if self._inputs_differ:
                return None
            if self._traced_x is not None and self._traced_x is not x and self._traced_pending > 0:
                return self._split()
            engine = self._many_engine(member, flat) if self.op != "lowrank" else None  # (low-rank: inductor's GEMMs)
            if engine is None:
                return None
            call = self._many_call(engine, traced=True)
        elif self._inputs_differ:  # (split by earlier eager calls, e.g. an encoder-decoder's eager prefill: in the
            return None            # compiled decode step each member reads its own weight, not the group's)
        elif self._takes_decode(member, flat):
            call = self._call()
        else:
            return None
        if self._traced_x is x and self._traced_pending > 0:
            y = self._traced_y
            self._traced_pending -= 1
        else:
            y = call(flat)
            self._traced_x, self._traced_y, self._traced_pending = x, y, len(self.members) - 1
        if self._traced_pending == 0:
            self._traced_x = self._traced_y = None
        y = y[:, lo:lo + out]
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out)


    # --- a gated MLP over this group (gate, up) ------------------------------------------------------------------
    def gated(self, down: StructuredLinear, x: Tensor) -> Tensor | None:
        """``down(SiLU(gate(x)) * up(x))`` as two products, the down product forming its input on load; None where
        the group's and down's own dispatch would not take the decode kernels (the MLP's own forward runs)."""
        if torch.is_grad_enabled() and (x.requires_grad or any(
                isinstance(f, Tensor) and f.requires_grad for m in (*self.members, down) for f in _factors_of(m))):
            return None
        if torch.compiler.is_compiling():
            found = self._gated_products(down, x, planned=False)
            return None if found is None else found[2]
        if _many_tokens(x):
            return self._gated_many(down, x)
        key = plan_key(x, dispatch._GRAPHED[0])
        if key in self._gated_plans:
            run = self._gated_plans[key]
            return None if run is None else run(x)
        return self._gated_plan(down, x, key)  # (the planning call's output: its products ran once, as any call's)

    def _gated_many(self, down: StructuredLinear, x: Tensor) -> Tensor | None:
        """Many tokens, eager (a prefill): the gate|up group's product, SiLU(gate) * up in one kernel
        (``_triton_decode.gated_rows``; the MLP's own forward runs two, each writing a hidden-sized tensor), then
        down's own path. None where the group does not run its product here (the MLP's own forward)."""
        from .kernels import _triton_decode

        f = self.widths[0]  # (gate and up: equal widths, _gated_ok)
        if self._inputs_differ or self.op not in MANY_TOKEN_OPS or not (x.is_cuda or _triton_decode.INTERPRET) \
                or x.numel() // x.shape[-1] > _triton_decode.GATE_ROWS_MAX:
            return None
        key = plan_key(x, dispatch._GRAPHED[0])
        run = self._plans[key] if key in self._plans else self._many_plan(self.members[0], x, key)
        if run is None:
            return None
        y = run(x.contiguous())
        h = _triton_decode.gated_rows(y.reshape(-1, 2 * f), f)
        return down(h.view(*x.shape[:-1], f))

    def _gated_products(self, down: StructuredLinear, x: Tensor, planned: bool):
        """(group product, down product, the MLP's output for ``x``), or None where they do not apply. ``planned``:
        the decode kernels' plans made once (eager), else ``decode``'s calls (custom ops under torch.compile)."""
        from .kernels import decode

        flat = x if x.dim() == 2 else x.reshape(-1, self.members[0].in_features)
        if flat.shape[0] > dispatch.DECODE_MAX_TOKENS or (flat.is_cuda and torch.is_autocast_enabled("cuda")):
            return None
        if not self._takes_decode(self.members[0], flat):
            return None
        src = x.contiguous() if planned else flat  # (eager plans take the input's own shape: no reshapes)
        group = self._planned(src) if planned else self._call()
        h = group(src)
        factors = _factors_of(down)
        half = (h if h.dim() == 2 else h.reshape(-1, h.shape[-1]))[:, :down.in_features]  # (down's input's shape)
        if not (self._takes_decode(down, half) if down.name == self.op else
                dispatch._OPS[down.name][0](half, *factors) == "decode"):
            return None
        if planned:
            plan = decode.PLANS[down.name](h, *factors, act=1)
            second = lambda h: plan(h, *factors, act=1)  # noqa: E731
        else:
            op = getattr(decode, down.name)
            second = lambda h: op(h, *factors, act=1)  # noqa: E731
        y = second(h)
        return group, second, y if planned or x.dim() == 2 else y.reshape(*x.shape[:-1], down.out_features)

    def _gated_plan(self, down: StructuredLinear, x: Tensor, key: tuple) -> Tensor | None:
        """Eager: makes the MLP's planned call for inputs like ``x`` once per key and returns this call's output
        (None: the MLP's own forward runs). Its products run once: inside a CUDA graph capture a second run would be
        captured too. Outside a capture, the kernels a captured call would take are compiled and loaded now as
        well (never inside one)."""
        from .kernels import decode

        run = y = None
        found = self._gated_products(down, x, planned=True)
        if found is not None:
            group, second, y = found

            def run(x: Tensor) -> Tensor:
                return second(group(x.contiguous()))

            if x.is_cuda and key[-2] is not True:  # (not capturing: plan_key)
                dispatch._GRAPHED[0] = True
                try:
                    with decode.captured_form():
                        captured = self._gated_products(down, x, planned=True)
                finally:
                    dispatch._GRAPHED[0] = None
                if captured is None:  # (a capture runs the MLP's own forward: gate/up and down on their own paths)
                    self._ready_capture(self.members[0], x, True)
                    _ready_own_paths([down], x.new_zeros(x.numel() // x.shape[-1], down.in_features))
        if len(self._gated_plans) < 64:
            self._gated_plans[key] = run
        return y


def _lowrank_siblings(x: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """The low-rank products of fused siblings (stacks U (g, out, r), V (g*r, in)) for one 2-D input: one GEMM into
    the members' stacked bottleneck, then one strided-batched GEMM writing each member's output into its columns of
    y (N, g*out). Two launches where the members alone take 2g, the first g times as wide."""
    g, out, r = U.shape
    n = x.shape[0]
    t = F.linear(x, V)
    y = x.new_empty(n, g * out)
    torch.bmm(t.as_strided((g, n, r), (r, t.stride(0), 1)), U.transpose(1, 2),
              out=y.as_strided((g, n, out), (out, y.stride(0), 1)))
    return y


def _ready_own_paths(layers, flat: Tensor) -> None:
    """Each layer's own path for the 2-D input ``flat`` as a CUDA-graph capture chooses it, run once now, once per
    distinct shape (``dispatch.ready_captured``): where eager calls ran a group's product instead, the layers' own
    plans (which ready their captured choice themselves) were never made, and a capture must not build or autotune
    kernels."""
    shapes = set()
    for layer in layers:
        op, factors = _LAYOUT[layer.name][0], _factors_of(layer)
        key = (op, tuple(t.shape for t in factors if isinstance(t, Tensor)))
        if op in dispatch._OPS and key not in shapes:
            shapes.add(key)
            dispatch.ready_captured(op, flat, *factors)


def _many_tokens(x: Tensor) -> bool:
    """More rows than the decode kernels take: a group outside MANY_TOKEN_OPS never runs its product there (its
    members and a gated MLP run their own paths), so an eager call asks nothing else (no plan key, no lookup)."""
    return x.numel() > dispatch.DECODE_MAX_TOKENS * x.shape[-1]


def _factors_of(layer: StructuredLinear) -> tuple:
    """A layer's decode operands in the order the decode ops take them."""
    factors = tuple(_get(layer, name, buf) for name, _, buf in _LAYOUT[layer.name][1])
    return factors + ((layer.n, layer.m) if layer.name == "nm" else ())


def _gated_forward(self: nn.Module, x: Tensor) -> Tensor:
    """A fused gated MLP's forward (installed on the instance by fuse_siblings): two products where they apply,
    else the class's own forward."""
    entry = self.gate_proj.__dict__.get("_sibling_group")
    y = None if entry is None else entry[0].gated(self.down_proj, x)
    return type(self).forward(self, x) if y is None else y


def _gated_ok(parent: nn.Module, group: "SiblingGroup") -> bool:
    """Whether ``parent`` is a gated MLP whose activation the down product can apply: gate and up are ``group`` (in
    that order), down is a decode-capable structured layer, no biases, a SiLU activation, and the parent's forward
    computes down(SiLU(gate(x)) * up(x)) (checked on one random token, through the layers' own paths)."""
    gate, up, down = (getattr(parent, n, None) for n in GATED_MLP)
    if group.members != [gate, up] or not isinstance(down, StructuredLinear) or down.name not in _LAYOUT \
            or down.name == "dense":  # (down needs a decode op)
        return False
    act = getattr(parent, "act_fn", None)  # (torch's SiLU or transformers' SiLUActivation; the check below decides)
    if _key(down) is None or "_sibling_group" in down.__dict__ or not (
            isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"):
        return False
    if any(m.bias is not None for m in (gate, up, down)) \
            or not down.in_features == gate.out_features == up.out_features:
        return False
    factor = _get(gate, _LAYOUT[gate.name][1][0][0], _LAYOUT[gate.name][1][0][2])
    x = torch.randn(1, gate.in_features, device=factor.device, dtype=factor.dtype)
    with torch.no_grad():
        want = down(F.silu(gate(x)) * up(x)).float()
        got = type(parent).forward(parent, x).float()
    if got.shape != want.shape or not bool(torch.isfinite(want).all()):  # (nothing to compare against: not installed)
        return False
    return bool(torch.allclose(got, want, rtol=1e-2, atol=1e-3 * float(want.abs().max().clamp_min(1e-30))))


def _groups_in(model: nn.Module, names: Iterable[tuple[str, ...]]) -> list[list[StructuredLinear]]:
    found = []
    for parent in model.modules():
        children = dict(parent.named_children())
        for group in names:
            by_key: dict[tuple, list[StructuredLinear]] = {}
            for name in group:
                child = children.get(name)
                if isinstance(child, StructuredLinear) and "_sibling_group" not in child.__dict__:
                    key = _key(child)
                    if key is not None:
                        by_key.setdefault(key, []).append(child)
            found.extend(members for members in by_key.values() if len(members) > 1)
    return found


def fuse_siblings(model: nn.Module, names: Iterable[tuple[str, ...]] = SIBLING_NAMES,
                  gated_mlp: bool = True) -> list[SiblingGroup]:
    """Fuse every group of equal structured siblings of ``model`` (children of one module named together in
    ``names``, which must read the same input in the model's forward) so that few-token inference runs one product
    per group. Adds no memory. Returns the groups (empty if none qualified: different structures, sizes or dtypes,
    padded layers, merged or meta layers stay as they are). ``gated_mlp``: a gated MLP whose gate and up fused
    (``GATED_MLP``, a SiLU activation, a structured down) runs as two products (module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_siblings expects an nn.Module, got {type(model).__name__}")
    names = [tuple(g) for g in names]
    if not all(g and all(isinstance(n, str) and n for n in g) for g in names):
        raise ValueError(f"fuse_siblings: names must be tuples of child names, e.g. {SIBLING_NAMES[0]}; got {names}")
    found = _groups_in(model, names)
    parents = {id(m): p for p in model.modules() for m in p.children()}
    groups = [SiblingGroup(members) for members in found]
    if gated_mlp:
        for group in groups:
            parent = parents.get(id(group.members[0]))
            if parent is not None and "forward" not in parent.__dict__ and _gated_ok(parent, group):
                parent.forward = types.MethodType(_gated_forward, parent)
    return groups


def unfuse_siblings(model: nn.Module) -> int:
    """Undo :func:`fuse_siblings`: every member gets its own contiguous storage back. Returns the groups undone."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfuse_siblings expects an nn.Module, got {type(model).__name__}")
    for parent in model.modules():  # the gated MLPs' forwards go back to their class's
        fwd = parent.__dict__.get("forward")
        if isinstance(fwd, types.MethodType) and fwd.__func__ is _gated_forward:
            del parent.__dict__["forward"]
    groups = {id(e[0]): e[0] for m in model.modules() if (e := m.__dict__.get("_sibling_group")) is not None}
    for group in groups.values():
        members = group.members
        group.dissolve()
        with torch.no_grad():
            for m in members:
                names = [(name, buffer) for name, _, buffer in _LAYOUT[m.name][1]]
                if group.bias is not None:
                    names.append(("bias", False))
                for name, buffer in names:
                    own = _get(m, name, buffer).clone()
                    if buffer:
                        m._buffers[name] = own
                    else:
                        m._parameters[name] = nn.Parameter(own, requires_grad=m._parameters[name].requires_grad)
                if m._plans:
                    m._plans.clear()
    return len(groups)


def sibling_groups(model: nn.Module) -> list[SiblingGroup]:
    """The fused groups in ``model``."""
    groups = {id(e[0]): e[0] for m in model.modules() if (e := m.__dict__.get("_sibling_group")) is not None}
    return list(groups.values())
