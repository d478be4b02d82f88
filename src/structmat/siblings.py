"""Siblings: structured layers that read the same input (q/k/v, gate/up) run as ONE few-token product.

At decode a layer's time is a fixed cost per launch plus its bytes; a transformer block's q, k and v projections
(and gate and up) read the same input, so three launches can be one over their stacked weights. This is the lever
the one-launch-per-linear bound of issue 12 names: at the bench shape each block linear costs ~4 us of launch and
ramp-up before its bytes.

:func:`fuse_siblings` stacks the factors of each group of equal structured siblings into one tensor per factor and
makes every member's parameters *views* of it: no memory is added, state dicts and checkpoints keep their keys and
shapes, in-place updates (a load, an optimizer step) write into the stack. At few tokens in inference, where each
member's own dispatch would take the decode kernels, the first member called runs the group's product once (one
launch for all members: ``structmat.kernels.decode`` with stacked operands) and every member returns its slice:
  * eager: the group keeps the last input it saw (the same tensor object, unmodified) and its output until every
    member has taken its slice;
  * under ``torch.compile`` the same bookkeeping is traced (dynamo compares traced tensors by identity): the graph
    holds one call of the group's custom op per group.
Anywhere else (many tokens, gradients, CPU without Triton, autocast) each member runs its own path, unchanged.
A member called with another input than its siblings gets a correct result at the cost of the whole group's product.

Anything that may replace a member's tensors (``.to()``, ``.half()``, a state-dict load, assigning a factor)
dissolves the group (members keep working on their own); :func:`unfuse_siblings` also gives each member its own
storage back. Fuse after moving the model to its device and dtype.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .structures.base import PLAN_EPOCH, StructuredLinear

#: Children of one module that read the same input in the model families structmat targets (Llama/Mistral/Qwen
#: attention and MLP, BERT-style self-attention, Mixtral-style experts).
SIBLING_NAMES: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                                              ("query", "key", "value"), ("w1", "w3"))


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


def _key(layer: StructuredLinear) -> tuple | None:
    """Members fuse when everything but their numbers is equal; None for a layer that cannot be fused."""
    if layer.name not in _LAYOUT or _padded(layer) or layer._buffers.get("merged_weight") is not None:
        return None
    tensors = [_get(layer, name, buf) for name, _, buf in _LAYOUT[layer.name][1]]
    if any(t.is_meta or not t.is_contiguous() for t in tensors):
        return None
    return (layer.name, layer.config, layer.in_features, layer.out_features,
            tuple((t.dtype, t.device, tuple(t.shape)) for t in tensors))


def _get(layer: nn.Module, name: str, buffer: bool) -> Tensor:
    return layer._buffers[name] if buffer else layer._parameters[name]


class SiblingGroup:
    """g equal structured layers that read one input, their factors stacked (see the module docstring)."""

    def __init__(self, members: list[StructuredLinear]) -> None:
        self.members = members
        self.op, layout = _LAYOUT[members[0].name]
        self.out = members[0].out_features
        stacks = []
        with torch.no_grad():
            for name, dim, buffer in layout:
                parts = [_get(m, name, buffer) for m in members]
                stacks.append(torch.stack(parts) if dim == "new" else torch.cat(parts, dim))
        self.stacks = tuple(stacks)
        for i, m in enumerate(members):  # members' tensors become views of the stacks (their own ones are freed)
            for (name, dim, buffer), stack in zip(layout, self.stacks):
                old = _get(m, name, buffer)
                view = stack[i] if dim == "new" else stack.narrow(dim, i * old.shape[dim], old.shape[dim])
                if buffer:
                    m._buffers[name] = view
                else:
                    m._parameters[name] = nn.Parameter(view, requires_grad=old.requires_grad)
            if m._plans:
                m._plans.clear()
        for i, m in enumerate(members):
            m.__dict__["_sibling_group"] = (self, i)
        self._plans: dict = {}
        self._forget()

    def _forget(self) -> None:
        self._x = self._y = None
        self._x_version, self._pending = -1, 0
        self._traced_x = self._traced_y = None
        self._traced_pending = 0

    def dissolve(self) -> None:
        """Every member runs its own path again (their tensors stay views of the stacks until replaced)."""
        for m in self.members:
            m.__dict__.pop("_sibling_group", None)
        self._forget()
        self._plans.clear()

    # --- the product -------------------------------------------------------------------------------------------
    def _factors(self, member: StructuredLinear) -> tuple:
        layout = _LAYOUT[member.name][1]
        factors = tuple(_get(member, name, buf) for name, _, buf in layout)
        return factors + ((member.n, member.m) if self.op == "nm" else ())

    def _call(self) -> Callable[[Tensor], Tensor]:
        from .kernels import decode

        stacks = self.stacks
        if self.op == "dense":
            return lambda x: torch.nn.functional.linear(x, stacks[0])
        if self.op == "blockdiag":
            g = len(self.members)
            return lambda x: decode.blockdiag(x, stacks[0], g)
        if self.op == "nm":
            n, m = self.members[0].n, self.members[0].m
            return lambda x: decode.nm(x, stacks[0], stacks[1], n, m)
        return lambda x: getattr(decode, self.op)(x, *stacks)

    def _takes_decode(self, member: StructuredLinear, flat: Tensor) -> bool:
        """Whether the member's own dispatch takes the decode kernels for this input (then so does the group)."""
        from .kernels import dispatch

        if self.op == "dense":
            return True  # (one GEMM for all members, on any device)
        if dispatch.decode is None:
            return False
        return dispatch._OPS[self.op][0](flat, *self._factors(member)) == "decode"

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
        return lambda x: run(x, *operands)

    def _plan(self, member: StructuredLinear, x: Tensor, key: tuple) -> Callable[[Tensor], Tensor] | None:
        """Eager: the group's call for inputs like ``x`` (None: the members' own paths), made once per key."""
        from .kernels import dispatch

        flat = x.reshape(-1, member.in_features)
        run = None
        if flat.shape[0] <= dispatch.DECODE_MAX_TOKENS and not (x.is_cuda and torch.is_autocast_enabled("cuda")):
            run = self._planned(flat) if self._takes_decode(member, flat) else None
            if flat.is_cuda and not key[-2]:  # (not capturing) compile and load the kernels now, never in a capture
                if run is not None:
                    run(flat)
                dispatch._GRAPHED[0] = True  # what a captured call would take: ready it as well
                try:
                    graphed = self._takes_decode(member, flat)
                finally:
                    dispatch._GRAPHED[0] = None
                if graphed:
                    self._planned(flat)(flat)
        if len(self._plans) < 64:
            self._plans[key] = run
        return run

    def output(self, member: StructuredLinear, index: int, x: Tensor) -> Tensor | None:
        """Member ``index``'s output for ``x`` (its weight only, (tokens, out)), or None: the member runs its own
        path."""
        if torch.is_grad_enabled() and (x.requires_grad or any(
                isinstance(f, Tensor) and f.requires_grad for f in self._factors(member))):
            return None
        lo = index * self.out
        if torch.compiler.is_compiling():
            return self._traced(member, x, lo)
        # eager: every check below is host time paid per member and token, so the cheap ones come first
        version = -2 if x.is_inference() else x._version  # (inference tensors keep no version counter)
        if self._pending > 0 and self._x is x and self._x_version == version:
            y = self._y
            self._pending -= 1
        else:
            from .kernels import dispatch

            key = (x.shape, x.dtype, x.device, PLAN_EPOCH[0], torch.is_autocast_enabled("cuda"),
                   x.is_cuda and torch.cuda.is_current_stream_capturing(), dispatch._GRAPHED[0])
            run = self._plans[key] if key in self._plans else self._plan(member, x, key)
            if run is None:
                return None
            y = run(x.reshape(-1, member.in_features))
            self._x, self._x_version, self._y, self._pending = x, version, y, len(self.members) - 1
        if self._pending == 0:
            self._forget()  # (every member has its slice: nothing of this step stays alive)
        return y[:, lo:lo + self.out]

    def _traced(self, member: StructuredLinear, x: Tensor, lo: int) -> Tensor | None:
        """Under torch.compile: the same bookkeeping on trace-time attributes (dynamo tracks the mutation and
        compares traced tensors by identity), so the graph holds one call per group; it ends with them cleared."""
        from .kernels import dispatch

        flat = x if x.dim() == 2 else x.reshape(-1, member.in_features)
        if flat.shape[0] > dispatch.DECODE_MAX_TOKENS or (flat.is_cuda and torch.is_autocast_enabled("cuda")):
            return None
        if not self._takes_decode(member, flat):
            return None
        if self._traced_x is x and self._traced_pending > 0:
            y = self._traced_y
            self._traced_pending -= 1
        else:
            y = self._call()(flat)
            self._traced_x, self._traced_y, self._traced_pending = x, y, len(self.members) - 1
        if self._traced_pending == 0:
            self._traced_x = self._traced_y = None
        return y[:, lo:lo + self.out]


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


def fuse_siblings(model: nn.Module, names: Iterable[tuple[str, ...]] = SIBLING_NAMES) -> list[SiblingGroup]:
    """Fuse every group of equal structured siblings of ``model`` (children of one module named together in
    ``names``, which must read the same input in the model's forward) so that few-token inference runs one product
    per group. Adds no memory. Returns the groups (empty if none qualified: different structures, sizes or dtypes,
    padded layers, merged or meta layers stay as they are)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_siblings expects an nn.Module, got {type(model).__name__}")
    names = [tuple(g) for g in names]
    if not all(g and all(isinstance(n, str) and n for n in g) for g in names):
        raise ValueError(f"fuse_siblings: names must be tuples of child names, e.g. {SIBLING_NAMES[0]}; got {names}")
    return [SiblingGroup(members) for members in _groups_in(model, names)]


def unfuse_siblings(model: nn.Module) -> int:
    """Undo :func:`fuse_siblings`: every member gets its own contiguous storage back. Returns the groups undone."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfuse_siblings expects an nn.Module, got {type(model).__name__}")
    groups = {id(e[0]): e[0] for m in model.modules() if (e := m.__dict__.get("_sibling_group")) is not None}
    for group in groups.values():
        members = group.members
        group.dissolve()
        with torch.no_grad():
            for m in members:
                for name, _, buffer in _LAYOUT[m.name][1]:
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
