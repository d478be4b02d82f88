"""The StructuredLinear contract, the structure registry and spec parsing.

Every structure subclasses :class:`StructuredLinear` and supplies only its own math:
``_matmul`` (the weight applied to a 2-D batch), ``to_dense``, ``_project_`` (fill the
parameters from a dense weight), ``flops`` and ``_factors`` (fan-in/fan-out of each weight
factor, from which muP-style ``init_`` and ``param_groups`` are derived here, once).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validate import check_features, check_finite, check_int, divisors

# entries per float64 chunk of relative_error (8 MB): the report's weight error never copies a whole weight
RELATIVE_ERROR_CHUNK = 1 << 20

REGISTRY: dict[str, type["StructuredLinear"]] = {}


def register(cls: type["StructuredLinear"]) -> type["StructuredLinear"]:
    """Class decorator: make a structure reachable by name from specs and plans."""
    if cls.name in REGISTRY:
        raise ValueError(f"structure name {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def structure_class(name: str) -> type["StructuredLinear"]:
    """Look a structure up by name; the registry is the allow-list."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown structure {name!r}; valid structures: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StructureConfig:
    """Base of the per-structure frozen configs. Subclasses validate in ``__post_init__``."""

    name: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"structure": self.name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple) and value and isinstance(value[0], StructureConfig):
                value = [v.to_dict() for v in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @property
    def spec(self) -> str:
        """The string form, e.g. ``monarch:nblocks=4,rank=2`` (fields at their default are omitted)."""
        args = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or (f.default is not dataclasses.MISSING and value == f.default):
                continue
            if isinstance(value, tuple):
                value = "x".join(str(v) for v in value)
            args.append(f"{f.name}={value}")
        return f"{self.name}:{','.join(args)}" if args else self.name

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> "StructureConfig":
        """A config from spec-string or JSON values, converted to the declared field types."""
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(
                f"{cls.name}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(names + ['ratio'])}"
            )
        converted = {k: _convert(cls.name, k, v, hints[k]) for k, v in values.items()}
        try:
            return cls(**converted)
        except TypeError as err:  # missing required field
            required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
            raise ValueError(f"{cls.name}: {err}; required keys: {', '.join(required)} (or ratio=)") from None


def config_from_dict(data: dict[str, Any]) -> StructureConfig:
    """Inverse of ``StructureConfig.to_dict``; types are resolved through the registry only."""
    if not isinstance(data, dict) or "structure" not in data:
        raise ValueError(f"a structure config must be a dict with a 'structure' key, got {data!r}")
    data = dict(data)
    cls = structure_class(data.pop("structure"))
    return cls.Config.from_values(data)


def check_fraction(owner: str, key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {key} must be a number, got {value!r}")
    if not (0.0 < float(value) < 1.0):  # also refuses NaN and +-Inf
        raise ValueError(f"{owner}: {key} must lie strictly between 0 and 1, got {value}")


def _convert(owner: str, key: str, raw: Any, hint: Any) -> Any:
    """Convert a spec-string or JSON value to the config field's declared type."""
    text = raw.strip() if isinstance(raw, str) else raw
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if type(None) in args:  # Optional[X]
        if text is None or text == "None":
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if hint is bool:
            if isinstance(text, bool):
                return text
            if str(text).lower() in ("true", "1", "yes"):
                return True
            if str(text).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(text, float) and not text.is_integer():
                raise ValueError
            return int(text) if not isinstance(text, str) else int(text, 10)
        if hint is float:
            return float(text)
        if origin is tuple and args and args[0] is int:
            parts = text.split("x") if isinstance(text, str) else list(text)
            return tuple(int(p) for p in parts)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise ValueError(f"{owner}: cannot read {key}={raw!r} as {getattr(hint, '__name__', hint)}") from None
    return text




@dataclass(frozen=True)
class RatioSpec:
    """The budget form ``<structure>:ratio=0.5``: the size is chosen once the shape is known."""

    structure: str
    ratio: float
    fixed: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        structure_class(self.structure)
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not (0 < self.ratio < 1):
            raise ValueError(f"{self.structure}: ratio must lie strictly between 0 and 1, got {self.ratio!r}")

    def resolve(self, in_features: int, out_features: int) -> StructureConfig:
        cls = structure_class(self.structure)
        check_features(self.structure, "in_features", in_features)
        check_features(self.structure, "out_features", out_features)
        return cls.config_for_ratio(in_features, out_features, float(self.ratio), **dict(self.fixed))


def parse_spec(spec: str | StructureConfig | RatioSpec) -> StructureConfig | RatioSpec:
    """Parse ``name:key=value,...``; ``a * b * c`` is a Product of the factors in that order."""
    if isinstance(spec, (StructureConfig, RatioSpec)):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a structure spec must be a string or a config object, got {type(spec).__name__}")
    if "*" in spec:
        factors = tuple(parse_spec(part) for part in spec.split("*"))
        if any(isinstance(f, RatioSpec) for f in factors):
            raise ValueError(f"product {spec!r}: give each factor's size; ratio= is not supported inside a product")
        return structure_class("product").Config(factors=factors)
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    cls = structure_class(name)
    values: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"{name}: cannot read {item!r} in spec {spec!r}; write key=value")
        values[key.strip()] = value.strip()
    if "ratio" in values:
        ratio = _convert(name, "ratio", values.pop("ratio"), float)
        hints = typing.get_type_hints(cls.Config)
        names = [f.name for f in dataclasses.fields(cls.Config)]
        for key in values:
            if key not in names:
                raise ValueError(f"{name}: unknown key {key!r}; valid keys: {', '.join(names + ['ratio'])}")
        fixed = tuple((k, _convert(name, k, v, hints[k])) for k, v in values.items())
        return RatioSpec(name, ratio, fixed)
    return cls.Config.from_values(values)


def resolve_spec(spec: str | StructureConfig | RatioSpec, in_features: int, out_features: int) -> StructureConfig:
    parsed = parse_spec(spec)
    if isinstance(parsed, RatioSpec):
        return parsed.resolve(in_features, out_features)
    return parsed


# ----------------------------------------------------------------------------------------------
# Fast paths. kernels/ registers implementations here, so structures never import kernels (the data flow
# runs structures -> kernels). A fast path returns None when it does not apply to these inputs (device,
# dtype, shape, the user's forced backend); the pure-PyTorch reference is the fallback and the definition.
# ----------------------------------------------------------------------------------------------

FAST_PATHS: dict[str, list[Callable[..., Tensor | None]]] = {}
#: Per-shape inference plans: ``PLANNERS[op](reference, *args)`` returns a callable ``(*args) -> Tensor`` that runs
#: the backend the dispatch chose for these shapes (the reference itself where that is the choice), or None where the
#: choice must be made on every call. Registered by kernels/ next to the fast paths.
PLANNERS: dict[str, Callable[..., Callable[..., Tensor] | None]] = {}
#: Bumped whenever a cached plan may no longer hold (a backend forced or restored, the cost constants changed).
PLAN_EPOCH = [0]
MAX_PLANS = 64  # per layer: decode lengths 1..64 at one batch shape, without growing without bound
#: ``EAGER_FORM[0](layer, x)``: the layer's whole eager call for inputs like ``x`` (``x -> y``, its factors read from
#: the layer on each call) where its plan for them is a decode kernel's, else None. Registered by kernels/.
EAGER_FORM: list[Callable[..., Callable[[Tensor], Tensor] | None] | None] = [None]


def register_fast_path(op: str, fn: Callable[..., Tensor | None]) -> None:
    FAST_PATHS.setdefault(op, []).append(fn)


def plan_key(x: Tensor, *tag) -> tuple:
    """What a cached inference plan for input ``x`` depends on: shape, dtype, device, the plan epoch, autocast, and
    on a GPU the stream: True while a CUDA graph is captured (there only GPU time counts: such calls have plans of
    their own), else the current stream (an eager plan keeps scratch and counters for the stream it runs on, so two
    streams never share them); ``tag`` tells apart plans of other kinds for the same input."""
    return (x.shape, x.dtype, x.device, PLAN_EPOCH[0], torch.is_autocast_enabled(),
            x.is_cuda and (torch.cuda.is_current_stream_capturing()
                           or torch._C._cuda_getCurrentRawStream(x.get_device())), *tag)


def invalidate_plans() -> None:
    """Every layer's cached plans stop applying (they are rebuilt on the next call)."""
    PLAN_EPOCH[0] += 1


def run_op(op: str, reference: Callable[..., Tensor], *args: Tensor, plans: dict | None = None) -> Tensor:
    """``reference(*args)`` or a fast path for it. ``plans``: the calling layer's cache of per-shape plans. With
    gradients off (inference, where few-token calls are host-bound), the dispatch decision for these shapes and
    dtypes is made once and replayed: no validation, cost model or decision lookup on the next calls."""
    if plans is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        key = plan_key(args[0])
        fn = plans.get(key)
        if fn is None and op in PLANNERS:
            fn = PLANNERS[op](reference, *args)
            if fn is not None and len(plans) < MAX_PLANS:
                plans[key] = fn
        if fn is not None:
            return fn(*args)
    for fn in FAST_PATHS.get(op, ()):
        out = fn(*args)
        if out is not None:
            return out
    return reference(*args)


# ----------------------------------------------------------------------------------------------
# Shared numerics helpers
# ----------------------------------------------------------------------------------------------


def mup_std(fan_in: float, fan_out: float) -> float:
    """muP-style init std of one factor: fan_in^-1/2 * min(1, sqrt(fan_out / fan_in))."""
    return fan_in**-0.5 * min(1.0, math.sqrt(fan_out / fan_in))


def work_dtype(t: Tensor) -> torch.dtype:
    """Projections run in float64 for float64 input and float32 otherwise (never bf16)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def round_down8(n: int) -> int:
    """Round a size down to a multiple of 8 (tensor-core friendly) when that costs at most 5% of it."""
    down = n - n % 8
    return down if down >= 8 and n - down <= 0.05 * n else n


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def check_divides(owner: str, key: str, value: int, sizes: dict[str, int], pad_ok: bool) -> None:
    """Raise naming the valid choices when ``value`` does not divide every size."""
    bad = {k: s for k, s in sizes.items() if s % value}
    if not bad:
        return
    common = sorted(set.intersection(*(set(divisors(s)) for s in sizes.values())) - {1})
    sizes_text = ", ".join(f"{k}={s}" for k, s in bad.items())
    hint = " or pass pad=True (padding is counted in params and FLOPs)" if pad_ok else ""
    raise ValueError(f"{owner}: {key}={value} does not divide {sizes_text}; valid {key}: {common}{hint}")


def truncated_svd(blocks: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Batched rank-``rank`` SVD split symmetrically: returns (left, right, discarded sq. sigma)."""
    u, s, vh = torch.linalg.svd(blocks, full_matrices=False)
    root = s[..., :rank].sqrt()
    left = u[..., :rank] * root.unsqueeze(-2)
    right = root.unsqueeze(-1) * vh[..., :rank, :]
    return left, right, (s[..., rank:] ** 2).sum()


# ----------------------------------------------------------------------------------------------
# The contract
# ----------------------------------------------------------------------------------------------


#: Name of the non-persistent buffer that ``structmat.merge_for_inference`` adds (see ``inference.py``).
MERGED_WEIGHT = "merged_weight"


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # (a device type autocast does not know, e.g. meta: never on)
        return False


class StructuredLinear(nn.Module):
    """A linear map ``(..., in_features) -> (..., out_features)`` whose weight has a structure."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[StructureConfig]] = StructureConfig
    # Parameters whose product is the weight, each a plain multiplicative factor (W(c * p) = c * W(p)), so that
    # from_dense can fit max|W| ~ 1 and scale back exactly; empty: project the weight as given.
    scaled_by: ClassVar[tuple[str, ...]] = ()
    # The factor(s) nearest the output: zeroing them makes the weight zero while gradients still reach them (the
    # zero start of an adapter, LoRA's B = 0). None: the structure has one factor, zeroed as a whole.
    zero_factors: ClassVar[tuple[str, ...] | None] = None

    _plans: dict | None = None  # per-shape inference plans (run_op); None until __init__, or for a stripped copy
    _sibling_group: tuple | None = None  # (SiblingGroup, index) while fused with its siblings (structmat.siblings)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None, dtype=None) -> None:
        super().__init__()
        self._plans = {}
        check_features(self.name, "in_features", in_features)
        check_features(self.name, "out_features", out_features)
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    # --- what a structure implements --------------------------------------------------------
    def _matmul(self, x: Tensor) -> Tensor:
        """Apply the weight (no bias) to a 2-D batch ``(tokens, in_features)``."""
        raise NotImplementedError

    def to_dense(self) -> Tensor:
        """The weight as a dense ``(out_features, in_features)`` tensor (differentiable)."""
        raise NotImplementedError

    def _project_(self, weight: Tensor) -> None:
        """Fill the parameters with the projection of ``weight`` (called under no_grad)."""
        raise NotImplementedError

    def _weight_flops(self, tokens: int) -> int:
        """FLOPs (2 x multiply-adds) of applying the weight to ``tokens`` rows."""
        raise NotImplementedError

    def _factors(self) -> dict[str, tuple[float, float]]:
        """Each weight factor's parameter name -> (fan_in, fan_out) it acts with."""
        raise NotImplementedError

    @classmethod
    def config_for_ratio(cls, in_features: int, out_features: int, ratio: float, **fixed: Any) -> StructureConfig:
        """The config whose weight has about ``ratio`` of the dense parameters."""
        raise ValueError(f"{cls.name}: the budget form ratio= is not supported; give the size explicitly")

    @classmethod
    def size_ladder(cls, in_features: int, out_features: int, sizes: int = 4, **fixed: Any) -> list[StructureConfig]:
        """The sizes the budget solver may choose from for an ``out x in`` layer, smallest first: by default the
        configs for ``sizes`` evenly spaced parameter ratios. Sizes that do not fit the shape are left out."""
        found: dict[StructureConfig, None] = {}
        for k in range(sizes):
            try:
                found[cls.config_for_ratio(in_features, out_features, (k + 1) / (sizes + 1), **fixed)] = None
            except ValueError:
                continue
        return list(found)

    # --- what the base supplies ---------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        # (few-token decode pays this per layer and token: dict lookups instead of nn.Module attribute fallbacks,
        # no reshape of an input that is already 2-D)
        plans = self._plans
        key = None
        if plans is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # eager inference: a layer whose plan for this input is a decode kernel's runs it in one call from
            # here, on the input as it comes (no reshapes; a contiguous input: its rows are evenly spaced)
            key = plan_key(x, "layer")
            eager = plans.get(key)  # (a call, False where there is none, None where not yet asked)
            if eager and x.is_contiguous():
                y = eager(x)  # (None: declined this call, e.g. a fused member whose group split; the path below)
                if y is not None:
                    return y
            if eager is not None:  # (decided: a non-contiguous input takes the layer's path, deciding nothing)
                key = None
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self._label()}: input has last dimension {x.shape[-1]}, expected in_features={self.in_features}"
            )
        self._check_input_dtype(x)
        bias = self._parameters.get("bias")
        merged = self._buffers.get(MERGED_WEIGHT)
        if merged is not None and self._merged_usable(merged):
            return F.linear(x, merged.to(x.dtype), None if bias is None else bias.to(x.dtype))
        group = self._sibling_group
        y = None if group is None else group[0].output(self, group[1], x)  # (structmat.fuse_siblings; x's shape)
        if y is None:
            y = self._matmul(x if x.dim() == 2 else x.reshape(-1, self.in_features))
            if x.dim() != 2:
                y = y.reshape(*x.shape[:-1], self.out_features)
        elif group[0].bias is not None:  # (the group's product added its members' stacked biases)
            bias = None
        if bias is not None:
            y = y + bias.to(y.dtype)
        if key is not None and len(plans) < MAX_PLANS:  # (asked once per input shape: its plan exists now)
            form = EAGER_FORM[0]
            if group is not None:  # (a fused member: its slice of the group's product, as few calls as its own)
                plans[key] = (merged is None and x.is_contiguous() and group[0].eager_member(self, group[1], x)
                              ) or False
            else:
                plans[key] = (form is not None and merged is None and x.is_contiguous() and form(self, x)) or False
        return y

    def _check_input_dtype(self, x: Tensor) -> None:
        """An input in another dtype than the factors, outside autocast, is an error, as for nn.Linear (the sparse
        layers cast their values to it: an integer input gave integer garbage)."""
        bias = self._parameters.get("bias")
        # (a factor of this layer, else of a part: sums and products keep theirs in child layers)
        factor = next((p for n, p in self._parameters.items() if n != "bias" and p is not None), None)
        if factor is None:
            factor = next((p for p in self.parameters() if p is not bias), None)
        if factor is not None and x.dtype != factor.dtype and not _autocast_on(x.device.type):
            raise TypeError(f"{self._label()}: input dtype {x.dtype} differs from the layer's {factor.dtype}; cast the "
                            f"input (x.to({factor.dtype})) or the layer (layer.to({x.dtype})), or run it under "
                            "torch.autocast")

    def _merged_usable(self, merged: Tensor) -> bool:
        """Whether the copy made by ``structmat.merge_for_inference`` may serve this call: not when a factor needs a
        gradient (the copy is a snapshot, not differentiable in the factors: the factors' own path runs, same math);
        an error when a factor changed since the merge (the copy would silently compute an old weight)."""
        factors = [t for n, t in self.named_parameters() if n != "bias"]
        if torch.is_grad_enabled() and any(f.requires_grad for f in factors):
            return False
        if not torch.compiler.is_compiling() and self._merged_versions != tuple(f._version for f in factors):
            raise ValueError(f"{self._label()}: its factors changed after merge_for_inference; call "
                             "structmat.unmerge_for_inference(model) (or merge_for_inference again) first")
        return True

    # A plan holds shapes, strides and dtypes of the factors, never the factors themselves: anything that may change
    # those (a .to(), a load with assign=True, a factor replaced) drops the layer's plans.
    # The same events end a fusion with siblings (the stacked tensors would no longer be the layer's).
    def _apply(self, fn, recurse=True):
        if self._plans:
            self._plans.clear()
        self._leave_siblings()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        if self._plans:
            self._plans.clear()
        self._leave_siblings()
        return super()._load_from_state_dict(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, Tensor):
            if self._plans:
                self._plans.clear()
            self._leave_siblings()
        super().__setattr__(name, value)

    def _leave_siblings(self) -> None:
        group = self.__dict__.get("_sibling_group")
        if group is not None:
            group[0].dissolve()

    def __getstate__(self):
        state = {k: v for k, v in super().__getstate__().items() if k != "_sibling_group"}  # (a copy runs alone)
        return {**state, "_plans": {}}  # (plans are closures: rebuilt, never pickled)

    @property
    def config(self) -> StructureConfig:
        return self.Config(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self.Config)})

    @property
    def spec(self) -> str:
        return self.config.spec

    def _label(self) -> str:
        return f"{type(self).__name__}(in_features={self.in_features}, out_features={self.out_features})"

    @classmethod
    def from_config(cls, config: StructureConfig, in_features: int, out_features: int, bias: bool = True,
                    *, device=None, dtype=None) -> "StructuredLinear":
        if not isinstance(config, cls.Config):
            raise TypeError(f"{cls.name}: expected a {cls.Config.__name__}, got {type(config).__name__}")
        kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        return cls(in_features, out_features, bias=bias, device=device, dtype=dtype, **kwargs)

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, **structure_args: Any) -> "StructuredLinear":
        """The projection of a dense weight onto this structure (see each structure's ``_project_``)."""
        weight = check_dense_weight(weight, cls.name, bias)
        out_features, in_features = weight.shape
        if "ratio" in structure_args:
            ratio = structure_args.pop("ratio")
            config = RatioSpec(cls.name, ratio, tuple(structure_args.items())).resolve(in_features, out_features)
            structure_args = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        layer = cls(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype,
                    **structure_args)
        with torch.no_grad():
            exponent = _power_of_two_scale(weight)
            if exponent and layer._rescalable():  # fit max|W| ~ 1, then scale back exactly (subnormal and
                # near-fp16-max weights fit too)
                layer._project_((weight.to(torch.float64) * 2.0**-exponent).to(work_dtype(weight)))
                layer._rescale_(exponent)
            else:
                layer._project_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        for pname, p in layer.named_parameters():
            check_finite(f"{layer._label()}.from_dense", pname, p,
                         f"the projection leaves the range of {p.dtype}; project in float32 or bfloat16")
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, **structure_args: Any) -> "StructuredLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.name}.from_linear expects an nn.Linear, got {type(linear).__name__}")
        return cls.from_dense(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(),
                              **structure_args)

    def relative_error(self, weight: Tensor) -> float:
        """||W - to_dense()||_F / ||W||_F in float64, scale-free: both are divided by max|W| first, so the result
        is the same at 1e-300 and 1e300 scale (0 for W = 0 = to_dense(), inf for W = 0 != to_dense())."""
        weight = check_dense_weight(weight, f"{self.name}.relative_error", call="")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{self._label()}.relative_error: weight has shape {tuple(weight.shape)}, expected "
                             f"({self.out_features}, {self.in_features})")
        with torch.no_grad():
            dense = self.to_dense().detach().to(device=weight.device)
            scale = torch.linalg.vector_norm(weight, ord=float("inf")).to(torch.float64)
            if scale == 0:
                return 0.0 if not bool(dense.any()) else math.inf
            # float64 by chunks of rows (~2^20 entries): a 2048 x 8192 weight's float64 copies would otherwise be
            # five 134 MB matrices at once, more than its projection needs
            rows = max(1, RELATIVE_ERROR_CHUNK // max(1, weight.shape[1]))
            err, ref = scale.new_zeros(()), scale.new_zeros(())
            for r0 in range(0, weight.shape[0], rows):
                w = weight[r0:r0 + rows].to(torch.float64) / scale
                err += (w - dense[r0:r0 + rows].to(torch.float64) / scale).square().sum()
                ref += w.square().sum()
            return (err / ref).item() ** 0.5  # one host read

    def _rescalable(self) -> bool:
        return bool(self.scaled_by)

    def _rescale_(self, exponent: int) -> None:
        """Multiply the weight by ``2**exponent`` exactly (powers of two), the exponent split over ``scaled_by``."""
        for name, part in zip(self.scaled_by, split_exponent(exponent, len(self.scaled_by))):
            p = self.get_parameter(name)
            p.copy_(p.to(torch.float64) * 2.0**part)  # exact in float64; one rounding into p's dtype

    def check_state_(self) -> "StructuredLinear":
        """Check a state that came from outside (a loaded file): finite values, one floating dtype for the weight
        factors, and each structure's own invariants (``_check_state``). Raises ``ValueError`` naming the tensor."""
        dtypes = {p.dtype for p in self.parameters()}
        if len(dtypes) > 1:
            raise ValueError(f"{self._label()}: its parameters mix dtypes {sorted(map(str, dtypes))}; a layer's "
                             "factors must share one dtype (save them with one dtype, or load with dtype=)")
        for pname, p in self.named_parameters():
            check_finite(self._label(), pname, p, "the weights are corrupt; save the model again")
        self._check_state()
        return self

    def upgrade_state(self, state: dict, prefix: str) -> None:
        """Convert, in place, this layer's tensors in ``state`` (keys ``prefix + name``) that an older version saved in
        an older storage format (a structure that changed its storage overrides this)."""

    def _check_state(self) -> None:
        """Structure-specific invariants of a loaded state (index buffers); nothing to check by default."""

    def param_count(self) -> int:
        """Learnable numbers stored (bias included; sparse index buffers are not parameters)."""
        return sum(p.numel() for p in self.parameters())

    def flops(self, tokens: int) -> int:
        """FLOPs of this layer's own forward on ``tokens`` rows (2 per multiply-add, plus the bias add)."""
        check_int(self.name, "tokens", tokens, minimum=0)
        return self._weight_flops(tokens) + (tokens * self.out_features if self.bias is not None else 0)

    def init_(self, generator: torch.Generator | None = None) -> "StructuredLinear":
        """Fresh muP-style init: each factor ~ N(0, mup_std(fan_in, fan_out)^2); bias zero."""
        with torch.no_grad():
            for pname, (fan_in, fan_out) in self._factors().items():
                param = self.get_parameter(pname)
                if param.device.type == "meta":  # no values to draw (a size check, or a layer a projection fills);
                    continue                      # a meta normal_ runs torch's Python reference: ~1 ms per call
                param.normal_(0.0, mup_std(fan_in, fan_out), generator=generator)
            if self.bias is not None:
                self.bias.zero_()
        return self

    def zero_(self) -> "StructuredLinear":
        """Make the weight exactly zero, keeping a nonzero gradient path (see ``zero_factors``); bias zero too."""
        names = self.zero_factors
        if names is None:
            names = tuple(self._factors())
            if len(names) != 1:
                raise ValueError(f"{self.name}: a zero start needs zero_factors (the factors nearest the output); "
                                 f"this structure has several factors {names}")
        with torch.no_grad():
            for pname in names:
                self.get_parameter(pname).zero_()
            if self.bias is not None:
                self.bias.zero_()
        return self

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups with per-factor learning-rate multipliers (muP for Adam: lr ~ 1/fan_in,
        relative to a dense layer of the same shape, so ``lr_mult = in_features / fan_in``)."""
        groups = [
            {"name": pname, "params": [self.get_parameter(pname)], "lr_mult": self.in_features / fan_in}
            for pname, (fan_in, _) in self._factors().items()
        ]
        if self.bias is not None:
            groups.append({"name": "bias", "params": [self.bias], "lr_mult": 1.0, "weight_decay": 0.0})
        return groups

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, spec={self.spec!r}"

    # --- helpers for structures that pad ----------------------------------------------------------
    def _pad_input(self, x: Tensor, padded_in: int) -> Tensor:
        return x if padded_in == self.in_features else F.pad(x, (0, padded_in - self.in_features))

    def _trim_output(self, y: Tensor) -> Tensor:
        # (no slice when nothing was padded: a view is one more autograd node, host time on few-token calls)
        return y if y.shape[1] == self.out_features else y[:, : self.out_features]

    def _check_smaller_than_dense(self, weight_params: int, hint: str) -> None:
        dense = self.in_features * self.out_features
        if weight_params >= dense:
            raise ValueError(
                f"{self._label()} {self.spec}: {weight_params} weight parameters >= dense {dense}; {hint}"
            )


def split_exponent(exponent: int, parts: int) -> list[int]:
    """Integers summing to ``exponent``, as equal as possible (the larger ones first)."""
    base, extra = divmod(exponent, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _power_of_two_scale(weight: Tensor) -> int:
    """The exponent e with max|W| in [2**(e-1), 2**e); 0 for an all-zero or meta weight."""
    if weight.device.type == "meta" or weight.numel() == 0:
        return 0
    peak = float(weight.detach().abs().max())
    return 0 if peak == 0.0 else math.frexp(peak)[1]


def check_dense_weight(weight: Any, owner: str, bias: Any = None, call: str = ".from_dense") -> Tensor:
    """Validate a dense weight (and bias) handed to ``from_dense`` (or to ``owner + call``)."""
    owner = owner + call
    if not isinstance(weight, Tensor):
        raise TypeError(f"{owner}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{owner}: weight must be 2-D (out_features, in_features), got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{owner}: weight must be floating point, got {weight.dtype}")
    check_finite(f"{owner}", "weight", weight, "clean the checkpoint first")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"{owner}: bias must be a tensor of shape ({weight.shape[0]},)")
        if bias.device.type != "meta" and not bool(torch.isfinite(bias).all()):
            raise ValueError(f"{owner}: bias has NaN/Inf entries; clean the checkpoint first")
    return weight.detach()

