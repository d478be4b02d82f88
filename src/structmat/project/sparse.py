"""Data-aware sparse projections (N:M and unstructured). Each returns a dense float64 matrix that is a member of
the target sparsity pattern (at most n nonzeros per group of m inputs, or at most nnz nonzeros), so the structure's
own magnitude projection recovers it exactly.

* ``wanda`` (Wanda): score |W_ij| * ||X_j||_2 (||X_j||_2 = sqrt(H_jj)), keep the top scores per group of m (N:M) or
  per output row (unstructured: nnz // out per row, the remainder to the best remaining scores overall); kept
  weights are unchanged. It is the exact minimizer of the output error when H is replaced by its diagonal.
* ``sparsegpt`` (SparseGPT, OBS with lazy blocked updates): objective tr(E H E^T) with the dampened Hessian
  H = X^T X / n + damp * mean(diag) * I. Columns are processed left to right. With U the upper Cholesky factor of
  H^-1 (H^-1 = U^T U; from Cholesky factorizations as the reference does, each checked, with a clamped-``eigh``
  inverse where one fails), pruning column j
  of the remaining problem costs w_ij^2 / U_jj^2 per row and the optimal compensation of the not-yet-processed
  columns is W[:, j:] -= ((w_j - q_j) / U_jj) U[j, j:], where q_j is column j with its pruned entries set to 0.
  Masks: N:M picks, at the first column of every group of m, the m - n lowest scores w^2 / U_jj^2 of the group
  (with the weights already updated by the columns to the left); unstructured picks the lowest scores within
  each block of ``blocksize`` columns (adaptive per block), with the number kept per block allotted so the total
  is exactly nnz. Updates within a block are applied column by column, to later blocks once per block
  (W[:, i2:] -= Err_block U[block, i2:]). Dead inputs (H_jj = 0) get H_jj = 1 and a zero weight column, as in
  the reference implementation, so an all-zero Gram needs no damping at all.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..structures.sparse import FixedSparse, NMSparse
from ._linalg import cached_factor, damped, factor_key, finite_factor, sym_eigh
from .registry import Problem, register_projection

log = logging.getLogger(__name__)


def wanda_nm(w: Tensor, gram: Tensor, n: int, m: int, in_padded: int) -> tuple[Tensor, Tensor]:
    """Wanda N:M: (pruned weight padded to ``in_padded`` columns, keep mask) in w's dtype."""
    out, cols = w.shape
    score = w.abs() * gram.diagonal().clamp_min(0.0).sqrt()
    pad = in_padded - cols
    score = torch.nn.functional.pad(score, (0, pad), value=-1.0)  # padding is never preferred
    keep = score.reshape(out, in_padded // m, m).topk(n, dim=-1).indices
    mask = torch.zeros(out, in_padded // m, m, dtype=torch.bool, device=w.device).scatter_(-1, keep, True)
    mask = mask.reshape(out, in_padded)
    return torch.nn.functional.pad(w, (0, pad)) * mask, mask


def wanda_unstructured(w: Tensor, gram: Tensor, nnz: int) -> tuple[Tensor, Tensor]:
    """Wanda with exactly ``nnz`` kept: (pruned weight, keep mask)."""
    out, cols = w.shape
    score = w.abs() * gram.diagonal().clamp_min(0.0).sqrt()
    base, extra = divmod(nnz, out)
    mask = torch.zeros_like(w, dtype=torch.bool)
    if base:
        mask.scatter_(1, score.topk(base, dim=1).indices, True)
    if extra:
        rest = score.masked_fill(mask, -1.0).reshape(-1)
        mask.view(-1)[rest.topk(extra).indices] = True
    return w * mask, mask


def inverse_cholesky_upper(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag) * I)^-1, computed in h's dtype and checked. Dead inputs
    (H_jj = 0) get H_jj = 1 first. The fast path is the reference's: Cholesky of the damped H, its inverse from
    that factor, the Cholesky of the inverse. Where a factorization fails or is not finite (an ill-conditioned H in
    float32), the inverse comes from ``eigh`` with the spectrum clamped at half the damping level instead.
    ``h`` may be a batch (B, n, n): the fast path runs batched, and only a matrix whose factorization fails is
    redone alone."""
    if h.dim() == 3:
        return _inverse_cholesky_upper_batched(h, damp)
    hd = damped(_revive_dead_inputs(h), damp)
    low, info = torch.linalg.cholesky_ex(hd)
    if int(info) == 0 and finite_factor(low):
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
        if int(info) == 0 and finite_factor(upper):
            return upper
    log.debug("sparsegpt: Cholesky of the damped Hessian (%d x %d) or of its inverse failed; using the clamped "
              "eigh inverse", hd.shape[0], hd.shape[0])
    del low
    lam, q = sym_eigh(hd, symmetric=True)
    tiny = torch.finfo(hd.dtype).tiny
    top = lam.max().clamp_min(tiny)
    if damp > 0:  # the damped spectrum is >= damp * mean(diag); clamp rounding below that
        floor = damp * h.diagonal().mean().clamp_min(tiny)
        floor = torch.minimum(floor, top) * 0.5
    else:
        floor = 1e-12 * top
    hinv = (q / lam.clamp_min(floor).unsqueeze(-2)) @ q.T
    hinv = 0.5 * (hinv + hinv.T)
    upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(upper).all()):
        raise ValueError(f"sparsegpt: the inverse Hessian is not positive definite (damp={damp}); "
                         "pass a larger damp= (e.g. 0.01 or 0.1)")
    return upper


def _inverse_cholesky_upper_batched(h: Tensor, damp: float) -> Tensor:
    revived = torch.stack([_revive_dead_inputs(g) for g in h]) if bool(dead_inputs(h).any()) else h
    low, info = torch.linalg.cholesky_ex(damped(revived, damp))
    upper, info_inv = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
    ok = ((info == 0) & (info_inv == 0) & torch.isfinite(low.diagonal(dim1=-2, dim2=-1)).all(dim=-1)
          & torch.isfinite(upper.diagonal(dim1=-2, dim2=-1)).all(dim=-1))
    for i in (~ok).nonzero().flatten().tolist():  # one sync; the rare failure takes the checked path alone
        upper[i] = inverse_cholesky_upper(h[i], damp)
    return upper


def dead_inputs(gram: Tensor) -> Tensor:
    """Inputs that never carry energy (H_jj = 0): they do not affect the output."""
    return gram.diagonal(dim1=-2, dim2=-1) <= 0


def _revive_dead_inputs(h: Tensor) -> Tensor:
    """As the reference SparseGPT: H_jj = 1 (row and column otherwise zero) for a dead input, so H stays invertible
    at any damp, also for an all-zero Gram."""
    dead = dead_inputs(h)
    if not bool(dead.any()):
        return h
    h = h.clone()
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    return h


_UPDATE_GROUP = 16  # unstructured: columns whose updates to the rest of the block are applied together


def sparsegpt(w: Tensor, gram: Tensor, *, nm: tuple[int | Tensor, int] | None = None, nnz: int | None = None,
              blocksize: int = 128, damp: float = 0.01, upper: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """SparseGPT on ``w`` (out, cols; float32 or float64) with Gram ``gram`` (cols, cols); see the module
    docstring. ``upper``: the precomputed :func:`inverse_cholesky_upper` of the Gram (shared between layers with
    one input).

    For N:M, ``cols`` must be a multiple of m (pad first); n may be a tensor of one n per row (rows are
    independent given the Gram, so several N:M sizes of one weight, stacked as rows, run in one pass: the
    budget's pricing). N:M also takes a leading batch dimension: ``w`` (B, out, cols) with ``gram`` and ``upper``
    (B, cols, cols), B independent problems in one pass (SparseGPT's column loop is launch-bound on a GPU: one
    pass for the same layer of every block instead of one per block). Returns (pruned and updated weight, keep
    mask).
    """
    if (nm is None) == (nnz is None):
        raise ValueError("sparsegpt: give exactly one of nm=(n, m) or nnz=")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"sparsegpt: blocksize must be a positive int, got {blocksize!r}")
    if w.dim() != 2 and (nm is None or w.dim() != 3 or gram.shape[:-2] != w.shape[:-2]):
        raise ValueError(f"sparsegpt: w must be (out, cols), or (batch, out, cols) for N:M with a Gram per batch "
                         f"entry; got w {tuple(w.shape)} and Gram {tuple(gram.shape)}")
    out, cols = w.shape[-2:]
    if nm is not None:
        n, m = nm
        per_row = isinstance(n, Tensor)
        if per_row:
            drop_per_row = (m - n.to(w.device)).view(-1, 1)
        if cols % m:
            raise ValueError(f"sparsegpt: {cols} columns are not a multiple of m={m}; pad first")
        blocksize = max(m, blocksize - blocksize % m)
    if upper is None:
        upper = inverse_cholesky_upper(gram.to(w.dtype), damp)
    w = w.masked_fill(dead_inputs(gram).unsqueeze(-2), 0.0)  # as the reference: an input that never carries
    kept = torch.ones_like(w, dtype=torch.bool)                # energy gets no weight (masked_fill: a new tensor)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        width = i2 - i1
        w1 = w[..., i1:i2].clone()
        u1 = upper[..., i1:i2, i1:i2]
        d = u1.diagonal(dim1=-2, dim2=-1).unsqueeze(-2)  # (..., 1, width)
        err = torch.zeros_like(w1)
        pruned = torch.zeros_like(w1, dtype=torch.bool)
        if nnz is not None:
            keep = round(nnz * i2 / cols) - round(nnz * i1 / cols)
            drop = out * width - min(max(keep, 0), out * width)
            if drop:
                score = (w1.square() / d.square()).reshape(-1)
                pruned.view(-1)[torch.argsort(score)[:drop]] = True
        # Column j's update reaches the block's later columns before they are read; columns past the current
        # group (of m for N:M) are read only when their group starts, so their updates are applied once per group
        # (one rank-`step` product) instead of once per column: the same arithmetic, far fewer passes.
        step = m if nm is not None else _UPDATE_GROUP
        for g0 in range(0, width, step):
            g1 = min(g0 + step, width)
            if nm is not None:
                score = w1[..., g0:g1].square() / d[..., g0:g1].square()
                if per_row:  # each row drops its own count of lowest scores
                    pruned[..., g0:g1] = score.argsort(dim=-1).argsort(dim=-1) < drop_per_row
                else:
                    drop_idx = score.topk(m - n, dim=-1, largest=False).indices
                    pruned[..., g0:g1].scatter_(-1, drop_idx, True)
                # The group's column-by-column updates in one solve: with the mask fixed, the errors e (per row)
                # satisfy e_j U_jj + P_j sum_{i<j} e_i U_ij = P_j w_j (P_j: column j pruned in that row), an
                # upper-triangular m x m system per row, solved for all rows at once (a few batched calls
                # instead of ~6 per column: SparseGPT's loop is launch-bound on a GPU).
                pr = pruned[..., g0:g1].to(w1.dtype)
                ug = u1[..., g0:g1, g0:g1]
                strict = torch.triu(ug, diagonal=1)
                system = strict.unsqueeze(-3) * pr.unsqueeze(-2) + torch.diag_embed(
                    ug.diagonal(dim1=-2, dim2=-1)).unsqueeze(-3)
                e = torch.linalg.solve_triangular(system, (pr * w1[..., g0:g1]).unsqueeze(-2), upper=True,
                                                  left=False).squeeze(-2)
                w1[..., g0:g1] = (w1[..., g0:g1] - e @ strict) * (1.0 - pr)
                err[..., g0:g1] = e
                if g1 < width:
                    w1[..., g1:] -= e @ u1[..., g0:g1, g1:]
                continue
            for j in range(g0, g1):
                col = w1[:, j]
                q = col.masked_fill(pruned[:, j], 0.0)
                e = (col - q) / d[0, j]
                if j + 1 < g1:
                    w1[:, j + 1:g1].addr_(e, u1[j, j + 1:g1], alpha=-1.0)
                w1[:, j] = q
                err[:, j] = e
            if g1 < width:
                w1[:, g1:].addmm_(err[:, g0:g1], u1[g0:g1, g1:], alpha=-1.0)
        w[..., i1:i2] = w1
        kept[..., i1:i2] = ~pruned
        if i2 < cols:
            w[..., i2:] -= err @ upper[..., i1:i2, i2:]
    return w, kept


# ----------------------------------------------------------------------------------------------
# Registered methods (N:M and unstructured)
# ----------------------------------------------------------------------------------------------


def _sparse_layer(p: Problem, layer, what: Tensor, keep: Tensor):
    """Fill ``layer`` (from ``p.new_layer()``) with exactly the support ``keep`` (padded columns for N:M)."""
    out_features, in_features = p.weight.shape
    if p.config.name == "nm":
        index = keep.nonzero()[:, 1].reshape(out_features, -1)
    else:
        index = keep.reshape(-1).nonzero().squeeze(1)
    expected = (out_features, layer.kept) if p.config.name == "nm" else tuple(layer.index.shape)
    if tuple(index.shape) != expected:  # cannot happen for valid masks; the structure's own selection is exact
        return p.cls.from_dense(what[:, :in_features].to(p.weight.dtype), p.bias, **p.args)
    with torch.no_grad():
        if p.config.name == "nm":
            layer.set_support_(index)  # (stored as packed in-group positions)
            layer.values.copy_(what.gather(1, index))
        else:
            layer.index.copy_(index)
            layer.values.copy_(what.reshape(-1)[index])
    return layer


def magnitude(p: Problem):
    """The largest magnitudes: the data-free projection of a sparse structure."""
    return p.baseline


def wanda(p: Problem):
    layer = p.new_layer()
    if p.config.name == "nm":  # the support straight from the per-group top-n (no dense mask, no nonzero())
        n, m = p.config.n, p.config.m
        out, cols = p.w.shape
        pad = layer.in_padded - cols
        score = torch.nn.functional.pad(p.w.abs() * p.h.diagonal().clamp_min(0.0).sqrt(), (0, pad), value=-1.0)
        pos = score.reshape(out, -1, m).topk(n, dim=-1).indices.sort(dim=-1).values  # (out, groups, n)
        columns = (pos + torch.arange(0, layer.in_padded, m, device=pos.device).view(1, -1, 1)).reshape(out, -1)
        with torch.no_grad():
            layer.set_positions_(pos.reshape(out, -1))
            layer.values.copy_(torch.nn.functional.pad(p.w, (0, pad)).gather(1, columns))
        return layer
    else:
        what, keep = wanda_unstructured(p.w, p.h, layer.values.numel())
    return _sparse_layer(p, layer, what, keep)


def _fit_key(p: Problem, damp: float, blocksize: int) -> tuple:
    """Where a batched fit of this layer waits in its statistics' cache (the weight's identity and version)."""
    return ("sparsegpt-fit", p.weight.data_ptr(), p.weight._version, tuple(p.weight.shape), str(p.config),
            float(damp), blocksize, p.w.dtype, str(p.w.device))


def _sparsegpt(p: Problem, damp: float, blocksize: int):
    layer = p.new_layer()
    pad = layer.in_padded - p.w.shape[1] if p.config.name == "nm" else 0
    ahead = p.stats.take_cached(_fit_key(p, damp, blocksize)) if p.config.name == "nm" else None
    if ahead is not None:  # fitted by prefit_sparsegpt with other layers of its shape
        return _sparse_layer(p, layer, *ahead)
    h = torch.nn.functional.pad(p.h, (0, pad, 0, pad)) if pad else p.h
    upper = cached_factor(p.stats, f"inverse-cholesky+{pad}", damp, p.w.dtype, p.w.device,
                          lambda: inverse_cholesky_upper(h, damp))
    if p.config.name == "nm":
        what, keep = sparsegpt(torch.nn.functional.pad(p.w, (0, pad)), h, nm=(p.config.n, p.config.m),
                               blocksize=blocksize, damp=damp, upper=upper)
    else:
        what, keep = sparsegpt(p.w, h, nnz=layer.values.numel(), blocksize=blocksize, damp=damp, upper=upper)
    return _sparse_layer(p, layer, what, keep)


def _price_sparsegpt_nm(p: Problem, configs: list, guard: bool, damp: float, blocksize: int,
                        row_splits: list[int] | None = None) -> list:
    """Squared relative output error of SparseGPT at every N:M size, the sizes of one m stacked as rows and pruned
    in ONE pass (SparseGPT's column loop is launch-bound on a GPU: one pass instead of one per size). Rows are
    independent given the Gram, so ``p.w`` may itself be several layers with this input stacked as rows
    (``row_splits``: their row counts; then one price list per layer). With ``guard``, each size's price is the
    better of SparseGPT and magnitude, as the guarded projection returns."""
    return _price_sparsegpt_nm_many([p], configs, guard, damp, blocksize, row_splits)[0]


def _price_sparsegpt_nm_many(problems: list[Problem], configs: list, guard: bool, damp: float, blocksize: int,
                             row_splits: list[int] | None = None) -> list:
    """:func:`_price_sparsegpt_nm` for several problems of one shape, each with its own input (e.g. the same
    layer of every block), in one batched pass; one result per problem."""
    from ..structures import from_dense

    batch = len(problems)
    rows_total, in_f = problems[0].w.shape
    splits = row_splits or [rows_total]
    starts = [sum(splits[:i]) for i in range(len(splits))]
    w = torch.stack([p.w for p in problems])  # (B, rows, in)
    gram = torch.stack([p.h for p in problems])
    groups: dict[tuple, list[int]] = {}
    for i, config in enumerate(configs):
        try:
            layer = problems[0].cls.from_config(config, in_f, splits[0], bias=False, device="meta")
        except ValueError:
            continue
        groups.setdefault((config.m, layer.in_padded), []).append(i)

    def energy(rows: Tensor) -> Tensor:  # (B,), read once at the end (no sync per size)
        return ((rows @ gram) * rows).sum(dim=(-2, -1)).clamp_min(0.0)

    totals = [energy(w[:, s0:s0 + n]) for s0, n in zip(starts, splits)]
    found: dict[tuple[int, int], Tensor] = {}  # (part, config index) -> (B,) squared relative errors
    stored = problems[0].weight.dtype
    for (m, in_padded), members in groups.items():
        pad = in_padded - in_f
        h = torch.nn.functional.pad(gram, (0, pad, 0, pad)) if pad else gram
        upper = _shared_uppers(problems, h, pad, damp)
        ns = torch.tensor([configs[i].n for i in members], device=w.device).repeat_interleave(rows_total)
        stacked = torch.nn.functional.pad(w, (0, pad)).repeat(1, len(members), 1)
        what, _ = sparsegpt(stacked, h, nm=(ns, m), blocksize=blocksize, damp=damp, upper=upper)
        for j, i in enumerate(members):
            for part, (s0, n) in enumerate(zip(starts, splits)):
                rows = w[:, s0:s0 + n]
                r0 = j * rows_total + s0
                value = energy(rows - what[:, r0:r0 + n, :in_f].to(stored).to(w.dtype))  # as stored in the layer
                if guard:  # the magnitude projection of every problem's rows at once (rows are independent)
                    flat = torch.stack([p.weight[s0:s0 + n] for p in problems]).reshape(-1, in_f)
                    base = from_dense(flat, configs[i]).to_dense().detach().reshape(batch, n, in_f)
                    value = torch.minimum(value, energy(rows - base.to(w.dtype)))
                found[part, i] = value
    keys = list(found)
    values = torch.stack([found[k] for k in keys] + totals).tolist() if keys else []
    tot = values[len(keys):]
    prices = [[[None] * len(configs) for _ in splits] for _ in problems]
    for (part, i), row in zip(keys, values):
        for b in range(batch):
            prices[b][part][i] = row[b] / tot[part][b] if tot[part][b] > 0 else 0.0
    return prices if row_splits is not None else [p[0] for p in prices]


def _shared_uppers(problems: list[Problem], h: Tensor, pad: int, damp: float) -> Tensor:
    """The inverse-Hessian factors of every problem's (padded) Gram, (B, n, n): each from its statistics' cache
    (layers sharing an input share it) or, for those not cached yet, computed in one batched call and cached."""
    w = problems[0].w
    key = lambda p: factor_key(p.stats, f"inverse-cholesky+{pad}", damp, w.dtype, w.device)  # noqa: E731
    missing = [b for b, p in enumerate(problems) if key(p) not in p.stats.__dict__.get("_derived", {})]
    if missing:
        fresh = inverse_cholesky_upper(h[missing], damp)
        for j, b in enumerate(missing):
            problems[b].stats.cached(key(problems[b]), lambda j=j: fresh[j])
    return torch.stack([p.stats.cached(key(p), None) for p in problems])


def prefit_sparsegpt(problems: list[Problem], damp: float, blocksize: int) -> None:
    """Fit several N:M layers of one shape and size, each with its own input, in ONE batched SparseGPT pass and
    leave each fit in its statistics' cache, where :func:`_sparsegpt` takes it: the same result as fitting each
    alone, for one launch-bound column loop instead of one per layer."""
    if problems[0].config.name != "nm" or len(problems) < 2:
        return
    layer = problems[0].cls.from_config(problems[0].config, problems[0].w.shape[1], problems[0].w.shape[0],
                                        bias=False, device="meta")
    pad = layer.in_padded - problems[0].w.shape[1]
    h = torch.stack([p.h for p in problems])
    h = torch.nn.functional.pad(h, (0, pad, 0, pad)) if pad else h
    upper = _shared_uppers(problems, h, pad, damp)
    w = torch.nn.functional.pad(torch.stack([p.w for p in problems]), (0, pad))
    what, keep = sparsegpt(w, h, nm=(problems[0].config.n, problems[0].config.m), blocksize=blocksize, damp=damp,
                           upper=upper)
    for b, p in enumerate(problems):
        p.stats.cached(_fit_key(p, damp, blocksize), lambda b=b: (what[b], keep[b]))


_sparsegpt.prefit = prefit_sparsegpt
_price_sparsegpt_nm.stacks_rows = True
_price_sparsegpt_nm.many = _price_sparsegpt_nm_many


for _structure in (NMSparse, FixedSparse):
    register_projection("magnitude", _structure, needs_stats=False, optimal=True)(magnitude)
    register_projection("wanda", _structure, needs_stats=True)(wanda)
    register_projection("sparsegpt", _structure, needs_stats=True, options={"damp": 0.01, "blocksize": 128},
                        pricer=_price_sparsegpt_nm if _structure is NMSparse else None,
                        budget_default={} if _structure is NMSparse else None)(_sparsegpt)
