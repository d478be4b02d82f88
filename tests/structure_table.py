"""The shared contract table: one row per structure.

A row says how to build a member of the structure, which shapes it takes (a hypothesis strategy), an
*independent* construction of its dense weight from the raw parameters (loops, explicit permutation
matrices, torch.kron: never the layer's own to_dense), the theoretical projection optimum where a closed form
exists, and the parameter / FLOP formulas. Adding a structure = adding a row here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from hypothesis import assume
from hypothesis import strategies as st

import structmat
from structmat.structures.base import round_up


def _np(w: torch.Tensor) -> np.ndarray:
    return w.detach().to(torch.float64).cpu().numpy()


# --- independent dense references ------------------------------------------------------------------

def ref_dense(layer):
    return layer.weight


def ref_lowrank(layer):
    return sum(torch.outer(layer.U[:, k], layer.V[k]) for k in range(layer.rank))


def ref_blockdiag(layer):
    b, u, p = layer.weight.shape
    rows = []
    for s in range(b):
        row = [layer.weight[s] if k == s else layer.weight.new_zeros(u, p) for k in range(b)]
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)[: layer.out_features, : layer.in_features]


def monarch_permutation(b: int, c: int, dtype) -> torch.Tensor:
    """P with P @ h reordering R's output (k, s, q) into L's input (s, k, q), built by loops."""
    n = b * b * c
    P = torch.zeros(n, n, dtype=dtype)
    for k in range(b):
        for s in range(b):
            for q in range(c):
                P[s * b * c + k * c + q, k * b * c + s * c + q] = 1
    return P


def ref_monarch(layer):
    b, c = layer.nblocks, layer.c
    Lbd = torch.block_diag(*layer.L)
    Rbd = torch.block_diag(*layer.R)
    P = monarch_permutation(b, c, layer.R.dtype).to(layer.R.device)
    return (Lbd @ P @ Rbd)[: layer.out_features, : layer.in_features]


def ref_kron(layer):
    return sum(torch.kron(layer.A[t], layer.B[t]) for t in range(layer.rank))


def ref_nm(layer):
    # index holds the positions inside each group of m inputs, packed `bits` to a position from the low bits up;
    # value j of a row sits in group j // n
    per = 8 // layer.bits
    j = torch.arange(layer.values.shape[1])
    pos = (layer.index.long()[:, j // per] >> (j % per * layer.bits)) & ((1 << layer.bits) - 1)
    cols = pos + j.unsqueeze(0) // layer.n * layer.m
    rows = torch.arange(layer.out_features).unsqueeze(1).expand_as(cols)
    dense = layer.values.new_zeros(layer.out_features, layer.in_padded)
    dense = dense.index_put((rows.reshape(-1), cols.reshape(-1)), layer.values.reshape(-1))
    return dense[:, : layer.in_features]


def ref_sparse(layer):
    rows, cols = layer.index // layer.in_features, layer.index % layer.in_features
    return layer.values.new_zeros(layer.out_features, layer.in_features).index_put((rows, cols), layer.values)


def ref_splr(layer):
    return ref_sparse(layer.sparse) + ref_lowrank(layer.lowrank)


def ref_randbasis(layer):
    a = sum(layer.alpha[i] * layer.basis_a[i] for i in range(layer.bases))
    b = sum(layer.beta[i] * layer.basis_b[i] for i in range(layer.bases))
    return b @ a


def ref_ldu(layer):
    out, inn, r = layer.out_features, layer.in_features, layer.rank
    lower = layer.L.new_zeros(out, r)
    upper = layer.U.new_zeros(r, inn)
    it_l, it_u = iter(layer.L), iter(layer.U)
    for i in range(out):  # row-major order of the strictly lower entries, as torch.tril_indices lists them
        for j in range(min(i, r)):
            lower = lower.index_put((torch.tensor(i), torch.tensor(j)), next(it_l))
    for i in range(r):
        for j in range(i + 1, inn):
            upper = upper.index_put((torch.tensor(i), torch.tensor(j)), next(it_u))
    lower = lower + torch.eye(out, r, dtype=layer.L.dtype)
    upper = upper + torch.eye(r, inn, dtype=layer.U.dtype)
    return sum(layer.d[k] * torch.outer(lower[:, k], upper[k]) for k in range(r))


def ref_rows(layer):
    rows = [layer.values.new_zeros(layer.in_features)] * layer.out_features
    for j, i in enumerate(layer.index.tolist()):
        rows[i] = layer.values[j]
    return torch.stack(rows)


def ref_cols(layer):
    cols = [layer.values.new_zeros(layer.out_features)] * layer.in_features
    for j, i in enumerate(layer.index.tolist()):
        cols[i] = layer.values[:, j]
    return torch.stack(cols, dim=1)


REFS = {"dense": ref_dense, "lowrank": ref_lowrank, "blockdiag": ref_blockdiag, "monarch": ref_monarch,
        "kron": ref_kron, "nm": ref_nm, "sparse": ref_sparse, "splr": ref_splr, "randbasis": ref_randbasis,
        "ldu": ref_ldu, "rows": ref_rows, "cols": ref_cols}


def ref_product(layer):
    out = None
    for f in layer.layers:
        w = REFS[f.name](f)
        out = w if out is None else out @ w
    return out


REFS["product"] = ref_product


# --- theoretical optima (absolute Frobenius error), computed with numpy loops ------------------------

def opt_lowrank(w, rank):
    s = np.linalg.svd(_np(w), compute_uv=False)
    return math.sqrt(float((s[rank:] ** 2).sum()))


def opt_blockdiag(w, nblocks, pad=False):
    W = _np(w)
    out, inn = W.shape
    u, p = round_up(out, nblocks) // nblocks, round_up(inn, nblocks) // nblocks
    mask = np.zeros_like(W, dtype=bool)
    for s in range(nblocks):
        mask[s * u:(s + 1) * u, s * p:(s + 1) * p] = True
    return math.sqrt(float((W[~mask] ** 2).sum()))


def opt_monarch(w, nblocks, c, pad=False):
    W = _np(w)
    out, inn = W.shape
    Wp = np.zeros((round_up(out, nblocks), round_up(inn, nblocks)))
    Wp[:out, :inn] = W
    u, p = Wp.shape[0] // nblocks, Wp.shape[1] // nblocks
    total = 0.0
    for s in range(nblocks):
        for k in range(nblocks):
            sv = np.linalg.svd(Wp[s * u:(s + 1) * u, k * p:(k + 1) * p], compute_uv=False)
            total += float((sv[c:] ** 2).sum())
    return math.sqrt(total)


def opt_kron(w, rank, a_shape):
    W = _np(w)
    m1, n1 = a_shape
    m2, n2 = W.shape[0] // m1, W.shape[1] // n1
    R = np.zeros((m1 * n1, m2 * n2))
    for a in range(m1):
        for c in range(n1):
            R[a * n1 + c] = W[a * m2:(a + 1) * m2, c * n2:(c + 1) * n2].reshape(-1)
    sv = np.linalg.svd(R, compute_uv=False)
    return math.sqrt(float((sv[rank:] ** 2).sum()))


def opt_nm(w, n, m, pad=False):
    W = _np(w)
    total = 0.0
    for row in W:
        for g in range(0, len(row), m):
            mags = np.sort(np.abs(row[g:g + m]))[::-1]
            total += float((mags[n:] ** 2).sum())
    return math.sqrt(total)


def opt_selected(w, k, axis):
    W = _np(w)
    norms = np.sort((W ** 2).sum(axis=1 - axis))
    return math.sqrt(float(norms[: len(norms) - k].sum()))


def opt_sparse(w, density):
    W = _np(w).reshape(-1)
    nnz = max(1, round(density * W.size))
    mags = np.sort(np.abs(W))[::-1]
    return math.sqrt(float((mags[nnz:] ** 2).sum()))


# --- rows ----------------------------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    spec: Callable[[int, int], str]  # shape -> spec string
    shapes: st.SearchStrategy  # (in_features, out_features)
    weight_params: Callable[[Any], int]  # layer -> formula for the weight's parameter count
    weight_flops: Callable[[Any, int], int]  # (layer, tokens) -> formula for the weight's FLOPs
    optimum: Callable[[torch.Tensor, Any], float] | None = None  # (W, layer) -> optimal abs error
    exact_shapes: list[tuple[int, int]] | None = None  # fixed shapes for recovery (None: the strategy)
    local_method: bool = False  # no closed form: projection is a documented local method
    typical: tuple[int, int] = (40, 24)  # one valid (in, out) for single-shape tests
    fans: Callable[[Any], dict] | None = None  # layer -> {factor: (fan_in, fan_out)} as DESIGN.md defines them
    extra: dict = field(default_factory=dict)


sizes = st.integers(min_value=6, max_value=40)
any_shape = st.tuples(sizes, sizes)


@st.composite
def kron_shapes(draw):
    m1, m2, n1, n2 = (draw(st.integers(1, 6)) for _ in range(4))
    assume(m1 * m2 >= 2 and n1 * n2 >= 2 and (m1 * n1 + m2 * n2) < m1 * m2 * n1 * n2)
    return n1 * n2, m1 * m2


@st.composite
def product_shapes(draw):
    inn, out = draw(st.integers(16, 40)), draw(st.integers(16, 40))
    assume(inn * inn + out * out < 3 * inn * out)  # keeps the ARMOR-style product smaller than dense
    return inn, out


def _armor_params(inn, out):
    """out x out block-diagonal (8 blocks) . 1:4 sparse in -> out . in x in block-diagonal (8 blocks)."""
    return 8 * (round_up(out, 8) // 8) ** 2 + out * (round_up(inn, 4) // 4) + 8 * (round_up(inn, 8) // 8) ** 2


ARMOR = "blockdiag:nblocks=8,pad=True * nm:n=1,m=4,pad=True * blockdiag:nblocks=8,pad=True"

ROWS = [
    Row("dense", lambda i, o: "dense", any_shape,
        lambda l: l.in_features * l.out_features,
        lambda l, t: 2 * t * l.in_features * l.out_features,
        optimum=lambda w, l: 0.0, fans=lambda l: {"weight": (l.in_features, l.out_features)}),
    Row("lowrank", lambda i, o: f"lowrank:rank={max(1, min(i, o) // 4)}", any_shape,
        lambda l: l.rank * (l.in_features + l.out_features),
        lambda l, t: 2 * t * l.rank * (l.in_features + l.out_features),
        optimum=lambda w, l: opt_lowrank(w, l.rank), fans=lambda l: {"V": (l.in_features, l.rank), "U": (l.rank, l.out_features)}),
    Row("blockdiag", lambda i, o: "blockdiag:nblocks=3,pad=True", any_shape,
        lambda l: 3 * round_up(l.out_features, 3) // 3 * round_up(l.in_features, 3) // 3,
        lambda l, t: 2 * t * 3 * (round_up(l.out_features, 3) // 3) * (round_up(l.in_features, 3) // 3),
        optimum=lambda w, l: opt_blockdiag(w, l.nblocks), fans=lambda l: {"weight": (round_up(l.in_features, 3) // 3, round_up(l.out_features, 3) // 3)}),
    Row("monarch", lambda i, o: "monarch:nblocks=3,pad=True", st.tuples(st.integers(12, 40), st.integers(12, 40)),
        lambda l: 3 * l.c * (round_up(l.in_features, 3) + round_up(l.out_features, 3)),
        lambda l, t: 2 * t * 3 * l.c * (round_up(l.in_features, 3) + round_up(l.out_features, 3)),
        optimum=lambda w, l: opt_monarch(w, l.nblocks, l.c), fans=lambda l: {"R": (round_up(l.in_features, 3) // 3, 3 * l.c), "L": (3 * l.c, round_up(l.out_features, 3) // 3)}),
    Row("monarch_rank2", lambda i, o: "monarch:nblocks=8,rank=2,pad=True", st.tuples(st.integers(40, 72),
                                                                                       st.integers(40, 72)),
        lambda l: 8 * l.c * (round_up(l.in_features, 8) + round_up(l.out_features, 8)),
        lambda l, t: 2 * t * 8 * l.c * (round_up(l.in_features, 8) + round_up(l.out_features, 8)),
        optimum=lambda w, l: opt_monarch(w, l.nblocks, l.c), typical=(64, 48)),
    Row("kron", lambda i, o: "kron:rank=1", kron_shapes(),
        lambda l: l.rank * (l.a_shape[0] * l.a_shape[1] + l.b_shape[0] * l.b_shape[1]),
        lambda l, t: 2 * t * l.rank * (l.in_features * l.b_shape[0] + l.a_shape[0] * l.a_shape[1] * l.b_shape[0])
        + t * (l.rank - 1) * l.out_features,
        optimum=lambda w, l: opt_kron(w, l.rank, l.a_shape), typical=(36, 20), fans=lambda l: {"B": (l.b_shape[1], l.b_shape[0]), "A": (l.rank * l.a_shape[1], l.a_shape[0])}),
    Row("nm", lambda i, o: "nm:n=2,m=4,pad=True", any_shape,
        lambda l: l.out_features * (round_up(l.in_features, 4) // 4) * 2,
        lambda l, t: 2 * t * l.out_features * (round_up(l.in_features, 4) // 4) * 2,
        optimum=lambda w, l: opt_nm(w, 2, 4), fans=lambda l: {"values": (round_up(l.in_features, 4) / 2, l.out_features / 2)}),
    Row("sparse", lambda i, o: "sparse:density=0.3", any_shape,
        lambda l: max(1, round(0.3 * l.in_features * l.out_features)),
        lambda l, t: 2 * t * max(1, round(0.3 * l.in_features * l.out_features)),
        optimum=lambda w, l: opt_sparse(w, 0.3), fans=lambda l: {"values": (l.values.numel() / l.out_features, l.values.numel() / l.in_features)}),
    Row("splr", lambda i, o: "splr:rank=2,density=0.05", st.tuples(st.integers(24, 40), st.integers(24, 40)),
        lambda l: max(1, round(0.05 * l.in_features * l.out_features)) + 2 * (l.in_features + l.out_features),
        lambda l, t: 2 * t * (max(1, round(0.05 * l.in_features * l.out_features))
                              + 2 * (l.in_features + l.out_features)) + t * l.out_features,
        exact_shapes=[(48, 40), (40, 64), (96, 80)], local_method=True),
    Row("product", lambda i, o: ARMOR, product_shapes(),
        lambda l: _armor_params(l.in_features, l.out_features),
        lambda l, t: 2 * t * _armor_params(l.in_features, l.out_features),
        local_method=True, typical=(40, 32)),
]

ROWS += [
    Row("randbasis", lambda i, o: "randbasis:rank=2,bases=3,seed=5", any_shape,
        lambda l: 2 * l.bases,
        lambda l, t: 2 * t * l.rank * (l.in_features + l.out_features),
        exact_shapes=[(12, 10), (40, 24), (7, 33)], local_method=True,
        fans=lambda l: {"alpha": (1.0, 1.0), "beta": (1.0, 1.0)}),
    Row("ldu", lambda i, o: f"ldu:rank={max(1, min(i, o) // 4)}", any_shape,
        lambda l: l.rank * (l.in_features + l.out_features) - l.rank ** 2,
        lambda l, t: 2 * t * l.rank * (l.in_features + l.out_features) + t * l.rank,
        optimum=lambda w, l: opt_lowrank(w, l.rank),
        fans=lambda l: {"U": (l.in_features, l.rank), "d": (l.in_features, l.out_features),
                        "L": (l.rank, l.out_features)}),
    Row("rows", lambda i, o: f"rows:k={max(1, o // 3)}", any_shape,
        lambda l: l.k * l.in_features,
        lambda l, t: 2 * t * l.k * l.in_features,
        optimum=lambda w, l: opt_selected(w, l.k, 0), fans=lambda l: {"values": (l.in_features, l.k)}),
    Row("cols", lambda i, o: f"cols:k={max(1, i // 3)}", any_shape,
        lambda l: l.k * l.out_features,
        lambda l, t: 2 * t * l.k * l.out_features,
        optimum=lambda w, l: opt_selected(w, l.k, 1), fans=lambda l: {"values": (l.k, l.out_features)}),
]

ROW_IDS = [r.name for r in ROWS]
