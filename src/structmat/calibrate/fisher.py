"""Empirical Fisher of linear-layer weights: the sum over batches of the squared gradient of the loss."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .stats import linear_in_features


def collect_fisher(model: nn.Module, module_names: list[str],
                   losses: Iterable[Tensor | Callable[[], Tensor]]) -> dict[str, Tensor]:
    """Sum of squared gradients of each named module's ``weight`` over a stream of per-batch losses.

    ``losses`` yields, per batch, either the scalar loss tensor itself (e.g. a generator
    ``(loss_fn(model, b) for b in batches)``, evaluated lazily so one graph lives at a time) or a zero-argument
    callable returning it. Each loss is back-propagated once; the squared gradient of every named weight is added in
    float64 on the weight's device. Returns ``{name: Tensor}`` shaped like each weight (so ``(in, out)`` for HF
    ``Conv1D``; transpose it together with the weight). During collection only the named weights require grad;
    ``requires_grad`` and existing ``.grad`` of all parameters are restored afterwards, also on error.
    A non-finite loss or gradient, or an empty stream, raises ValueError.
    """
    if isinstance(module_names, str):
        raise TypeError("collect_fisher: module_names must be a list of names, not a string")
    available = dict(model.named_modules())
    weights: dict[str, nn.Parameter] = {}
    for name in dict.fromkeys(module_names):
        if name not in available:
            raise ValueError(f"collect_fisher: no module named {name!r} in {type(model).__name__}")
        linear_in_features(available[name])
        weights[name] = available[name].weight
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    targets = {id(w) for w in weights.values()}
    fisher = {name: torch.zeros(w.shape, dtype=torch.float64, device=w.device) for name, w in weights.items()}
    batches = 0
    try:
        for p in params:
            p.grad = None
            p.requires_grad_(id(p) in targets)
        for item in losses:
            loss = item() if callable(item) else item
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"collect_fisher: each loss must be a scalar tensor, got {type(loss).__name__}"
                                 + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else ""))
            if not bool(torch.isfinite(loss.detach()).all()):
                raise ValueError(f"collect_fisher: the loss of batch {batches} is {loss.item()}; fix the data or "
                                 "model (e.g. run in float32), batches are never skipped")
            if not loss.requires_grad:
                raise ValueError("collect_fisher: the loss does not depend on the named weights (computed under "
                                 "torch.no_grad()?)")
            for w in weights.values():
                w.grad = None
            loss.reshape(()).backward()
            for name, w in weights.items():
                if w.grad is None:
                    raise ValueError(f"collect_fisher: the loss does not depend on {name!r}.weight")
                grad = w.grad.detach().to(torch.float64)
                if not bool(torch.isfinite(grad).all()):
                    raise ValueError(f"collect_fisher: gradient of {name!r}.weight has NaN/Inf in batch {batches}; "
                                     "lower the loss scale or run in float32")
                fisher[name].add_(grad.square())
            batches += 1
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad
    if batches == 0:
        raise ValueError("collect_fisher: the loss stream was empty; pass at least one batch")
    return fisher
