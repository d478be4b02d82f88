"""BlockDiagonal: W = diag(W_1, ..., W_b). Projection: keep the diagonal blocks (the rest is unreachable)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import StructuredLinear, StructureConfig, check_divides, check_int, divisors, register, round_up, run_op


@dataclass(frozen=True)
class BlockDiagonalConfig(StructureConfig):
    name = "blockdiag"
    nblocks: int
    pad: bool = False

    def __post_init__(self) -> None:
        check_int(self.name, "nblocks", self.nblocks)


def blocks_of(weight: Tensor, nblocks: int) -> Tensor:
    """View a (b*u, b*p) matrix as its (b, b, u, p) grid of blocks: [s, k] is block row s, column k."""
    out_p, in_p = weight.shape
    return weight.reshape(nblocks, out_p // nblocks, nblocks, in_p // nblocks).transpose(1, 2)


def blockdiag_bmm(x: Tensor, weight: Tensor) -> Tensor:
    """x (N, b*p) times the block-diagonal of weight (b, u, p), transposed: returns (N, b*u)."""
    nblocks, _, p = weight.shape
    if x.shape[0] == 1:  # one token (eager decode pays every torch call in host time): two views and the bmm
        return torch.bmm(x.reshape(nblocks, 1, p), weight.transpose(1, 2)).reshape(1, -1)
    xb = x.reshape(x.shape[0], nblocks, p).transpose(0, 1)
    return torch.bmm(xb, weight.transpose(1, 2)).transpose(0, 1).reshape(x.shape[0], nblocks * weight.shape[1])


@register
class BlockDiagonal(StructuredLinear):
    name = "blockdiag"
    Config = BlockDiagonalConfig
    scaled_by = ("weight",)

    def __init__(self, in_features: int, out_features: int, nblocks: int, pad: bool = False, bias: bool = True, *,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        check_int(self._label(), "nblocks", nblocks)
        self.nblocks, self.pad = nblocks, bool(pad)
        if not pad:
            check_divides(self._label(), "nblocks", nblocks, {"in_features": in_features,
                                                                "out_features": out_features}, pad_ok=True)
        self.in_padded, self.out_padded = round_up(in_features, nblocks), round_up(out_features, nblocks)
        u, p = self.out_padded // nblocks, self.in_padded // nblocks
        self._check_smaller_than_dense(nblocks * u * p, "use nblocks >= 2 (and a size that needs little padding)")
        self.weight = nn.Parameter(torch.empty(nblocks, u, p, device=device, dtype=dtype))
        self.init_()

    @classmethod
    def config_for_ratio(cls, in_features, out_features, ratio, pad=False, **fixed):
        if fixed:
            raise ValueError(f"blockdiag: ratio= takes no other keys but pad, got {sorted(fixed)}")
        choices = [b for b in divisors(in_features) if out_features % b == 0 and b >= 2]
        if pad:  # the best nblocks is next to 1 / ratio
            near = int(1.0 / ratio)
            choices = [b for b in (near, near + 1) if 2 <= b <= min(in_features, out_features)] or \
                      ([2] if min(in_features, out_features) >= 2 else [])
        if not choices:
            raise ValueError(f"blockdiag: no nblocks >= 2 divides in_features={in_features} and "
                             f"out_features={out_features}; pass pad=True")
        nblocks = min(choices, key=lambda b: abs(1.0 / b - ratio))
        return BlockDiagonalConfig(nblocks=nblocks, pad=bool(pad))

    def _matmul(self, x: Tensor) -> Tensor:
        y = run_op("blockdiag", blockdiag_bmm, self._pad_input(x, self.in_padded), self.weight, plans=self._plans)
        return self._trim_output(y)

    def to_dense(self) -> Tensor:
        return torch.block_diag(*self.weight)[: self.out_features, : self.in_features]

    def _project_(self, weight: Tensor) -> None:
        padded = weight.new_zeros(self.out_padded, self.in_padded)
        padded[: self.out_features, : self.in_features] = weight
        grid = blocks_of(padded, self.nblocks)
        self.weight.copy_(torch.diagonal(grid, dim1=0, dim2=1).permute(2, 0, 1))

    def _weight_flops(self, tokens: int) -> int:
        return 2 * tokens * self.weight.numel()

    def _factors(self) -> dict[str, tuple[float, float]]:
        return {"weight": (self.in_padded // self.nblocks, self.out_padded // self.nblocks)}
