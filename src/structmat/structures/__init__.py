"""One file per structure; importing this package fills the registry. ``build`` and ``from_dense`` are the
two entry points: a spec (string, config or budget form) plus a shape gives a layer."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from .base import (REGISTRY, RatioSpec, StructuredLinear, StructureConfig, check_dense_weight, config_from_dict,
                   parse_spec, resolve_spec, structure_class)
from .blockdiag import BlockDiagonal, BlockDiagonalConfig
from .dense import Dense, DenseConfig
from .kronecker import KroneckerSum, KroneckerSumConfig
from .ldu import LowRankLDU, LowRankLDUConfig
from .lowrank import LowRank, LowRankConfig
from .monarch import Monarch, MonarchConfig
from .product import Product, ProductConfig
from .randbasis import RandomBasis, RandomBasisConfig
from .selected import SelectedColumns, SelectedColumnsConfig, SelectedRows, SelectedRowsConfig
from .sparse import FixedSparse, FixedSparseConfig, NMSparse, NMSparseConfig
from .sparse_lowrank import SparsePlusLowRank, SparsePlusLowRankConfig


def build(spec: str | StructureConfig | RatioSpec, in_features: int, out_features: int, bias: bool = True, *,
          device=None, dtype=None) -> StructuredLinear:
    """A freshly initialized (muP-style) structured layer, e.g. ``build("monarch:nblocks=4", 768, 3072)``."""
    config = resolve_spec(spec, in_features, out_features)
    return structure_class(config.name).from_config(config, in_features, out_features, bias=bias, device=device,
                                                    dtype=dtype)


def from_dense(weight: Tensor, spec: str | StructureConfig | RatioSpec, bias: Tensor | None = None) -> StructuredLinear:
    """The projection of a dense ``(out, in)`` weight onto the structure named by ``spec``."""
    weight = check_dense_weight(weight, "structmat", bias)
    config = resolve_spec(spec, weight.shape[1], weight.shape[0])
    args: dict[str, Any] = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return structure_class(config.name).from_dense(weight, bias, **args)


__all__ = [
    "REGISTRY", "RatioSpec", "StructuredLinear", "StructureConfig", "build", "from_dense", "parse_spec",
    "resolve_spec", "config_from_dict", "structure_class",
    "Dense", "LowRank", "BlockDiagonal", "Monarch", "KroneckerSum", "NMSparse", "FixedSparse", "SparsePlusLowRank",
    "Product", "RandomBasis", "LowRankLDU", "SelectedRows", "SelectedColumns",
    "DenseConfig", "LowRankConfig", "BlockDiagonalConfig", "MonarchConfig", "KroneckerSumConfig", "NMSparseConfig",
    "FixedSparseConfig", "SparsePlusLowRankConfig", "ProductConfig",
    "RandomBasisConfig", "LowRankLDUConfig", "SelectedRowsConfig", "SelectedColumnsConfig",
]
