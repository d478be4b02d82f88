"""GaLore: Adam in a low-rank projection of each matrix gradient, with an optional Fira-style residual.

For a weight ``W`` of shape (m, n) with gradient ``G`` (Zhao et al. 2024, "GaLore"):

* every ``update_proj_gap`` steps the projector is refreshed from an exact SVD of the current gradient: the top-``rank``
  left singular vectors ``P`` (m, r) when m < n (``R = Pᵀ G``, shape (r, n)), else the top right singular vectors
  ``Q`` (n, r) (``R = G Q``, shape (m, r)) — the smaller side is the one projected;
* Adam's moments live in the projected space: ``N = m̂ / (sqrt(v̂) + eps)`` from ``R``;
* the update is ``scale * P N`` (or ``scale * N Qᵀ``), applied with the group's learning rate, plus decoupled weight
  decay ``W <- W (1 - lr * weight_decay)`` on the full weight. Moments are not reset when the projector changes
  (as in the paper).

``residual="fira"`` (Chen et al. 2024, "Fira") adds the part of the gradient the projection drops,
``S = G - P Pᵀ G``, scaled along the side that is not projected by the ratio ``||N_i|| / ||R_i||`` (how much Adam
scaled that row/column inside the subspace), then limits its norm growth: the scaled residual's norm may grow by at
most a factor ``1.01`` from one step to the next. The update is ``scale * (P N + phi * S)``.

A parameter with fewer than two dimensions, one whose smaller side is at most ``rank`` (projection would save
nothing), or one in a group with ``galore=False`` (embeddings, by the trainer's choice) gets plain AdamW with the
same hyperparameters. Parameters with more than two dimensions (block-diagonal factors of shape (blocks, a, b)) are
projected block by block. All state is plain tensors — ``step``, ``exp_avg``, ``exp_avg_sq``, ``projector`` and, for
Fira, ``residual_norm`` — so it checkpoints through safetensors and loads with ``weights_only=True``. Moments and
projectors are computed in float32 (``load_state_dict`` casts them to the parameter's dtype, as for torch's AdamW:
exact resumption assumes float32 master weights, the trainer's default).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

RESIDUALS = ("none", "fira")
GROWTH_LIMIT = 1.01  # Fira's norm-growth limiter: the scaled residual's norm grows at most 1% per step


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore gradient projection (see the module docstring). Per-group options: ``lr``, ``betas``,
    ``eps``, ``weight_decay``, ``rank``, ``update_proj_gap``, ``scale``, ``residual``, ``galore`` (False: plain
    AdamW for the whole group)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, residual: str = "none"):
        if not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"GaLoreAdamW: rank must be an integer >= 1, got {rank!r}")
        if not (isinstance(update_proj_gap, int) and update_proj_gap >= 1):
            raise ValueError(f"GaLoreAdamW: update_proj_gap must be an integer >= 1, got {update_proj_gap!r}")
        if residual not in RESIDUALS:
            raise ValueError(f"GaLoreAdamW: residual must be one of {RESIDUALS}, got {residual!r}")
        if not (lr >= 0 and eps >= 0 and weight_decay >= 0 and scale > 0):
            raise ValueError(f"GaLoreAdamW: need lr >= 0, eps >= 0, weight_decay >= 0 and scale > 0, got lr={lr}, "
                             f"eps={eps}, weight_decay={weight_decay}, scale={scale}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"GaLoreAdamW: betas must lie in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, residual=residual, galore=True)
        super().__init__(params, defaults)

    # --------------------------------------------------------------------------------------------- per parameter
    @staticmethod
    def projects(p: Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p`` gets the low-rank projection under ``group``'s settings."""
        return bool(group["galore"]) and p.ndim >= 2 and min(p.shape[-2:]) > group["rank"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("GaLoreAdamW does not take sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                self._update(p, p.grad.float(), state, group)
        return loss

    def _update(self, p: Tensor, grad: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        step = int(state["step"].item())
        project = self.projects(p, group)
        left = project and p.shape[-2] < p.shape[-1]  # project the smaller side
        if project and (step % group["update_proj_gap"] == 0 or "projector" not in state):
            state["projector"] = self._projector(grad, group["rank"], left, p)
        if project:
            proj = state["projector"].to(grad.device)
            low = proj.mT @ grad if left else grad @ proj
        else:
            low = grad
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(low)
            state["exp_avg_sq"] = torch.zeros_like(low)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(low, 1 - beta1)
        v.mul_(beta2).addcmul_(low, low, value=1 - beta2)
        step += 1
        state["step"].fill_(step)
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        normed = (m / bc1) / ((v / bc2).sqrt() + eps)
        if project:
            update = proj @ normed if left else normed @ proj.mT
            if group["residual"] == "fira":
                update = update + self._fira_residual(grad, low, normed, proj, left, state)
            update = update * group["scale"]
        else:
            update = normed
        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-lr)

    def _projector(self, grad: Tensor, rank: int, left: bool, p: Tensor) -> Tensor:
        if not bool(torch.isfinite(grad).all()):
            raise FloatingPointError(f"GaLoreAdamW: the gradient of a parameter of shape {tuple(p.shape)} has NaN/Inf "
                                     "at a projector refresh; lower the learning rate or enable gradient clipping")
        u, _, vh = torch.linalg.svd(grad, full_matrices=False)
        return (u[..., :, :rank] if left else vh[..., :rank, :].mT).contiguous()

    @staticmethod
    def _fira_residual(grad: Tensor, low: Tensor, normed: Tensor, proj: Tensor, left: bool,
                       state: dict[str, Tensor]) -> Tensor:
        if left:   # low (r, n): one factor per column, over the projected rows
            residual = grad - proj @ low
            phi = normed.norm(dim=-2, keepdim=True) / (low.norm(dim=-2, keepdim=True) + 1e-8)
        else:      # low (m, r): one factor per row
            residual = grad - low @ proj.mT
            phi = normed.norm(dim=-1, keepdim=True) / (low.norm(dim=-1, keepdim=True) + 1e-8)
        scaled = residual * phi
        norm = scaled.norm()
        prev = state.get("residual_norm")
        if prev is not None:  # no limit after a zero residual (nothing to grow from); no host sync either way
            limit = GROWTH_LIMIT * prev.to(norm.device)
            shrink = torch.where((prev > 0) & (norm > limit), limit / norm.clamp_min(1e-30), torch.ones_like(norm))
            scaled, norm = scaled * shrink, norm * shrink
        state["residual_norm"] = norm.detach().reshape(()).clone()
        return scaled


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's tensor state (to compare GaLore's memory with AdamW's)."""
    return sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
               if isinstance(v, Tensor))


def without_embeddings(model: torch.nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``groups`` with the model's input/output embedding matrices moved into their own ``galore=False`` group
    (GaLore projects the transformer's linear maps; the embeddings keep plain AdamW, as in the paper)."""
    emb = {id(m.weight) for m in (getattr(model, "get_input_embeddings", lambda: None)(),
                                  getattr(model, "get_output_embeddings", lambda: None)()) if m is not None}
    out, moved = [], {}
    for g in groups:
        keep = [p for p in g["params"] if id(p) not in emb]
        for p in g["params"]:
            if id(p) in emb:
                moved.setdefault(id(p), (p, g))
        if keep:
            out.append(dict(g, params=keep))
    if moved:
        first = next(iter(moved.values()))[1]
        out.append(dict(first, params=[p for p, _ in moved.values()], name="embeddings", galore=False))
    return out


__all__ = ["GaLoreAdamW", "RESIDUALS", "state_bytes", "without_embeddings"]
