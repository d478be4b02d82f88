"""Host cost of one structured layer call at decode (1 token): what eager decode pays per layer and per token.

Run:  ``PYTHONPATH=src python -m structmat.bench.decode_host [--out benchmarks/results]``

Eager decode is host-bound: at one token each layer's GPU work takes a few microseconds, so a token costs the
Python and launch time of every layer call. For each structure (tiny shapes: the compute is negligible) this times,
in microseconds per call (the fastest of ``--repeats`` loops of ``--calls`` calls, the device synchronized once per loop):
  ``layer_us``   the structured layer's forward (``auto`` dispatch), under ``torch.inference_mode`` and ``no_grad``
  ``uncached_us`` the same with the layer's per-shape plan cache off (the whole dispatch on every call)
  ``direct_us``  the product it dispatches to, called directly with its operands (the decode kernel on CUDA; the
                 reference function on CPU): the floor a layer call cannot go under
  ``linear_us``  ``nn.Linear`` of the same shape (dense: one cuBLAS launch)
  ``overhead_us`` = layer_us - direct_us (dispatch, checks, Python around the product)
  ``forced_us``  layer_us with each backend forced (inference mode), where the structure has it: the host side of
                 the dispatch's cost model (``dispatch.HOST_US``)
On CPU, ``--stub-launch`` runs the GPU decode path's Python (dispatch, tile plans, output allocation) with the
Triton launches replaced by no-ops: the layer's own host cost without the launch, measurable on any machine.
Writes ``decode-host-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

SHAPE = (256, 256)
FORCED = ("reference", "decode", "triton", "cublas")  # (a backend a structure lacks falls back: not timed)
SPECS = {"lowrank": "lowrank:rank=32", "monarch": "monarch:nblocks=4", "blockdiag": "blockdiag:nblocks=4",
         "nm24": "nm:n=2,m=4"}


def _direct(layer, x):
    """The product the layer dispatches to, as a zero-argument callable on its operands (no layer around it)."""
    import structmat.kernels as K
    from structmat.structures import blockdiag, lowrank, monarch, sparse

    use_decode = K.LAST_CHOICE.get(layer.name) == "decode"
    dec = K.dispatch.decode
    if layer.name == "lowrank":
        U, V = layer.U, layer.V
        return (lambda: dec.lowrank(x, U, V)) if use_decode else (lambda: lowrank.lowrank_multiply(x, U, V))
    if layer.name == "monarch":
        R, L = layer.R, layer.L
        return (lambda: dec.monarch(x, R, L)) if use_decode else (lambda: monarch.monarch_multiply(x, R, L))
    if layer.name == "blockdiag":
        W = layer.weight
        return (lambda: dec.blockdiag(x, W)) if use_decode else (lambda: blockdiag.blockdiag_bmm(x, W))
    vals, pos, n, m = layer.values, layer.index, layer.n, layer.m
    if use_decode:
        return lambda: dec.nm(x, vals, pos, n, m)
    return lambda: sparse.nm_multiply(x, vals, pos, n, m)


def time_us(fn, calls: int, repeats: int, sync) -> float:
    for _ in range(max(10, calls // 10)):
        fn()
    sync()
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        best.append((time.perf_counter() - t0) / calls * 1e6)
    return min(best)  # (host time: the least disturbed loop; a shared machine only adds)


def stub_launches() -> None:
    """Run the GPU decode path on CPU tensors with every Triton launch a no-op (host cost without the launch). Each
    kernel stands in for a compiled one whose launcher does nothing, so a ``_launch.Launch`` records it and then
    calls it directly with the tensors' addresses, as on a GPU: the Python of the direct path is timed too."""
    from structmat.kernels import _launch, _triton_decode, dispatch

    class _Compiled:
        function = packed_metadata = 0

        @staticmethod
        def run(*args):
            return None

    compiled = _Compiled()

    class _NoLaunch:
        def __getitem__(self, grid):
            def launch(*args, **constexprs):  # (as Triton calls a compiled kernel's launcher)
                compiled.run(*grid, 0, 0, 0, None, None, None, *args, None, None)
                return compiled
            return launch

    _launch.ON_DEVICE[0] = lambda t: True
    if not hasattr(torch._C, "_cuda_getCurrentRawStream"):  # (a CPU build of torch)
        torch._C._cuda_getCurrentRawStream = lambda device: 0

    from triton.runtime.jit import JITFunction

    from structmat.kernels import decode

    dispatch.INTERPRET = True
    # the plans' eager forms, as a GPU's eager call takes them (one launch for low-rank and Monarch at one token, kept
    # scratch), not the forms of a captured call, which a CPU tensor would otherwise get (before session 17 it did)
    decode._eager = lambda x: not decode._AS_CAPTURED[0] and not torch.compiler.is_compiling()
    for name, obj in list(vars(_triton_decode).items()):  # (every kernel: the gemv, N:M, one-grid and PDL forms)
        if isinstance(obj, JITFunction):
            setattr(_triton_decode, name, _NoLaunch())


def run(args) -> dict:
    import structmat.kernels as K
    from structmat.eval.results import run_info
    from structmat.structures import build

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if args.stub_launch:
        if device != "cpu" or not K.HAVE_TRITON:
            raise SystemExit("--stub-launch is for a CPU run with Triton installed")
        stub_launches()
    if device == "cpu":
        torch.set_num_threads(1)  # (tiny products: threads only add wake-up noise)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    in_f, out_f = SHAPE
    x = torch.randn(1, in_f, device=device, dtype=dtype)
    linear = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype).eval()
    rows = []
    for mode, ctx in (("inference_mode", torch.inference_mode), ("no_grad", torch.no_grad)):
        with ctx():
            linear_us = time_us(lambda: linear(x), args.calls, args.repeats, sync)
            for name in args.structures.split(","):
                layer = build(SPECS.get(name, name), in_f, out_f, bias=False, device=device, dtype=dtype).eval()
                layer(x)
                choice = (K.LAST_CHOICE.get(layer.name) or "reference")
                direct = _direct(layer, x)
                layer_us = time_us(lambda: layer(x), args.calls, args.repeats, sync)
                direct_us = time_us(direct, args.calls, args.repeats, sync)
                plans, layer._plans = layer._plans, None  # the full dispatch on every call (no per-shape plan)
                uncached_us = time_us(lambda: layer(x), args.calls, args.repeats, sync)
                layer._plans = plans
                forced = {}  # each backend forced: the host side of the cost model's HOST_US table, measured
                if mode == "inference_mode":  # (on CPU only the paths the stub covers)
                    for backend in FORCED if device == "cuda" else ("reference", "decode"):
                        try:
                            with K.use_backend(backend):
                                layer(x)
                                if (K.LAST_CHOICE.get(layer.name) or "reference") == backend:
                                    forced[backend] = time_us(lambda: layer(x), args.calls, args.repeats, sync)
                        except Exception as err:  # recorded: one backend's failure must not lose the table
                            forced[backend] = f"failed: {err!r}"[:300]
                rows.append(dict(structure=name, spec=layer.spec, mode=mode, choice=choice, layer_us=layer_us,
                                 uncached_us=uncached_us, direct_us=direct_us, linear_us=linear_us, overhead_us=layer_us - direct_us,
                                 over_linear_us=layer_us - linear_us, forced_us=forced))
                print(f"{mode:15s} {name:10s} {choice:10s} layer {layer_us:7.2f} us (uncached {uncached_us:7.2f})  direct {direct_us:7.2f} us  "
                      f"nn.Linear {linear_us:7.2f} us  forced {json.dumps(forced, default=str)}",
                      flush=True)
    return dict(device=device, dtype=str(dtype).replace("torch.", ""), shape=list(SHAPE), tokens=1,
                stub_launch=bool(args.stub_launch), rows=rows, run_info=run_info(vars(args), device=device))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m structmat.bench.decode_host", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--structures", default=",".join(SPECS), help=f"comma list of {', '.join(SPECS)} or specs")
    p.add_argument("--calls", type=int, default=2000, help="calls per timed loop")
    p.add_argument("--repeats", type=int, default=5, help="timed loops (the fastest counts)")
    p.add_argument("--cpu", action="store_true", help="time on CPU even where CUDA is available")
    p.add_argument("--stub-launch", action="store_true", help="CPU: the GPU decode path with no-op Triton launches")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    if args.calls < 1 or args.repeats < 1:
        p.error("--calls and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    from structmat.eval.results import write_json

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = write_json(out / f"decode-host-{stamp}.json", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
