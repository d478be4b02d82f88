"""GPU kernels and backend dispatch for the structured products.

Importing this package registers fast paths with ``structures.base.run_op`` (the data flow runs structures ->
kernels: structures never import this). It imports on any machine: without Triton (or without a GPU) every
product falls through to the pure-PyTorch reference. See ``dispatch`` for the backends and ``ops`` for the
Triton custom ops (``torch.ops.structmat.monarch_mm``, ``torch.ops.structmat.blockdiag_mm`` and their backward ops).
"""

from __future__ import annotations

from ..structures.base import EAGER_FORM, FAST_PATHS, PLANNERS, register_fast_path
from . import dispatch
from .dispatch import BACKENDS, LAST_CHOICE, clear_cache, get_backend, set_backend, use_backend

try:  # Triton is optional (the "gpu" extra); a broken or missing install must not break the package.
    import triton  # noqa: F401

    from . import decode, ops
except Exception as err:  # pragma: no cover - depends on the machine
    ops = decode = None
    TRITON_IMPORT_ERROR: Exception | None = err
else:
    TRITON_IMPORT_ERROR = None

HAVE_TRITON = ops is not None
dispatch.ops = ops
dispatch.decode = decode

for _op, _fn in (("blockdiag", dispatch.blockdiag_fast), ("monarch", dispatch.monarch_fast),
                 ("lowrank", dispatch.lowrank_fast), ("nm", dispatch.nm_fast)):
    if _fn not in FAST_PATHS.get(_op, []):  # idempotent under importlib.reload
        register_fast_path(_op, _fn)
    PLANNERS[_op] = dispatch.planner(_op)
EAGER_FORM[0] = dispatch.eager_form

__all__ = ["BACKENDS", "HAVE_TRITON", "LAST_CHOICE", "clear_cache", "get_backend", "ops", "set_backend",
           "use_backend"]
