"""Whitened Monarch: minimize the calibration output error tr((W - M) H (W - M)^T), H = X^T X (+ damping), over
Monarch matrices M (see ``structures/monarch.py``: block (s, k) of the b x b grid is an independent rank-c
matrix; s indexes output blocks of u rows, k input blocks of p columns).

Method: exact block-coordinate descent over the b input (column) blocks. Write E = W - M, E_k its column block k,
H_kk' the blocks of H. As a function of column block k alone, with the others fixed,

    tr(E H E^T) = tr((E_k + G_k) H_kk (E_k + G_k)^T) + const,   G_k = (sum_{k' != k} E_k' H_k'k) H_kk^+ ,

(H_kk^+ a pseudo-inverse from ``eigh``; exact because the range of H_k'k lies in that of H_kk for PSD H). So the
optimal column block k is M_k = argmin ||(T_k - M_k) S_k||_F over M_k with rank-c row blocks, where
T_k = W_k + G_k and S_k S_k^T = H_kk. Row blocks decouple, and each is the whitened rank-c problem of
``project/lowrank.py``: M_sk = U_c U_c^T T_sk with U_c the top-c left singular vectors of T_sk S_k (no inverse of
S_k).

Cost (what the budget solver pays for every layer and size, and what a GPU is slow at): no SVD, QR or eigh per
block. A GPU runs a batch of small SVDs/eighs/QRs one matrix at a time (about 15 ms for one 144 x 384 SVD on an
H200), so every subspace here comes from subspace iteration, U <- orth(A A^T U), with ``orth`` a batched
Cholesky-QR (batched Gram products, Cholesky factorizations and triangular solves: one call per batch). The starts
take ``start_iters`` steps from a fixed Gaussian start; a sweep updates each block's basis with ``power`` steps
warm-started at its current basis (the target moves little between sweeps): 2 for a projection, 1 for the
budget's prices. For a fixed basis U, U U^T T_sk is the best block with that column space, and a subspace-iteration
step never captures less of A A^T than U did, so every block update lowers the objective; a sweep that would raise
it through rounding ends the descent. The sqrt factor and the pseudo-inverse of H_kk come from one batched ``eigh``
per statistics object (q/k/v and gate/up share it) and block count. The layer's factors come straight from the
fitted bases (block (s, k) = U (U^T M)), with no SVD of the result.

Start: the better (on the damped objective) of the data-free Monarch projection (each block's top-c column space,
by subspace iteration) and the "block-diagonal whitened" point T_k = W_k (exact when inputs of different blocks
are uncorrelated); then sweep until the relative decrease is below ``tol`` or ``sweeps`` sweeps are done. Since
the data-free projection is a candidate start and sweeps are monotone, the result is never worse than data-free
on the damped objective (up to the start's subspace-iteration convergence; tests check it against the exact
data-free projection and against an exact-SVD descent). Padding (``pad=True``): the
weight is padded with zero rows and columns and the Gram with zero rows and columns (the padded inputs are 0);
the padded rows of W are 0 and stay 0, padded columns are cropped at the end, which changes neither the rank of
any block nor the objective.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..structures.blockdiag import blocks_of
from ..structures.monarch import Monarch
from ._linalg import cached_factor, damped, sym_eigh
from .registry import Problem, register_projection


def _grid_of(wp: Tensor, b: int) -> Tensor:
    """(L, b*u, b*p) matrices -> their (L, k, s, u, p) column-major block grids."""
    n, out_p, in_p = wp.shape
    return wp.reshape(n, b, out_p // b, b, in_p // b).permute(0, 3, 1, 2, 4)


def _grid(blocks: Tensor) -> Tensor:
    """(L, k, s, u, p) column-major block grids -> the (L, b*u, b*p) matrices."""
    n, b, _, u, p = blocks.shape
    return blocks.permute(0, 2, 3, 1, 4).reshape(n, b * u, b * p)


class _Whitening:
    """For a batch of L Grams: the padded damped Grams h (L, n, n), their diagonal blocks H_kk (L, b, p, p),
    S_k (S_k S_k^T = H_kk) and H_kk^+ from one batched eigh; ``delta`` (L,) the absolute damping."""

    def __init__(self, gram: Tensor, nblocks: int, in_padded: int, damp: float, dtype: torch.dtype) -> None:
        n, inn = gram.shape[0], gram.shape[-1]
        hp = gram.new_zeros(n, in_padded, in_padded, dtype=dtype)
        hp[:, :inn, :inn] = gram.to(dtype)
        h = damped(hp, 0.0)
        self.delta = torch.zeros(n, dtype=dtype, device=gram.device)
        if damp > 0:  # relative to the mean energy of the real (unpadded) inputs
            level = gram.diagonal(dim1=-2, dim2=-1).mean(dim=-1).to(dtype).clamp_min(torch.finfo(dtype).tiny)
            self.delta = damp * level
            h.diagonal(dim1=-2, dim2=-1).add_(self.delta.unsqueeze(-1))
        p = in_padded // nblocks
        self.h, self.p = h, p
        self.hkk = h.reshape(n, nblocks, p, nblocks, p).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()
        lam, q = sym_eigh(self.hkk)
        self.s = q * lam.sqrt().unsqueeze(-2)
        cutoff = 1e-12 * lam.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(lam.dtype).tiny)
        inv = torch.where(lam > cutoff, 1.0 / lam.clamp_min(torch.finfo(lam.dtype).tiny), torch.zeros_like(lam))
        self.pinv = (q * inv.unsqueeze(-2)) @ q.transpose(-1, -2)

    def select(self, index: Tensor) -> "_Whitening":
        """The batch entries ``index`` (e.g. one entry per layer from one per distinct input)."""
        out = object.__new__(_Whitening)
        out.p = self.p
        for name in ("h", "hkk", "s", "pinv", "delta"):
            setattr(out, name, getattr(self, name)[index])
        return out


def _whitening(stats, gram: Tensor, nblocks: int, in_padded: int, damp: float, dtype: torch.dtype) -> _Whitening:
    return cached_factor(stats, f"monarch-whitening:{nblocks}:{in_padded}", damp, dtype, gram.device,
                         lambda: _Whitening(gram.unsqueeze(0), nblocks, in_padded, damp, dtype))


def _shared_whitening(stats: list, grams: Tensor, nblocks: int, in_padded: int, damp: float,
                      dtype: torch.dtype) -> _Whitening:
    """The whitening of each of L layers, computed once per distinct statistics object (q/k/v share one)."""
    if len(stats) == 1:
        return _whitening(stats[0], grams[0], nblocks, in_padded, damp, dtype)
    first: dict[int, int] = {}  # id of a statistics object -> the index of the first layer with it
    for i, s in enumerate(stats):
        first.setdefault(id(s), i)
    distinct = list(first.values())
    slot = [distinct.index(first[id(s)]) for s in stats]
    whole = _Whitening(grams[distinct], nblocks, in_padded, damp, dtype)
    return whole.select(torch.tensor(slot, device=grams.device))


def _objective(e: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """tr(E H E^T) (batched over leading dims) and E H, which the descent keeps up to date."""
    eh = e @ h
    return (eh * e).sum(dim=(-2, -1)), eh


def _orth(y: Tensor) -> Tensor:
    """An orthonormal basis of the columns of ``y`` (batched, same span): shifted Cholesky-QR and two unshifted
    passes (CholeskyQR3, Fukaya et al. 2020): batched Gram products, Cholesky factorizations and triangular solves,
    so a GPU runs the whole batch at once (its QR and SVD loop over the matrices). Householder QR where a factor
    fails (a rank-deficient y, e.g. an all-zero padded block)."""
    m, n = y.shape[-2:]
    eps = torch.finfo(y.dtype).eps
    q, failed = y, None
    for shift in (11.0 * (m * n + n * (n + 1)) * eps, 0.0, 0.0):
        gram = q.transpose(-1, -2) @ q
        if shift:  # relative to ||y||_F^2 >= ||y||_2^2: keeps the first factorization positive definite
            diag = gram.diagonal(dim1=-2, dim2=-1)
            diag.add_(shift * diag.sum(dim=-1, keepdim=True))
        low, info = torch.linalg.cholesky_ex(gram)
        failed = info if failed is None else failed | info  # checked once at the end: one device sync, not three
        q = torch.linalg.solve_triangular(low.transpose(-1, -2), q, upper=True, left=False)
    if bool((failed != 0).any() | ~torch.isfinite(q).all()):
        return torch.linalg.qr(y).Q
    return q


def _top_subspace(a: Tensor, c: int, iters: int) -> Tensor:
    """Orthonormal (..., u, c) basis of the top-c left singular subspace of each a (..., u, p), by subspace
    iteration from a fixed Gaussian start (``iters`` steps U <- orth(A A^T U)): matmuls and batched Cholesky-QR."""
    gen = torch.Generator().manual_seed(0)
    # the same start numbers in either precision (float32 and float64 fits follow one path)
    omega = torch.randn(a.shape[-1], c, generator=gen, dtype=torch.float64).to(a.device, a.dtype)
    q = _orth(a @ omega)
    for _ in range(iters):
        q = _orth(a @ (a.transpose(-1, -2) @ q))
    return q


def _sweeps(wp: Tensor, wh: _Whitening, m_hat: Tensor, eh: Tensor, basis: Tensor, value: Tensor, sweeps: int,
            tol: float, power: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Block-coordinate descent of L layers at once from ``m_hat`` (L, out, in) (with E H = ``eh`` for
    E = wp - m_hat, and its blocks' column spaces ``basis`` (L, k, s, u, c)); ``power`` subspace-iteration steps
    per block update. Each layer stops on its own (a sweep that would raise its objective through rounding, or a
    relative decrease below ``tol``) and is then held fixed while the others go on, so each result is the layer's
    own descent. Returns the results, their blocks' bases, the damped objectives (L,) and the sweeps done (L,)."""
    h, p, n, b = wh.h, wh.p, basis.shape[0], basis.shape[1]
    last = value.clone()
    done = torch.zeros(n, dtype=torch.long, device=value.device)
    active = last > 0
    for _ in range(sweeps):
        if not bool(active.any()):  # one device sync per sweep
            break
        candidate, new_basis, new_eh = m_hat.clone(), basis.clone(), eh.clone()
        e = wp - candidate
        for k in range(b):
            cols = slice(k * p, (k + 1) * p)
            g = (new_eh[..., cols] - e[..., cols] @ wh.hkk[:, k]) @ wh.pinv[:, k]
            target = (wp[..., cols] + g).reshape(n, b, -1, p)  # (L, s, u, p)
            a = target @ wh.s[:, k].unsqueeze(1)
            u = new_basis[:, k]
            for _ in range(power):
                u = _orth(a @ (a.transpose(-1, -2) @ u))
            new_basis[:, k] = u
            new = (u @ (u.transpose(-1, -2) @ target)).reshape(n, -1, p)
            delta = (wp[..., cols] - new) - e[..., cols]
            new_eh += delta @ h[:, cols, :]
            e[..., cols] += delta
            candidate[..., cols] = new
        new_value = (new_eh * e).sum(dim=(-2, -1))  # E H is kept up to date: no product with H for the objective
        accept = active & (new_value <= last)  # rounding only can raise it: every block update lowers it
        converged = last - new_value <= tol * last
        m_hat = torch.where(accept.view(-1, 1, 1), candidate, m_hat)
        eh = torch.where(accept.view(-1, 1, 1), new_eh, eh)
        basis = torch.where(accept.view(-1, 1, 1, 1, 1), new_basis, basis)
        last = torch.where(accept, new_value, last)
        done += accept.long()
        active = accept & ~converged & (last > 0)
    return m_hat, basis, last, done


def whitened_monarch_batch(w: Tensor, gram: Tensor, *, nblocks: int, ranks: list[int], out_padded: int,
                           in_padded: int, damp: float = 1e-6, sweeps: int = 10, tol: float = 1e-4,
                           power: int = 1, start_iters: int = 4, stats: list | None = None
                           ) -> list[tuple[Tensor, Tensor, dict]]:
    """Whitened Monarch members of L layers of one shape (``w`` (L, out, in), each with its Gram (L, in, in))
    for several block ranks at once: one batched descent per rank for all layers (a GPU runs the launch-bound
    sweeps once, not once per layer), the whitening computed once per distinct input (``stats``: the layers'
    statistics objects, for sharing and caching). Returns per rank (members padded to (L, out_padded,
    in_padded) in w's dtype, their blocks' orthonormal column bases (L, k, s, u, c), info) with info's values
    tensors of L entries ("objective": the undamped tr(E H E^T) of each member)."""
    n, out, inn = w.shape
    b = nblocks
    wp = w.new_zeros(n, out_padded, in_padded)
    wp[:, :out, :inn] = w
    wh = (_shared_whitening(stats, gram, b, in_padded, damp, w.dtype) if stats is not None
          else _Whitening(gram, b, in_padded, damp, w.dtype))
    grid = _grid_of(wp, b)  # (L, k, s, u, p)
    whitened = grid @ wh.s.unsqueeze(2)
    results = []
    for c in ranks:
        u_df = _top_subspace(grid, c, start_iters)  # the data-free (per-block truncated SVD) column spaces
        u_bd = _top_subspace(whitened, c, start_iters)  # the block-whitened ones (inputs of blocks uncorrelated)
        start_df = _grid(u_df @ (u_df.transpose(-1, -2) @ grid))
        start_bd = _grid(u_bd @ (u_bd.transpose(-1, -2) @ grid))
        values, ehs = _objective(torch.stack([wp - start_df, wp - start_bd]), wh.h)
        block_whitened = values[1] <= values[0]
        pick = block_whitened.view(-1, 1, 1)
        m_hat = torch.where(pick, start_bd, start_df)
        basis = torch.where(pick.view(-1, 1, 1, 1, 1), u_bd, u_df).contiguous()
        eh = torch.where(pick, ehs[1], ehs[0])
        first = torch.where(block_whitened, values[1], values[0])
        m_hat, basis, last, done = _sweeps(wp, wh, m_hat, eh, basis, first, sweeps, tol, power)
        # the undamped objective from the damped one: tr(E (H + d I) E^T) = tr(E H E^T) + d ||E||^2
        undamped = (last - wh.delta * (wp - m_hat).square().sum(dim=(-2, -1))).clamp_min(0.0)
        info = {"block_whitened_start": block_whitened, "sweeps": done, "damped_objective_start": first,
                "damped_objective": last, "objective": undamped}
        results.append((m_hat, basis, info))
    return results


def whitened_monarch_sizes(w: Tensor, gram: Tensor, *, nblocks: int, ranks: list[int], out_padded: int,
                           in_padded: int, damp: float = 1e-6, sweeps: int = 10, tol: float = 1e-4,
                           power: int = 1, start_iters: int = 4, stats=None) -> list[tuple[Tensor, Tensor, dict]]:
    """Whitened Monarch members of w for several block ranks at once (the whitening is computed once for all).
    Returns per rank (member padded to (out_padded, in_padded) in w's dtype, its blocks' orthonormal column
    bases (k, s, u, c), info); info["objective"] is the undamped tr(E H E^T) of the member."""
    fits = whitened_monarch_batch(w.unsqueeze(0), gram.unsqueeze(0), nblocks=nblocks, ranks=ranks,
                                  out_padded=out_padded, in_padded=in_padded, damp=damp, sweeps=sweeps, tol=tol,
                                  power=power, start_iters=start_iters, stats=[stats] if stats is not None else None)
    return [(member[0], basis[0], _info_of(info)[0]) for member, basis, info in fits]


def _info_of(info: dict[str, Tensor]) -> list[dict]:
    """The batched fit's info as one plain dict per layer (one host read per field)."""
    values = {k: v.tolist() for k, v in info.items()}
    return [{"start": "block-whitened" if values["block_whitened_start"][i] else "data-free",
             "sweeps": int(values["sweeps"][i]), "damped_objective_start": values["damped_objective_start"][i],
             "damped_objective": values["damped_objective"][i], "objective": values["objective"][i]}
            for i in range(len(values["sweeps"]))]


def _price_whitened(p: Problem, configs: list, guard: bool, damp: float, sweeps: int, tol: float, power: int
                    ) -> list[float | None]:
    """Squared relative output error of every Monarch config (None where it does not fit the layer), the configs
    of one block count and padding fitted together (one start SVD and one whitening for all their block ranks)."""
    return _price_whitened_many([p], configs, guard, damp, sweeps, tol, power)[0]


def _price_whitened_many(problems: list[Problem], configs: list, guard: bool, damp: float, sweeps: int,
                         tol: float, power: int) -> list[list[float | None]]:
    """:func:`_price_whitened` for several layers of one shape, each with its own input (e.g. the same layer of
    every block), in batched descents: one result per layer."""
    out_f, in_f = problems[0].w.shape
    groups: dict[tuple, list[int]] = {}
    layers: dict[int, Monarch] = {}
    for i, config in enumerate(configs):
        try:
            layer = problems[0].cls.from_config(config, in_f, out_f, bias=False, device="meta")
        except ValueError:
            continue
        layers[i] = layer
        groups.setdefault((layer.nblocks, layer.out_padded, layer.in_padded), []).append(i)
    w = torch.stack([p.w for p in problems])
    gram = torch.stack([p.stats.gram.to(w.device) for p in problems])
    total = _objective(w, gram.to(w.dtype))[0]
    found: dict[int, Tensor] = {}
    for (b, out_padded, in_padded), members in groups.items():
        fits = whitened_monarch_batch(w, gram, nblocks=b, ranks=[layers[i].c for i in members],
                                      out_padded=out_padded, in_padded=in_padded, damp=damp, sweeps=sweeps, tol=tol,
                                      power=power, stats=[p.stats for p in problems])
        for i, (_, _, info) in zip(members, fits):
            found[i] = info["objective"]
    keys = list(found)
    values = torch.stack([found[i] for i in keys] + [total]).tolist()  # one device sync for every price
    totals = values[-1]
    prices: list[list[float | None]] = [[None] * len(configs) for _ in problems]
    for i, row in zip(keys, values):
        for j, value in enumerate(row):
            prices[j][i] = value / totals[j] if totals[j] > 0 else 0.0
    return prices


_price_whitened.many = _price_whitened_many


# Pricing is an estimate: it runs fewer block-coordinate sweeps than the final projection, one subspace-iteration
# step each (each sweep only lowers the error, so the price is an upper bound of what the final projection
# reaches); tests/test_pricing.py bounds it against the exact 2-sweep descent.
@register_projection("whitened", Monarch, needs_stats=True, optimal=True,
                     options={"damp": 1e-6, "sweeps": 10, "tol": 1e-4, "power": 2}, pricer=_price_whitened,
                     pricing_options={"sweeps": 4, "power": 1}, budget_default={"nblocks": 4})
def _whitened(p: Problem, damp: float, sweeps: int, tol: float, power: int) -> tuple[Monarch, dict]:
    layer = p.new_layer()
    b, c = layer.nblocks, layer.c
    ahead = p.stats.take_cached(_fit_key(p, damp, sweeps, tol, power))
    if ahead is not None:  # fitted by prefit_whitened with other layers of its shape
        member, basis, info = ahead
    else:
        gram = p.stats.gram.to(p.w.device)
        member, basis, info = whitened_monarch_sizes(p.w, gram, nblocks=b, ranks=[c], out_padded=layer.out_padded,
                                                     in_padded=layer.in_padded, damp=damp, sweeps=sweeps, tol=tol,
                                                     power=power, stats=p.stats)[0]
    # the factors straight from the fit (no SVD of the result): block (s, k) = U (U^T M), each rank-one term
    # scaled to equal norms on both sides
    right = basis.transpose(-1, -2) @ blocks_of(member, b).transpose(0, 1)  # (k, s, c, p)
    scale = right.norm(dim=-1).sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    left = (basis * scale.unsqueeze(-2)).transpose(0, 1)  # (s, k, u, c)
    right = right / scale.unsqueeze(-1)
    with torch.no_grad():
        layer.L.copy_(left.permute(0, 2, 1, 3).reshape(layer.L.shape))
        layer.R.copy_(right.reshape(layer.R.shape))
        if p.bias is not None:
            layer.bias.copy_(p.bias)
    return layer, info


def _fit_key(p: Problem, damp: float, sweeps: int, tol: float, power: int) -> tuple:
    """Where a batched fit of this layer waits in its statistics' cache (the weight's identity and version)."""
    return ("monarch-whitened-fit", p.weight.data_ptr(), p.weight._version, tuple(p.weight.shape), str(p.config),
            float(damp), sweeps, float(tol), power, p.w.dtype, str(p.w.device))


def prefit_whitened(problems: list[Problem], damp: float, sweeps: int, tol: float, power: int) -> None:
    """Fit several layers of one shape and size, each with its own input, in ONE batched descent and leave each
    fit in its statistics' cache, where :func:`_whitened` takes it: each layer's own descent (a layer that stops
    is held while the others go on), one launch-bound sweep loop instead of one per layer."""
    if len(problems) < 2:
        return
    out_f, in_f = problems[0].w.shape
    layer = problems[0].cls.from_config(problems[0].config, in_f, out_f, bias=False, device="meta")
    w = torch.stack([p.w for p in problems])
    gram = torch.stack([p.stats.gram.to(w.device) for p in problems])
    member, basis, info = whitened_monarch_batch(
        w, gram, nblocks=layer.nblocks, ranks=[layer.c], out_padded=layer.out_padded, in_padded=layer.in_padded,
        damp=damp, sweeps=sweeps, tol=tol, power=power, stats=[p.stats for p in problems])[0]
    for i, (p, plain) in enumerate(zip(problems, _info_of(info))):
        p.stats.cached(_fit_key(p, damp, sweeps, tol, power), lambda i=i, plain=plain: (member[i], basis[i], plain))


_whitened.prefit = prefit_whitened


@register_projection("fisher", Monarch, needs_stats=False, needs_fisher=True)
def _fisher(p: Problem) -> Monarch:
    """FWSVD for Monarch: rows weighted by the Fisher row sums, D = diag(sqrt(sum_j F_ij)). A row scaling keeps
    every block's rank, so the weighted objective ||D (W - M)||_F^2 decouples into the b x b blocks and
    M = D^-1 Monarch(D W) (the structure's own per-block truncated SVD of D W, rows scaled back) is its exact
    minimizer over Monarch matrices."""
    rows = p.fisher.to(p.w.device, p.w.dtype).sum(dim=1)
    d = rows.clamp_min(1e-12 * rows.max().clamp_min(torch.finfo(p.w.dtype).tiny)).sqrt().unsqueeze(1)
    scaled = p.cls.from_dense(d * p.w, None, **p.args).to_dense().detach().to(p.w.dtype)
    bias = None if p.bias is None else p.bias.to(p.w.dtype)
    return p.cls.from_dense(scaled / d, bias, **p.args).to(dtype=p.weight.dtype)
