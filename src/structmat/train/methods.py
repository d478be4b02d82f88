"""Training methods that change the model during a run: self-guided training and reverse sparsification.

Self-guided training (Wei et al. 2024, "Building on Efficient Foundations: Effective Training of LLMs with Structured
Feedforward Layers"): early in training a structured layer is poorly conditioned, so a dense *guide* W of the same
shape is trained beside it and the layer computes

    y = alpha(t) * W x + (1 - alpha(t)) * S(x),     alpha(t) = (1 + cos(pi * t / T_guide)) / 2  for t < T_guide,

alpha decays from 1 to 0 along a cosine; at step ``T_guide`` the guides are dropped and the model is purely
structured (same parameters and speed as training it structured from the start, plus the guide's cost before
``T_guide``). ``alpha`` is a buffer so a compiled model does not recompile when it changes.

Reverse sparsification (Monarch, Dao et al. 2022): train structured for the first steps (cheap), then replace every
structured layer by the dense ``nn.Linear`` it equals (``to_dense()``, so the function is unchanged at the switch) and
continue dense.

Both switches happen right AFTER the optimizer step that reaches their step count, so a checkpoint written at step
``s`` holds the post-switch model; :func:`model_phase` says which form a run has at any step, and a resumed run
rebuilds that form before loading. The optimizer is rebuilt at a switch, keeping the state of every surviving
parameter (:func:`rebuild_optimizer`); new dense weights start with fresh AdamW state.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from ..structures.base import StructuredLinear
from ..modules import locations as _locations, structured_modules
from ..surgery import densify


class SelfGuided(nn.Module):
    """``alpha * guide(x) + (1 - alpha) * structured(x)``: a structured layer with a dense guide beside it."""

    def __init__(self, structured: StructuredLinear, init_std: float) -> None:
        super().__init__()
        self.structured = structured
        p = next(structured.parameters())
        self.guide = nn.Linear(structured.in_features, structured.out_features, bias=False, device=p.device,
                               dtype=p.dtype)
        nn.init.normal_(self.guide.weight, std=init_std)
        self.register_buffer("alpha", torch.ones((), device=p.device, dtype=torch.float32), persistent=False)

    @property
    def in_features(self) -> int:
        return self.structured.in_features

    @property
    def out_features(self) -> int:
        return self.structured.out_features

    def forward(self, x: Tensor) -> Tensor:
        s, g = self.structured(x), self.guide(x)
        return torch.lerp(s, g, self.alpha.to(s.dtype))  # follows the output (autocast) dtype


def guide_alpha(step: int, guide_steps: int) -> float:
    """The guide's weight at 0-based ``step``: cosine from 1 to 0 over ``guide_steps`` steps, 0 after."""
    if guide_steps <= 0 or step >= guide_steps:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * step / guide_steps))


def attach_guides(model: nn.Module, init_std: float) -> dict[str, SelfGuided]:
    """Wrap every structured layer of ``model`` in :class:`SelfGuided` (in place); return {name: wrapper}."""
    found = structured_modules(model)
    if not found:
        raise ValueError("self-guided training needs structured layers, but the model has none (give --mlp/--attn "
                         "or a plan)")
    where = _locations(model)
    wrapped = {}
    for name, layer in found.items():
        w = SelfGuided(layer, init_std)
        w.train(layer.training)
        for parent, key in where.get(id(layer), []):
            setattr(parent, key, w)
        wrapped[name] = w
    return wrapped


def guides(model: nn.Module) -> list[SelfGuided]:
    return [m for m in model.modules() if isinstance(m, SelfGuided)]


def set_guide_alpha(model: nn.Module, alpha: float) -> None:
    for m in guides(model):
        m.alpha.fill_(alpha)


def detach_guides(model: nn.Module) -> int:
    """Replace every :class:`SelfGuided` by its structured layer (drops the guides); return how many."""
    found = guides(model)
    where = _locations(model)
    for w in found:
        for parent, key in where.get(id(w), []):
            setattr(parent, key, w.structured)
    return len(found)


def model_phase(step: int, guide_steps: int, densify_step: int) -> dict[str, bool]:
    """Which form the model has after ``step`` completed steps: guided (guides attached) and/or densified."""
    return {"guided": guide_steps > 0 and step < guide_steps,
            "densified": densify_step > 0 and step >= densify_step}


def apply_phase(model: nn.Module, phase: dict[str, bool], init_std: float) -> None:
    """Bring a freshly built (structured, unguided) model into ``phase``."""
    if phase["guided"]:
        attach_guides(model, init_std)
    if phase["densified"]:
        densify(model)


def rebuild_optimizer(old: torch.optim.Optimizer, make: Callable[[], torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """A new optimizer from ``make()`` (built over the model's current parameters) that keeps ``old``'s state for
    every parameter both share; new parameters start with fresh state."""
    new = make()
    for group in new.param_groups:
        for p in group["params"]:
            if p in old.state:
                new.state[p] = old.state[p]
    return new


__all__ = ["SelfGuided", "guide_alpha", "attach_guides", "detach_guides", "set_guide_alpha", "guides",
           "model_phase", "apply_phase", "rebuild_optimizer"]
