"""RandomBasis (NOLA / RandLoRA): W = B(beta) A(alpha), B(beta) = sum_i beta_i B_i, A(alpha) = sum_i alpha_i A_i.

The bases B_i (out x r) and A_i (r x in) are fixed random matrices drawn from ``seed``; they are regenerated from the
seed, never stored (non-persistent buffers), so the learnable numbers are the 2k mixing coefficients only.

Projection (no closed form, a documented local method): W = sum_ij beta_i alpha_j B_i A_j is linear in the k x k
outer product M = beta alpha^T, so least squares over the k^2 products B_i A_j (normal equations, built from the
r x r Grams of the bases, never the in*out x k^2 design matrix) followed by the rank-1 truncation of M recovers a
member exactly (the products are linearly independent for random bases when k^2 <= in*out); alternating least
squares on beta and alpha then polishes the rank-1 start (each half-step exact, so the error never increases).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import StructuredLinear, StructureConfig, check_int, register, work_dtype


@dataclass(frozen=True)
class RandomBasisConfig(StructureConfig):
    name = "randbasis"
    rank: int
    bases: int
    seed: int = 0

    def __post_init__(self) -> None:
        check_int(self.name, "rank", self.rank)
        check_int(self.name, "bases", self.bases)
        check_int(self.name, "seed", self.seed, minimum=0)


def random_bases(seed: int, bases: int, rank: int, in_features: int, out_features: int,
                 device=None, dtype=None) -> tuple[Tensor, Tensor]:
    """The fixed bases (A: (k, r, in), B: (k, out, r)), drawn on the CPU in float64 from ``seed`` so every device and
    dtype sees the same matrices; scaled so that B(beta) A(alpha) with unit-variance coefficients has O(1) gain.
    Returns fresh tensors (the caller may change them)."""
    a, b = _drawn(seed, bases, rank, in_features, out_features)
    return a.to(device=device, dtype=dtype, copy=True), b.to(device=device, dtype=dtype, copy=True)


_SHARED: "weakref.WeakValueDictionary[tuple, Tensor]" = weakref.WeakValueDictionary()


def _shared_bases(key: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The bases of ``key`` on ``device`` in ``dtype``, one copy shared by every layer that draws the same bases (as
    RandLoRA shares its bases across layers): SmolLM2's 210 layers at the adapter table's size would otherwise hold
    16 GiB of identical fixed numbers. Kept only while some layer holds them (weak references)."""
    a, b = _SHARED.get((*key, "a", str(device), dtype)), _SHARED.get((*key, "b", str(device), dtype))
    if a is None or b is None:
        a, b = random_bases(*key, device=device, dtype=dtype)
        _SHARED[(*key, "a", str(device), dtype)], _SHARED[(*key, "b", str(device), dtype)] = a, b
    return a, b


_DRAWS: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}
_DRAWS_MAX_BYTES = 2 ** 30


def _drawn(*key: int) -> tuple[Tensor, Tensor]:
    """The float64 draw of ``random_bases(*key)``, remembered while the remembered draws stay under 1 GiB: adapting
    every layer of a model draws the same few shapes again and again (every q_proj of SmolLM2 has the same bases at
    the same seed), and the CPU draw is the slow part (~0.1 s per million numbers; 4e9 numbers for SmolLM2's 210
    layers at the adapter table's size)."""
    if key in _DRAWS:
        return _DRAWS[key]
    seed, bases, rank, in_features, out_features = key
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(bases, rank, in_features, generator=g, dtype=torch.float64) / (in_features * bases) ** 0.5
    b = torch.randn(bases, out_features, rank, generator=g, dtype=torch.float64) / (rank * bases) ** 0.5
    size = 8 * (a.numel() + b.numel())
    while _DRAWS and size + sum(8 * (x.numel() + y.numel()) for x, y in _DRAWS.values()) > _DRAWS_MAX_BYTES:
        _DRAWS.pop(next(iter(_DRAWS)))  # the oldest draw goes first
    if size <= _DRAWS_MAX_BYTES:
        _DRAWS[key] = (a, b)
    return a, b


def _solve(gram: Tensor, rhs: Tensor) -> Tensor:
    """Least squares from normal equations, scaled, through an SVD-based solver (rank-deficient systems allowed)."""
    scale = gram.diagonal().abs().mean().clamp_min(1e-300)
    return torch.linalg.lstsq(gram / scale, rhs / scale, driver="gelsd").solution


@register
class RandomBasis(StructuredLinear):
    name = "randbasis"
    Config = RandomBasisConfig
    scaled_by = ("alpha", "beta")
    zero_factors = ("beta",)
    als_sweeps = 50

    def __init__(self, in_features: int, out_features: int, rank: int, bases: int, seed: int = 0, bias: bool = True,
                 *, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        RandomBasisConfig(rank, bases, seed)
        self.rank, self.bases, self.seed = rank, bases, seed
        self._check_smaller_than_dense(2 * bases, "use fewer bases")
        self.alpha = nn.Parameter(torch.empty(bases, device=device, dtype=dtype))
        self.beta = nn.Parameter(torch.empty(bases, device=device, dtype=dtype))
        shape_a, shape_b = (bases, rank, in_features), (bases, out_features, rank)
        self.register_buffer("basis_a", torch.empty(shape_a, device=device, dtype=dtype), persistent=False)
        self.register_buffer("basis_b", torch.empty(shape_b, device=device, dtype=dtype), persistent=False)
        self.fit_info: dict[str, float] = {}
        self.init_()

    def init_(self, generator: torch.Generator | None = None) -> "RandomBasis":
        """Redraw the bases from the seed (also after ``to_empty``), then the coefficients (muP-style, unit fans)."""
        if self.basis_a.device.type != "meta":
            self.basis_a, self.basis_b = _shared_bases(
                (self.seed, self.bases, self.rank, self.in_features, self.out_features),
                self.basis_a.device, self.basis_a.dtype)
        return super().init_(generator)

    def mixed(self) -> tuple[Tensor, Tensor]:
        """(B(beta), A(alpha)) in the coefficients' dtype."""
        a = torch.einsum("k,kri->ri", self.alpha, self.basis_a.to(self.alpha.dtype))
        b = torch.einsum("k,kor->or", self.beta, self.basis_b.to(self.beta.dtype))
        return b, a

    def _matmul(self, x: Tensor) -> Tensor:
        b, a = self.mixed()
        return (x @ a.to(x.dtype).T) @ b.to(x.dtype).T

    def to_dense(self) -> Tensor:
        b, a = self.mixed()
        return b @ a

    def _project_(self, weight: Tensor) -> None:
        w = weight.to(torch.float64)
        a, b = self.basis_a.to(torch.float64), self.basis_b.to(torch.float64)
        k = self.bases
        bb = torch.einsum("ior,kos->ikrs", b, b)  # B_i^T B_k
        aa = torch.einsum("lri,jsi->ljrs", a, a)  # A_l A_j^T
        bw = torch.einsum("kor,oc->krc", b, w)  # B_k^T W
        # <B_i A_j, B_k A_l> = tr(B_i^T B_k A_l A_j^T);  <B_i A_j, W> = <B_i^T W, A_j>
        gram = torch.einsum("ikrs,ljsr->ijkl", bb, aa).reshape(k * k, k * k)
        rhs = torch.einsum("irc,jrc->ij", bw, a).reshape(k * k, 1)
        m = _solve(gram, rhs).reshape(k, k)
        u, s, vh = torch.linalg.svd(m)
        beta, alpha = u[:, 0] * s[0].sqrt(), vh[0] * s[0].sqrt()
        norm = torch.linalg.norm(w).clamp_min(1e-300)

        def error(be: Tensor, al: Tensor) -> float:
            approx = torch.einsum("k,kor->or", be, b) @ torch.einsum("k,kri->ri", al, a)
            return float(torch.linalg.norm(w - approx) / norm)

        best = (error(beta, alpha), beta, alpha)
        for _ in range(self.als_sweeps):  # exact least squares for beta given alpha, then alpha given beta
            am = torch.einsum("l,lri->ri", alpha, a)
            beta = _solve(torch.einsum("ikrs,sr->ik", bb, am @ am.T),
                          torch.einsum("irc,rc->i", bw, am).unsqueeze(1)).squeeze(1)
            bm = torch.einsum("k,kor->or", beta, b)
            alpha = _solve(torch.einsum("rs,ljsr->jl", bm.T @ bm, aa),
                           torch.einsum("k,krc,jrc->j", beta, bw, a).unsqueeze(1)).squeeze(1)
            err = error(beta, alpha)
            if not err < best[0] * (1 - 1e-9):
                break
            best = (err, beta, alpha)
        self.beta.copy_(best[1])
        self.alpha.copy_(best[2])
        self.fit_info = {"relative_error": best[0]}

    def _weight_flops(self, tokens: int) -> int:
        return 2 * tokens * self.rank * (self.in_features + self.out_features)

    def _factors(self) -> dict[str, tuple[float, float]]:
        # each coefficient scales a whole basis; unit fans give unit-variance coefficients (the bases carry the scale)
        return {"alpha": (1.0, 1.0), "beta": (1.0, 1.0)}

    def param_groups(self):
        # A coefficient moves a whole basis, so the 1/fan_in rule (lr_mult = in_features) would be far too fast:
        # the base learning rate applies as is.
        return [dict(g, lr_mult=1.0) for g in super().param_groups()]
