"""Launching a Triton kernel without Triton's per-call argument binding (GPU only).

``kernel[grid](*args, **constexprs)`` binds every argument, recomputes its specialization (integer values, pointer
alignment) and looks the compiled kernel up, on every call: tens of microseconds on a slow host, more than the
launch itself and more than a cuBLAS call. Few-token eager decode is host-bound, so that cost is the decode step's
cost. A :class:`Launch` is one kernel with fixed constexprs and grid: its first call goes through Triton and records
the exact arguments Triton passed to the compiled kernel's launcher; later calls whose specialization matches the
recorded one (same integer arguments, every pointer 16-byte aligned as recorded) call that launcher directly.
Anything else (another Triton whose launcher takes other arguments, a profiler's launch hooks, the interpreter, a
call whose integers differ) goes through Triton as before.

The direct call passes each tensor as its address (``data_ptr()``, an int), which Triton's launcher takes as the
device pointer as it is. Given the tensor, the launcher calls its ``data_ptr`` method and asks the driver what the
address is (``cuPointerGetAttribute``), once per pointer argument on every call: a driver call per pointer is host
time that a few-token decode pays per layer. The addresses are read here anyway (the alignment check); a tensor here
is always on the plan's device (plans are per device and are dropped when a layer moves).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # (Triton >= 3.4 keeps its launch hooks here; elsewhere the direct path stays off)
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - depends on the installed Triton
    _knobs = None

#: STRUCTMAT_DIRECT_LAUNCH=0 sends every launch through Triton (a switch for benchmarks and bisecting)
DIRECT = [os.environ.get("STRUCTMAT_DIRECT_LAUNCH", "1") not in ("", "0") and _knobs is not None]
#: STRUCTMAT_LAUNCH_ADDRESSES=0: direct calls pass the tensors themselves (the launcher resolves each pointer
#: through the driver), a switch to measure what passing their addresses saves
ADDRESSES = [os.environ.get("STRUCTMAT_LAUNCH_ADDRESSES", "1") not in ("", "0")]
#: whether a first call's tensors are on a device whose launches may be recorded (``bench.decode_host``'s stubbed
#: launches on a CPU take the direct path too, so that its host time is the GPU's Python)
ON_DEVICE = [lambda t: t.is_cuda]


def _hooks_idle() -> tuple | None:
    """Triton's (enter, exit) launch hooks where none is set (None, or an empty chain), else None."""
    rt = _knobs.runtime
    enter, exit_ = rt.launch_enter_hook, rt.launch_exit_hook
    for hook in (enter, exit_):
        if hook is not None and getattr(hook, "calls", True):
            return None
    return enter, exit_


class Launch:
    """``Launch(kernel, grid, **constexprs)(*args)`` runs ``kernel[grid](*args, **constexprs)`` (``args``: the
    kernel's positional arguments, constexprs and launch options as keywords), directly after the first call where
    that is safe (module docstring)."""

    __slots__ = ("kernel", "grid", "kw", "compiled", "tail", "device", "run", "values", "lead")

    def __init__(self, kernel, grid: tuple, **kw):
        self.kernel, self.grid, self.kw = kernel, tuple(grid) + (1,) * (3 - len(grid)), kw
        self.compiled = self.tail = self.run = self.device = self.values = self.lead = None

    def __call__(self, *args) -> None:
        # (the specialization check: the same non-tensor arguments, every pointer 16-byte aligned as recorded; a
        # tensor's dtype is the plan's, which made this launch for it. The tensors come first: ``_record``)
        if self.run is not None and args[self.lead:] == self.values:
            hooks = _hooks_idle()
            if hooks is not None:
                tensors = args[:self.lead]
                addresses = [t.data_ptr() for t in tensors]
                bits = 0
                for a in addresses:
                    bits |= a
                if not bits & 15:
                    g = self.grid
                    self.run(g[0], g[1], g[2], torch._C._cuda_getCurrentRawStream(self.device),
                             self.compiled.function, self.compiled.packed_metadata, None, hooks[0], hooks[1],
                             *(addresses if ADDRESSES[0] else tensors), *self.values, *self.tail)
                    return
        if self.compiled is not None and self.tail is None and DIRECT[0]:
            self._record(args)  # (the second call: through Triton once, its launcher's arguments recorded)
            return
        compiled = self.kernel[self.grid](*args, **self.kw)
        if self.compiled is None and compiled is not None and args and isinstance(args[0], Tensor) \
                and ON_DEVICE[0](args[0]):
            self.compiled = compiled

    def _record(self, args: tuple) -> None:
        """Run this call through Triton with the compiled launcher wrapped (one launch, as any call), and keep the
        direct path only if the launcher's arguments were (grid, stream, function, metadata, launch metadata, hooks,
        *args, *tail). Not on the first call: that one compiles (a call that is made once, as a plan made per call
        inside a CUDA graph capture, never pays for the recording)."""
        compiled, seen = self.compiled, []
        launcher = compiled.run
        self.tail = ()  # (recorded once, whatever the outcome)
        # (Triton 3.9 keeps the launcher behind a property, ``_run``; older ones in the attribute ``run``)
        attr = "_run" if isinstance(getattr(type(compiled), "run", None), property) else "run"
        try:
            setattr(compiled, attr, lambda *a: (seen.append(a), launcher(*a))[1])
            again = self.kernel[self.grid](*args, **self.kw)
        finally:
            setattr(compiled, attr, launcher)
        if again is not compiled:
            return  # (another specialization than the first call's)
        if len(seen) != 1:
            return
        a = seen[0]
        device = args[0].device.index
        head = (self.grid[0], self.grid[1], self.grid[2], torch._C._cuda_getCurrentRawStream(device),
                compiled.function, compiled.packed_metadata)
        rest = a[9:]
        if a[:6] != head or a[6] is not None and _hooks_idle() is None or len(rest) < len(args) \
                or any(x is not y if isinstance(y, Tensor) else type(x) is not type(y) or x != y
                       for x, y in zip(rest, args)):
            return
        if any(isinstance(x, Tensor) and x.data_ptr() & 15 for x in args):
            return  # (a misaligned pointer was specialized as such: leave this launch to Triton)
        lead = sum(isinstance(x, Tensor) for x in args)
        if any(isinstance(x, Tensor) for x in args[lead:]):
            return  # (every kernel here takes its tensors first; one that does not stays with Triton)
        self.lead, self.values = lead, tuple(args[lead:])
        self.tail, self.device, self.run = tuple(rest[len(args):]), device, launcher


class LaunchCache:
    """``LaunchCache(kernel)(grid, *args, **constexprs)`` runs ``kernel[grid](*args, **constexprs)`` through one
    :class:`Launch` per grid, constexprs and non-tensor arguments (tensors: their dtype and device), made when first
    met: the direct path for kernels whose launches vary from call to call (the many-token GEMM of prefill, the N:M
    tile expansion), where no per-shape plan keeps a Launch. Host cost per call: one key, one dict lookup. At most
    ``limit`` launches are kept (then the oldest is dropped; a dropped one is remade, through Triton, when met again)."""

    __slots__ = ("kernel", "limit", "launches")

    def __init__(self, kernel, limit: int = 512):
        self.kernel, self.limit, self.launches = kernel, limit, {}

    def __call__(self, grid: tuple, *args, **kw) -> None:
        key = (grid, *kw.items(), *((a.dtype, a.device) if isinstance(a, Tensor) else a for a in args))
        launch = self.launches.get(key)
        if launch is None:
            if len(self.launches) >= self.limit:
                try:  # (threads may evict at once: one of them finds the key gone or the dict changed)
                    self.launches.pop(next(iter(self.launches)), None)
                except (RuntimeError, StopIteration):
                    pass
            launch = self.launches[key] = Launch(self.kernel, grid, **kw)
        launch(*args)
