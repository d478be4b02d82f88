"""Sparse structures with a fixed support: NMSparse (n of every m consecutive inputs per row) and
FixedSparse (any support of a given density). Only the nonzero values are parameters; the support is an
index buffer. Projection: keep the largest magnitudes (top-n per group, top-k overall), which is the
Frobenius-optimal member because each kept entry can equal W exactly and dropped ones cost |w|^2.
The references rebuild a few rows of the weight at a time (never the whole dense matrix); N:M at few tokens runs
the decode kernel, which reads the values and the packed in-group positions once (kernels/decode.py).
N:M stores each kept value's position inside its group in as few bits as m needs (2 for m <= 4, 4 for m <= 16,
else 8), packed into uint8 from the low bits up: 2:4 keeps 2 + 0.25 bytes per two bf16 values, 56% of dense's bytes
(one byte per position was 75%, which capped its decode at 1.33x dense). A group's positions increase (a 2:4
group's two are then one of the six codes the sparse tensor cores accept; checkpoints are put in that order on
load).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (StructuredLinear, StructureConfig, check_divides, check_fraction, check_int, register, round_up,
                   run_op)


@dataclass(frozen=True)
class NMSparseConfig(StructureConfig):
    name = "nm"
    n: int
    m: int
    pad: bool = False

    def __post_init__(self) -> None:
        check_int(self.name, "n", self.n)
        check_int(self.name, "m", self.m, minimum=2)
        if self.n >= self.m:
            raise ValueError(f"nm: n={self.n} must be < m={self.m} (n = m would be dense)")
        if self.m > 256:
            raise ValueError(f"nm: m={self.m} exceeds 256 (in-group positions are stored as uint8); use m <= 256")


@dataclass(frozen=True)
class FixedSparseConfig(StructureConfig):
    name = "sparse"
    density: float

    def __post_init__(self) -> None:
        check_fraction(self.name, "density", self.density)


#: The references rebuild the weight a block of rows at a time, never more than this many dense elements at once:
#: a sparse layer holds only its values and support, also while it runs (no dense copy of the whole weight).
DENSE_TILE_ELEMENTS = 1 << 20
#: With many tokens a tile may grow (thin tiles make thin GEMMs: 2:4 prefill at 4x2048 tokens ran at 0.43x dense on
#: the H200 with 1M-element tiles) up to this fraction of the weight, and never past half the call's output elements,
#: so the transient tile stays smaller than the activation the call allocates anyway.
TILE_WEIGHT_FRACTION = 0.25


def _row_blocks(out_features: int, in_features: int, tokens: int = 1):
    grown = min(int(out_features * in_features * TILE_WEIGHT_FRACTION), tokens * out_features // 2)
    rows = max(1, max(DENSE_TILE_ELEMENTS, grown) // max(1, in_features))
    return [(lo, min(out_features, lo + rows)) for lo in range(0, out_features, rows)]


def position_bits(m: int) -> int:
    """Bits that store one in-group position of an N:M layer with groups of m (a power of two dividing 8)."""
    return 2 if m <= 4 else 4 if m <= 16 else 8


def packed_width(count: int, bits: int) -> int:
    """Bytes per row holding ``count`` positions of ``bits`` bits."""
    return -(-count * bits // 8)


def pack_positions(positions: Tensor, bits: int) -> Tensor:
    """(rows, count) positions (each < 2**bits) -> (rows, packed_width) uint8, position j at bits
    (j % (8 // bits)) * bits of byte j // (8 // bits)."""
    if bits == 8:
        return positions.to(torch.uint8)
    per = 8 // bits
    rows, count = positions.shape
    padded = F.pad(positions.to(torch.int32), (0, packed_width(count, bits) * per - count))
    shifts = torch.arange(per, device=positions.device, dtype=torch.int32) * bits
    return (padded.reshape(rows, -1, per) << shifts).sum(dim=-1).to(torch.uint8)


def unpack_positions(packed: Tensor, count: int, bits: int) -> Tensor:
    """The inverse of :func:`pack_positions`: (rows, count) uint8 positions."""
    if bits == 8:
        return packed[:, :count]
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    pos = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return pos.reshape(packed.shape[0], -1)[:, :count].to(torch.uint8)


def nm_multiply(x: Tensor, values: Tensor, positions: Tensor, n: int, m: int, expand=None) -> Tensor:
    """Reference N:M product: x (N, in) -> (N, out) for row r keeping values[r, g*n + i] at column
    g*m + p[r, g*n + i] of the input padded to a multiple of m, p the positions unpacked from ``positions``
    (:func:`pack_positions` with :func:`position_bits` of m). The weight is rebuilt a tile of rows at a time;
    ``expand(values_rows, positions_rows, n, m)``, if given, builds a tile (a kernel's: ``structmat.kernels.ops.nm``)."""
    out_features, kept = values.shape
    in_padded = kept // n * m
    bits = position_bits(m)
    xp = x if x.shape[1] == in_padded else F.pad(x, (0, in_padded - x.shape[1]))
    group_start = None

    def tile(lo: int, hi: int) -> Tensor:
        nonlocal group_start
        if expand is not None:
            return expand(values[lo:hi], positions[lo:hi], n, m)
        if group_start is None:  # (column indices per tile: int64 is 8 B each)
            group_start = (torch.arange(kept, device=values.device) // n * m).unsqueeze(0)
        cols = unpack_positions(positions[lo:hi], kept, bits).long() + group_start
        return values.new_zeros(hi - lo, in_padded).scatter(1, cols, values[lo:hi])

    return _tiled_product(xp, values, out_features, _row_blocks(out_features, in_padded, x.shape[0]), tile)


def _tiled_product(x: Tensor, values: Tensor, out_features: int, blocks: list, tile) -> Tensor:
    """``x @ W^T`` for W rebuilt a block of rows at a time, ``tile(lo, hi)`` the rows [lo, hi). Without autograd
    (inference) each block's GEMM writes straight into its columns of the output (a strided ``out=``: no ``cat``,
    which copies the whole output once more: 2:4 prefill, session 21); with it, or while tracing, the blocks are
    concatenated."""
    if len(blocks) == 1:
        return F.linear(x, tile(*blocks[0]).to(x.dtype))
    device = x.device.type  # (autocast does not apply to out= calls; the meta device has no autocast to ask)
    if (torch.is_grad_enabled() and (x.requires_grad or values.requires_grad)) or torch.compiler.is_compiling() \
            or (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return torch.cat([F.linear(x, tile(lo, hi).to(x.dtype)) for lo, hi in blocks], dim=1)
    y = x.new_empty(x.shape[0], out_features)
    for lo, hi in blocks:
        torch.mm(x, tile(lo, hi).to(x.dtype).t(), out=y[:, lo:hi])
    return y


def sparse_multiply(x: Tensor, values: Tensor, index: Tensor, out_features: int) -> Tensor:
    """Reference fixed-support product: x (N, in) -> (N, out) for W.flatten()[index] = values. Each block of rows is
    rebuilt from every value, those of other rows added into one spare slot past the block: no shape depends on the
    support, so a forward never waits on the GPU (a boolean mask did, once per block), can be captured in a CUDA
    graph or traced whole, and runs on the meta device."""
    in_features = x.shape[1]

    def tile(lo: int, hi: int) -> Tensor:
        size = (hi - lo) * in_features
        local = index - lo * in_features
        slot = torch.where((local >= 0) & (local < size), local, size)
        return values.new_zeros(size + 1).scatter_add(0, slot, values)[:size].view(hi - lo, in_features)

    return _tiled_product(x, values, out_features, _row_blocks(out_features, in_features, x.shape[0]), tile)


def nnz_for(density: float, in_features: int, out_features: int) -> int:
    return max(1, round(density * in_features * out_features))


class _SparseBase(StructuredLinear):
    """Shared by sparse structures: values + index buffer, draw support in init_."""

    def init_(self, generator: torch.Generator | None = None):
        with torch.no_grad():
            if self.index.device.type != "meta":
                self.index.copy_(self._random_support(generator))
        return super().init_(generator)

    def _check_state(self) -> None:
        self._check_index()

    def _check_index(self) -> None:
        """Validate the index buffer of a loaded state (range, duplicates, pattern): a bad index would fail at the
        first forward or, worse, compute another matrix. The one place that knows how indices are stored."""
        raise NotImplementedError

    def _index_error(self, problem: str) -> ValueError:
        return ValueError(f"{self._label()} {self.spec}: the sparse index buffer {problem}; the weights are corrupt, "
                          "save the model again")

    def _check_index_tensor(self, shape: tuple[int, ...]) -> Tensor:
        index = self.index
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise self._index_error(f"has dtype {index.dtype}, expected an integer dtype")
        if tuple(index.shape) != shape:
            raise self._index_error(f"has shape {tuple(index.shape)}, expected {shape}")
        return index.to(torch.long)


@register
class NMSparse(_SparseBase):
    name = "nm"
    Config = NMSparseConfig
    scaled_by = ("values",)

    def __init__(self, in_features: int, out_features: int, n: int, m: int, pad: bool = False, bias: bool = True, *,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        NMSparseConfig(n, m, pad)
        self.n, self.m, self.pad = n, m, bool(pad)
        if m > in_features:  # bounded padding: the group may not exceed the input it pads
            raise ValueError(f"{self._label()}: m={m} exceeds in_features={in_features}, so padding would dominate "
                             f"the layer; use m <= {in_features}")
        if not pad:
            check_divides(self._label(), "m", m, {"in_features": in_features}, pad_ok=True)
        self.in_padded = round_up(in_features, m)
        self.groups = self.in_padded // m
        self._check_smaller_than_dense(out_features * self.groups * n, "use a smaller n/m")
        self.kept = self.groups * n
        self.bits = position_bits(m)
        self.values = nn.Parameter(torch.empty(out_features, self.kept, device=device, dtype=dtype))
        # The support as each value's position inside its group of m inputs (0..m-1), packed `bits` to a position
        # (pack_positions): what the decode kernel reads; the column is group * m + position (absolute_index()).
        self.register_buffer("index", torch.zeros(out_features, packed_width(self.kept, self.bits), device=device,
                                                  dtype=torch.uint8))
        self.init_()

    @classmethod
    def config_for_ratio(cls, in_features, out_features, ratio, m=4, pad=False, **fixed):
        if fixed:
            raise ValueError(f"nm: ratio= takes only m and pad besides, got {sorted(fixed)}")
        n = min(max(1, round(ratio * m)), m - 1)
        return NMSparseConfig(n=n, m=m, pad=bool(pad))

    @classmethod
    def size_ladder(cls, in_features, out_features, sizes=4, m=4, pad=False, **fixed):
        """Every n:m with n < m (1:4, 2:4, 3:4 by default)."""
        if fixed:
            raise ValueError(f"nm: the size ladder takes only m and pad, got {sorted(fixed)}")
        return [NMSparseConfig(n=n, m=m, pad=bool(pad)) for n in range(1, m)]

    def _random_support(self, generator):
        scores = torch.rand(self.out_features, self.groups, self.m, generator=generator, device=self.index.device)
        return self._group_top(scores)

    def _group_top(self, scores: Tensor) -> Tensor:
        """Packed in-group positions of the n largest scores in each group of m, sorted."""
        top = scores.topk(self.n, dim=-1).indices.sort(dim=-1).values.reshape(self.out_features, -1)
        return pack_positions(top, self.bits)

    def _group_offsets(self, device) -> Tensor:
        return (torch.arange(self.kept, device=device) // self.n * self.m).unsqueeze(0)

    def positions(self) -> Tensor:
        """The in-group positions (uint8, (out, groups*n)), unpacked from the index buffer."""
        return unpack_positions(self.index, self.kept, self.bits)

    def absolute_index(self) -> Tensor:
        """The kept columns (int64, (out, groups*n)) of the padded input: group * m + position."""
        return self.positions().long() + self._group_offsets(self.index.device)

    def set_support_(self, columns: Tensor) -> None:
        """Store a support given as absolute columns of the padded input (n per group of m, increasing within each
        group: the order the sparse tensor cores read), after checking it."""
        positions = self._positions_from_columns(columns)
        if self._out_of_order(positions):
            raise self._index_error("lists a group's columns out of order; give each group's columns in increasing "
                                    "order (sort them, and the values with them)")
        self.index.copy_(pack_positions(positions, self.bits))

    def set_positions_(self, positions: Tensor) -> None:
        """Store a support given as in-group positions (out, groups*n), after checking it."""
        self.set_support_(positions.long() + self._group_offsets(positions.device))

    def _packed_from_columns(self, columns: Tensor) -> Tensor:
        """Absolute columns (n per group of m) -> the packed in-group positions the index buffer holds, checked
        before packing (packing keeps only the low bits)."""
        return pack_positions(self._positions_from_columns(columns), self.bits)

    def _positions_from_columns(self, columns: Tensor) -> Tensor:
        """Absolute int64 columns (the oldest storage) -> validated uint8 in-group positions (one per kept value)."""
        if columns.dtype.is_floating_point or columns.dtype.is_complex or columns.dtype == torch.bool:
            raise self._index_error(f"has dtype {columns.dtype}, expected an integer dtype")
        if tuple(columns.shape) != (self.out_features, self.kept):
            raise self._index_error(f"has shape {tuple(columns.shape)}, expected {(self.out_features, self.kept)}")
        pos = columns.long() - self._group_offsets(columns.device)
        if bool(((pos < 0) | (pos >= self.m)).any()):
            raise self._index_error(f"breaks the {self.n}:{self.m} pattern (an index lies outside its group of "
                                    f"{self.m} columns, or outside 0..{self.in_padded - 1})")
        return pos.to(torch.uint8)

    def upgrade_state(self, state: dict, prefix: str) -> None:
        """Older checkpoints stored absolute int64 columns, then one uint8 position per kept value: convert to the
        packed positions (and check: packing keeps only the low bits, so a bad position must fail here)."""
        old = state.get(prefix + "index")
        if not isinstance(old, Tensor) or old.device.type == "meta":
            return
        if old.dtype == torch.int64:
            state[prefix + "index"] = self._packed_from_columns(old)
        elif old.dtype == torch.uint8 and self.bits < 8 and tuple(old.shape) == (self.out_features, self.kept):
            state[prefix + "index"] = self._packed_from_columns(old.long() + self._group_offsets(old.device))
        self._order_state(state, prefix)

    def _out_of_order(self, positions: Tensor) -> bool:
        """Whether some group lists its positions out of increasing order ((out, kept) positions)."""
        grouped = positions.reshape(positions.shape[0], -1, self.n).to(torch.int16)
        return self.n > 1 and bool((grouped.diff(dim=-1) < 0).any())

    def _order_state(self, state: dict, prefix: str) -> None:
        """Positions are kept increasing within each group (2:4's sparse tensor-core metadata is documented valid only
        in that order; other orders computed right on the H200, session 16, but nothing promises it); a checkpoint
        written before that rule may list them otherwise: sort each group's positions and its values with them (the
        same matrix). Left as it is where the state lacks the values (the check then names it)."""
        index, values = state.get(prefix + "index"), state.get(prefix + "values")
        shape = (self.out_features, packed_width(self.kept, self.bits))
        if not (isinstance(index, Tensor) and isinstance(values, Tensor) and index.dtype == torch.uint8
                and tuple(index.shape) == shape and tuple(values.shape) == (self.out_features, self.kept)):
            return
        positions = unpack_positions(index, self.kept, self.bits)
        if not self._out_of_order(positions):
            return
        grouped = positions.reshape(self.out_features, self.groups, self.n).long()
        order = grouped.argsort(dim=-1, stable=True)
        state[prefix + "index"] = pack_positions(grouped.gather(-1, order).reshape(self.out_features, -1), self.bits)
        state[prefix + "values"] = values.reshape(self.out_features, self.groups, self.n).gather(
            -1, order.to(values.device)).reshape(self.out_features, self.kept)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.upgrade_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_index(self) -> None:
        if self.index.device.type == "meta":
            return
        if self.index.dtype != torch.uint8:
            raise self._index_error(f"has dtype {self.index.dtype}, expected torch.uint8 (packed in-group positions)")
        self._check_index_tensor((self.out_features, packed_width(self.kept, self.bits)))
        pos = self.positions().long()
        if bool((pos >= self.m).any()):
            raise self._index_error(f"breaks the {self.n}:{self.m} pattern (a position lies outside 0..{self.m - 1})")
        group = pos.reshape(self.out_features, self.groups, self.n)
        if self.n > 1 and bool((group.sort(dim=-1).values.diff(dim=-1) == 0).any()):
            raise self._index_error("repeats a column within a group")
        if self._out_of_order(pos):
            raise self._index_error("lists a group's positions out of increasing order (a state loaded without its "
                                    "values, or written by hand)")

    def to_dense(self) -> Tensor:
        dense = self.values.new_zeros(self.out_features, self.in_padded).scatter(1, self.absolute_index(), self.values)
        return dense[:, : self.in_features]

    def _matmul(self, x: Tensor) -> Tensor:
        return run_op("nm", nm_multiply, x, self.values, self.index, self.n, self.m, plans=self._plans)

    def _project_(self, weight: Tensor) -> None:
        padded = F.pad(weight, (0, self.in_padded - self.in_features))
        self.index.copy_(self._group_top(padded.abs().reshape(self.out_features, self.groups, self.m)))  # (packed)
        self.values.copy_(padded.gather(1, self.absolute_index()))

    def _weight_flops(self, tokens: int) -> int:
        return 2 * tokens * self.values.numel()

    def _factors(self) -> dict[str, tuple[float, float]]:
        density = self.n / self.m
        return {"values": (self.in_padded * density, self.out_features * density)}


@register
class FixedSparse(_SparseBase):
    name = "sparse"
    Config = FixedSparseConfig
    scaled_by = ("values",)

    def __init__(self, in_features: int, out_features: int, density: float, bias: bool = True, *,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        FixedSparseConfig(density)
        self.density = float(density)
        nnz = nnz_for(density, in_features, out_features)
        self._check_smaller_than_dense(nnz, "use density < 1 - 1/(in*out)")
        self.values = nn.Parameter(torch.empty(nnz, device=device, dtype=dtype))
        self.register_buffer("index", torch.zeros(nnz, device=device, dtype=torch.long))
        self.init_()

    @classmethod
    def config_for_ratio(cls, in_features, out_features, ratio, **fixed):
        if fixed:
            raise ValueError(f"sparse: ratio= takes no other keys, got {sorted(fixed)}")
        return FixedSparseConfig(density=ratio)

    def _random_support(self, generator):
        size = self.in_features * self.out_features
        perm = torch.randperm(size, generator=generator, device=self.index.device)
        return perm[: self.values.numel()].sort().values

    def _check_index(self) -> None:
        if self.index.device.type == "meta":
            return
        index = self._check_index_tensor(tuple(self.values.shape))
        size = self.in_features * self.out_features
        if index.numel() and bool(((index < 0) | (index >= size)).any()):
            raise self._index_error(f"has entries outside 0..{size - 1}")
        if index.numel() > 1 and bool((index.sort().values.diff() == 0).any()):
            raise self._index_error("repeats a position")

    def to_dense(self) -> Tensor:
        flat = self.values.new_zeros(self.out_features * self.in_features).scatter(0, self.index, self.values)
        return flat.reshape(self.out_features, self.in_features)

    def _matmul(self, x: Tensor) -> Tensor:
        return sparse_multiply(x, self.values, self.index, self.out_features)

    def _project_(self, weight: Tensor) -> None:
        flat = weight.reshape(-1)
        # argsort beats topk when nnz is a large fraction of the matrix
        self.index.copy_(torch.argsort(flat.abs(), descending=True)[: self.values.numel()].sort().values)
        self.values.copy_(flat[self.index])

    def _weight_flops(self, tokens: int) -> int:
        return 2 * tokens * self.values.numel()

    def _factors(self) -> dict[str, tuple[float, float]]:
        nnz = self.values.numel()
        return {"values": (nnz / self.out_features, nnz / self.in_features)}
