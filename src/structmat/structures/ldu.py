"""LowRankLDU (LoLDU): W = L diag(d) U with L (out x r) unit lower-trapezoidal and U (r x in) unit upper-trapezoidal.

Only the free entries are stored: the strictly lower part of L and the strictly upper part of U (packed vectors) and
the diagonal d, so the learnable numbers are r(in + out) - r^2. The set of such products is the set of rank <= r
matrices whose leading r x r block has nonsingular leading minors, which is dense in the rank-r matrices; so the
Frobenius-optimal projection is the truncated SVD (Eckart-Young), followed by r steps of Gaussian elimination without
pivoting, which factors it exactly. A weight whose truncation has a (numerically) singular leading minor cannot be
represented and raises a ValueError. For LoLDU-style fine-tuning train only ``d`` (and keep L, U from the projection).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import StructuredLinear, StructureConfig, check_int, register, truncated_svd, work_dtype


@dataclass(frozen=True)
class LowRankLDUConfig(StructureConfig):
    name = "ldu"
    rank: int

    def __post_init__(self) -> None:
        check_int(self.name, "rank", self.rank)


@register
class LowRankLDU(StructuredLinear):
    name = "ldu"
    Config = LowRankLDUConfig
    scaled_by = ("d",)
    zero_factors = ("d",)

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        check_int(self._label(), "rank", rank)
        if rank > min(in_features, out_features):
            raise ValueError(f"{self._label()}: rank={rank} exceeds min(in, out)={min(in_features, out_features)}")
        self.rank = rank
        self._check_smaller_than_dense(rank * (in_features + out_features) - rank * rank,
                                       "use a smaller rank")
        lower = torch.tril_indices(out_features, rank, -1, device=device)
        upper = torch.triu_indices(rank, in_features, 1, device=device)
        self.register_buffer("lower_index", lower, persistent=False)
        self.register_buffer("upper_index", upper, persistent=False)
        self.L = nn.Parameter(torch.empty(lower.shape[1], device=device, dtype=dtype))
        self.d = nn.Parameter(torch.empty(rank, device=device, dtype=dtype))
        self.U = nn.Parameter(torch.empty(upper.shape[1], device=device, dtype=dtype))
        self.init_()

    def init_(self, generator: torch.Generator | None = None) -> "LowRankLDU":
        if self.lower_index.device.type != "meta":  # the index buffers are not saved: rebuild them after to_empty
            self.lower_index.copy_(torch.tril_indices(self.out_features, self.rank, -1))
            self.upper_index.copy_(torch.triu_indices(self.rank, self.in_features, 1))
        return super().init_(generator)

    def factors_dense(self) -> tuple[Tensor, Tensor]:
        """(L, U) as dense unit-trapezoidal matrices."""
        eye_l = torch.eye(self.out_features, self.rank, device=self.L.device, dtype=self.L.dtype)
        eye_u = torch.eye(self.rank, self.in_features, device=self.U.device, dtype=self.U.dtype)
        lower = eye_l.index_put((self.lower_index[0], self.lower_index[1]), self.L)
        upper = eye_u.index_put((self.upper_index[0], self.upper_index[1]), self.U)
        return lower, upper

    def _matmul(self, x: Tensor) -> Tensor:
        lower, upper = self.factors_dense()
        h = (x @ upper.to(x.dtype).T) * self.d.to(x.dtype)
        return h @ lower.to(x.dtype).T

    def to_dense(self) -> Tensor:
        lower, upper = self.factors_dense()
        return (lower * self.d) @ upper

    def _project_(self, weight: Tensor) -> None:
        left, right, _ = truncated_svd(weight.to(torch.float64), self.rank)
        m = left @ right
        r = self.rank
        lower = torch.zeros(self.out_features, r, dtype=torch.float64, device=m.device)
        upper = torch.zeros(r, self.in_features, dtype=torch.float64, device=m.device)
        d = torch.zeros(r, dtype=torch.float64, device=m.device)
        scale = torch.linalg.norm(m).clamp_min(1e-300)
        for k in range(r):  # Gaussian elimination without pivoting: exact for a rank-r matrix with regular minors
            pivot = m[k, k]
            if abs(float(pivot)) <= 1e-12 * float(scale):
                raise ValueError(f"{self._label()} ldu:rank={r}: the rank-{r} truncation of this weight has a singular "
                                 f"leading minor at {k}; LDU without pivoting cannot represent it (use lowrank)")
            d[k] = pivot
            lower[:, k] = m[:, k] / pivot
            upper[k, :] = m[k, :] / pivot
            m = m - pivot * torch.outer(lower[:, k], upper[k, :])
        dt = work_dtype(weight)
        self.L.copy_(lower[self.lower_index[0], self.lower_index[1]].to(dt))
        self.U.copy_(upper[self.upper_index[0], self.upper_index[1]].to(dt))
        self.d.copy_(d.to(dt))

    def _weight_flops(self, tokens: int) -> int:
        return 2 * tokens * self.rank * (self.in_features + self.out_features) + tokens * self.rank

    def _factors(self) -> dict[str, tuple[float, float]]:
        return {"U": (self.in_features, self.rank), "d": (self.in_features, self.out_features),
                "L": (self.rank, self.out_features)}
