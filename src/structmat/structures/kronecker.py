"""KroneckerSum: W = sum_t A_t (x) B_t (Compacter/PHM-style).

A_t is (m1, n1), B_t is (m2, n2), out = m1*m2, in = n1*n2. The Van Loan-Pitsianis rearrangement
R(W)[(a, c), (b, d)] = W[(a, b), (c, d)] maps sum_t A_t (x) B_t to sum_t vec(A_t) vec(B_t)^T, so the
Frobenius-optimal projection is the rank-r truncated SVD of R(W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import StructuredLinear, StructureConfig, check_int, divisors, register, truncated_svd, work_dtype


@dataclass(frozen=True)
class KroneckerSumConfig(StructureConfig):
    name = "kron"
    rank: int
    a_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        check_int(self.name, "rank", self.rank)
        if self.a_shape is not None:
            if len(self.a_shape) != 2:
                raise ValueError(f"kron: a_shape must be rows x cols, got {self.a_shape}")
            for v in self.a_shape:
                check_int(self.name, "a_shape", v)


def nearest_sqrt_divisor(n: int) -> int:
    return min(divisors(n), key=lambda d: (abs(math.log(d) - 0.5 * math.log(n)), d))


def rearrange(weight: Tensor, a_shape: tuple[int, int]) -> Tensor:
    """Van Loan-Pitsianis: (m1*m2, n1*n2) -> (m1*n1, m2*n2)."""
    m1, n1 = a_shape
    m2, n2 = weight.shape[0] // m1, weight.shape[1] // n1
    return weight.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


@register
class KroneckerSum(StructuredLinear):
    name = "kron"
    Config = KroneckerSumConfig
    scaled_by = ("A", "B")
    zero_factors = ("A",)

    def __init__(self, in_features: int, out_features: int, rank: int, a_shape: tuple[int, int] | None = None,
                 bias: bool = True, *, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        KroneckerSumConfig(rank, a_shape)
        if a_shape is None:
            a_shape = (nearest_sqrt_divisor(out_features), nearest_sqrt_divisor(in_features))
        m1, n1 = a_shape
        if out_features % m1 or in_features % n1:
            raise ValueError(f"{self._label()}: a_shape={m1}x{n1} must divide out x in; valid rows: "
                             f"{divisors(out_features)}, valid cols: {divisors(in_features)}")
        self.rank, self.a_shape = rank, (m1, n1)
        m2, n2 = out_features // m1, in_features // n1
        self.b_shape = (m2, n2)
        self._check_smaller_than_dense(rank * (m1 * n1 + m2 * n2),
                                       f"use rank < {in_features * out_features // (m1 * n1 + m2 * n2)}")
        self.A = nn.Parameter(torch.empty(rank, m1, n1, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(rank, m2, n2, device=device, dtype=dtype))
        self.init_()

    @classmethod
    def config_for_ratio(cls, in_features, out_features, ratio, a_shape=None, **fixed):
        if fixed:
            raise ValueError(f"kron: ratio= takes only a_shape besides, got {sorted(fixed)}")
        m1, n1 = a_shape or (nearest_sqrt_divisor(out_features), nearest_sqrt_divisor(in_features))
        per_rank = m1 * n1 + (out_features // m1) * (in_features // n1)
        rank = max(1, int(ratio * in_features * out_features / per_rank))
        rank = min(rank, (in_features * out_features - 1) // per_rank)
        return KroneckerSumConfig(rank=rank, a_shape=a_shape)

    def _matmul(self, x: Tensor) -> Tensor:
        (m1, n1), (m2, n2) = self.a_shape, self.b_shape
        n, r = x.shape[0], self.rank
        # Two plain 2-D products, no broadcast batched matmul: a broadcast operand is expanded to the batch and that
        # copy is what autograd saves (x r times, A once per token), and Compacter fine-tuning of SmolLM2 peaked at
        # 90.7 GiB on an H200 that way. Only Z (r * n1 * m2 numbers per token) is saved besides the input.
        z = x.reshape(n * n1, n2) @ self.B.reshape(r * m2, n2).T  # Z[N, c, t, b] = sum_d x[N, c, d] B[t, b, d]
        z = z.reshape(n, n1, r, m2).permute(0, 3, 2, 1).reshape(n * m2, r * n1)  # rows (N, b), columns t * n1 + c
        y = z @ self.A.permute(0, 2, 1).reshape(r * n1, m1)  # Y[N, a, b] = sum_{t, c} A[t, a, c] Z[N, c, t, b]
        return y.reshape(n, m2, m1).transpose(1, 2).reshape(n, m1 * m2)

    def to_dense(self) -> Tensor:
        (m1, n1), (m2, n2) = self.a_shape, self.b_shape
        return torch.einsum("tac,tbd->abcd", self.A, self.B).reshape(m1 * m2, n1 * n2)

    def _project_(self, weight: Tensor) -> None:
        left, right, _ = truncated_svd(rearrange(weight.to(work_dtype(weight)), self.a_shape), self.rank)
        self.A.copy_(left.T.reshape(self.A.shape))
        self.B.copy_(right.reshape(self.B.shape))

    def _weight_flops(self, tokens: int) -> int:
        (m1, n1), (m2, n2) = self.a_shape, self.b_shape
        return 2 * tokens * self.rank * (n1 * n2 * m2 + m1 * n1 * m2) + tokens * (self.rank - 1) * m1 * m2

    def _factors(self) -> dict[str, tuple[float, float]]:
        (m1, n1), (m2, n2) = self.a_shape, self.b_shape
        # B acts first on n2 inputs; A then sums over n1 positions and the r terms.
        return {"B": (n2, m2), "A": (self.rank * n1, m1)}
