"""Monarch: W = L . P . R with L, R block-diagonal and P the Monarch permutation.

Convention (any rectangular shape, b = nblocks, out = b*u, in = b*p):
  R has b blocks R_k of shape (b*c, p): input block k -> b chunks of c intermediates, chunk s for output block s;
  P transposes the (k, s) grid of chunks, so L's block s receives chunk s of every R_k;
  L has b blocks L_s of shape (u, b*c).
Block (s, k) of W (rows of output block s, columns of input block k) is L_s[:, k-chunk] @ R_k[s-chunk, :],
a rank-c matrix, and different blocks share no parameters. Hence the Frobenius-optimal projection is a
truncated SVD of every block of the b x b grid, independently. The per-block rank is
c = rank * max(1, min(u, p) // b): rank=1 gives the usual Monarch (intermediate size = min(in, out) for square
blocks, 2*n^2/b parameters for n x n); rank=r is the two-core block tensor train of rank r. ``block_rank`` sets c
directly (used by the budget form to hit a parameter target finely).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import (StructuredLinear, StructureConfig, check_divides, check_int, divisors, register, round_down8,
                   round_up, run_op, truncated_svd, work_dtype)
from .blockdiag import blockdiag_bmm, blocks_of


@dataclass(frozen=True)
class MonarchConfig(StructureConfig):
    name = "monarch"
    nblocks: int
    rank: int = 1
    block_rank: int | None = None
    pad: bool = False

    def __post_init__(self) -> None:
        check_int(self.name, "nblocks", self.nblocks)
        check_int(self.name, "rank", self.rank)
        if self.block_rank is not None:
            check_int(self.name, "block_rank", self.block_rank)
            if self.rank != 1:
                raise ValueError("monarch: give either rank (a multiple of the Monarch block rank) or block_rank")


def monarch_block_rank(in_features: int, out_features: int, nblocks: int, rank: int = 1) -> int:
    u, p = -(-out_features // nblocks), -(-in_features // nblocks)
    return rank * max(1, min(u, p) // nblocks)


def monarch_multiply(x: Tensor, R: Tensor, L: Tensor) -> Tensor:
    """Reference Monarch product: x (N, b*p) -> (N, b*u); R (b, b*c, p), L (b, u, b*c)."""
    nblocks, bc, p = R.shape
    c = bc // nblocks
    if x.shape[0] == 1:  # one token (eager decode pays every torch call in host time): the same steps, fewer views
        h = torch.bmm(x.reshape(nblocks, 1, p), R.transpose(1, 2))  # (b_k, 1, b_s * c)
        h = h.reshape(nblocks, nblocks, c).transpose(0, 1).reshape(nblocks, 1, bc)  # (b_s, 1, b_k * c)
        return torch.bmm(h, L.transpose(1, 2)).reshape(1, -1)
    h = blockdiag_bmm(x, R)  # (N, b_k * b_s * c), ordered (k, s, c)
    h = h.reshape(x.shape[0], nblocks, nblocks, c).transpose(1, 2).reshape(x.shape[0], nblocks * bc)  # (s, k, c)
    return blockdiag_bmm(h, L)


@register
class Monarch(StructuredLinear):
    name = "monarch"
    Config = MonarchConfig
    scaled_by = ("L", "R")
    zero_factors = ("L",)

    def __init__(self, in_features: int, out_features: int, nblocks: int, rank: int = 1,
                 block_rank: int | None = None, pad: bool = False, bias: bool = True, *, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        MonarchConfig(nblocks, rank, block_rank, pad)  # validates the arguments
        self.nblocks, self.rank, self.block_rank, self.pad = nblocks, rank, block_rank, bool(pad)
        if not pad:
            check_divides(self._label(), "nblocks", nblocks, {"in_features": in_features,
                                                                "out_features": out_features}, pad_ok=True)
        self.in_padded, self.out_padded = round_up(in_features, nblocks), round_up(out_features, nblocks)
        b, u, p = nblocks, self.out_padded // nblocks, self.in_padded // nblocks
        c = block_rank if block_rank is not None else monarch_block_rank(in_features, out_features, nblocks, rank)
        self.c = c
        self._check_smaller_than_dense(
            b * c * (self.in_padded + self.out_padded),
            f"use more blocks or a lower rank (nblocks >= 3 for square shapes at rank=1; "
            f"valid nblocks: {[d for d in divisors(in_features) if out_features % d == 0 and d > 1]})",
        )
        if c > min(u, p):
            raise ValueError(f"{self._label()}: block rank {c} exceeds the block size {u}x{p}")
        self.R = nn.Parameter(torch.empty(b, b * c, p, device=device, dtype=dtype))
        self.L = nn.Parameter(torch.empty(b, u, b * c, device=device, dtype=dtype))
        self.init_()

    @classmethod
    def config_for_ratio(cls, in_features, out_features, ratio, pad=False, **fixed):
        if set(fixed) - {"nblocks"}:
            raise ValueError(f"monarch: ratio= takes only nblocks and pad besides, got {sorted(fixed)}")
        dense = in_features * out_features
        options = [fixed["nblocks"]] if "nblocks" in fixed else (
            range(2, min(65, in_features + 1, out_features + 1)) if pad else [b for b in divisors(in_features) if out_features % b == 0 and 2 <= b <= 64])
        best = None
        for b in options:
            ip, op = round_up(in_features, b), round_up(out_features, b)
            cmax = min(ip, op) // b
            c = min(max(round_down8(int(ratio * dense / (b * (ip + op)))), 1), cmax)
            frac = b * c * (ip + op) / dense
            if frac >= 1:
                continue
            # Prefer the budget match (to 1%), then the most Monarch-like block rank, then fewer blocks.
            key = (round(abs(frac - ratio), 2), abs(math.log(c / monarch_block_rank(ip, op, b))), b)
            if best is None or key < best[0]:
                best = (key, b, c)
        if best is None:
            raise ValueError(f"monarch: no nblocks fits ratio={ratio} for {in_features}x{out_features}; pass pad=True")
        _, b, c = best
        return MonarchConfig(nblocks=b, block_rank=c, pad=bool(pad))

    @classmethod
    def size_ladder(cls, in_features, out_features, sizes=4, nblocks=None, **fixed):
        """For each block count (the given one, else the common divisors 2..16), ``sizes`` block ranks up to twice
        the rank-1 Monarch's, multiples of 8 from 16 up."""
        if fixed:
            raise ValueError(f"monarch: the size ladder takes only nblocks=, got {sorted(fixed)}")
        counts = [nblocks] if nblocks else [b for b in divisors(math.gcd(in_features, out_features)) if 2 <= b <= 16]
        found: dict[MonarchConfig, None] = {}
        for b in counts:
            cmax = min(in_features, out_features) // b
            for k in range(sizes):
                c = max(1, int((k + 1) / sizes * monarch_block_rank(in_features, out_features, b) * 2))
                c = min(cmax, c - c % 8 if c >= 16 else c)
                found[MonarchConfig(nblocks=b, block_rank=c)] = None
        return list(found)

    def _matmul(self, x: Tensor) -> Tensor:
        y = run_op("monarch", monarch_multiply, self._pad_input(x, self.in_padded), self.R, self.L,
                   plans=self._plans)
        return self._trim_output(y)

    def to_dense(self) -> Tensor:
        b, c = self.nblocks, self.c
        L = self.L.reshape(b, -1, b, c)  # [s, t, k, q]
        R = self.R.reshape(b, b, c, -1)  # [k, s, q, j]
        grid = torch.einsum("stkq,ksqj->stkj", L, R)
        return grid.reshape(self.out_padded, self.in_padded)[: self.out_features, : self.in_features]

    def _project_(self, weight: Tensor) -> None:
        b, c = self.nblocks, self.c
        padded = weight.new_zeros(self.out_padded, self.in_padded, dtype=work_dtype(weight))
        padded[: self.out_features, : self.in_features] = weight
        left, right, _ = truncated_svd(blocks_of(padded, b), c)  # (s, k, u, c), (s, k, c, p)
        self.L.copy_(left.permute(0, 2, 1, 3).reshape(self.L.shape))
        self.R.copy_(right.transpose(0, 1).reshape(self.R.shape))

    def _weight_flops(self, tokens: int) -> int:
        return 2 * tokens * (self.R.numel() + self.L.numel())

    def _factors(self) -> dict[str, tuple[float, float]]:
        b, c = self.nblocks, self.c
        return {"R": (self.in_padded // b, b * c), "L": (b * c, self.out_padded // b)}
