"""Project real dense weights onto every structure at a parameter budget and tabulate the cost:
params, FLOPs, relative Frobenius error and forward time relative to dense, measured in the same run."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..structures import from_dense
from ..structures.base import round_up
from .results import markdown_table
from .speed import median_ms

DEFAULT_SPECS = {
    "dense": "dense",
    "lowrank (SVD)": "lowrank:ratio={r}",
    "blockdiag": "blockdiag:ratio={r}",
    "monarch": "monarch:ratio={r}",
    "kron": "kron:ratio={r}",
    "nm (2:4)": "nm:ratio={r},m=4",
    "sparse (top-k)": "sparse:ratio={r}",
    "splr": "splr:ratio={r}",
    "product (ARMOR)": "armor",
}


def armor_spec(in_features: int, out_features: int, ratio: float, nblocks: int = 16, m: int = 8) -> str:
    """ARMOR-style BlockDiagonal . N:M . BlockDiagonal with the core's n chosen to fill the budget."""
    wrappers = (round_up(out_features, nblocks) ** 2 + round_up(in_features, nblocks) ** 2) / nblocks
    core = ratio - wrappers / (in_features * out_features)
    n = min(m - 1, max(1, round(core * m)))
    pad = ",pad=True" if in_features % nblocks or out_features % nblocks else ""
    return f"blockdiag:nblocks={nblocks}{pad} * nm:n={n},m={m} * blockdiag:nblocks={nblocks}{pad}"


@dataclass
class Row:
    weight: str
    structure: str
    spec: str
    params: int
    params_frac: float
    flops_per_token: int
    flops_frac: float
    rel_error: float
    fit_seconds: float
    forward_vs_dense: float  # dense time / structured time: > 1 means faster than dense


def project_all(name: str, weight: Tensor, ratio: float = 0.5, tokens: int = 256,
                specs: dict[str, str] | None = None, repeats: int = 20) -> list[Row]:
    specs = specs or DEFAULT_SPECS
    out_features, in_features = weight.shape
    x = torch.randn(tokens, in_features, dtype=weight.dtype, device=weight.device)
    dense_ms = median_ms(lambda: F.linear(x, weight), repeats=repeats, device=weight.device)
    dense_flops = 2 * in_features * out_features
    rows = []
    for label, template in specs.items():
        spec = armor_spec(in_features, out_features, ratio) if template == "armor" else template.format(r=ratio)
        start = time.perf_counter()
        layer = from_dense(weight, spec)
        fit = time.perf_counter() - start
        ms = median_ms(lambda: layer(x), repeats=repeats, device=weight.device)
        params = layer.param_count()
        flops = layer.flops(1)
        rows.append(Row(name, label, layer.spec, params, params / (in_features * out_features), flops,
                        flops / dense_flops, layer.relative_error(weight), fit, dense_ms / ms))
    return rows


def format_table(rows: list[Row]) -> str:
    header = ("weight", "structure", "params", "% dense", "FLOPs/tok", "% dense", "rel. error", "fit s", "fwd vs dense")
    return markdown_table(header, [(r.weight, r.structure, f"{r.params:,}", f"{100 * r.params_frac:.1f}",
                                    f"{r.flops_per_token:,}", f"{100 * r.flops_frac:.1f}", f"{r.rel_error:.4f}",
                                    f"{r.fit_seconds:.2f}", f"{r.forward_vs_dense:.2f}x") for r in rows], left=2)


def rows_as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
