"""Host cost of eager few-token decode, piece by piece (issue 12: eager decode is host-bound, so a structured layer's
eager speed is its host time against ``F.linear``'s).

Run on the GPU machine:  ``PYTHONPATH=src python benchmarks/experiments/host_costs.py --out DIR``

Each row is wall-clock microseconds per call over many calls, synchronised once at the end (every call here is
host-bound: its GPU time is a few microseconds). Rows:
  * primitives: ``F.linear`` and ``nn.Linear`` at one token (the dense baseline), ``torch.empty``, a split, a
    slice, SiLU, a product, the raw-stream query;
  * each decode launch (gemv, the PDL pair, the one grid, N:M) through Triton's ``kernel[grid]`` and through
    ``_launch.Launch``'s direct path, with the two outputs compared bit for bit;
  * a structured layer's eager call at one token (the cached plan), with the direct path on and off, and with
    eager calls taking the one grid or the PDL pair (``EAGER_ONE_GRID``);
  * a block's q/k/v (three calls) and gated MLP (one call), each structure at the bench shape, unfused and fused
    (``fuse_siblings``: one q/k/v product; the MLP as two products), beside dense.
Writes ``host-costs-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch
import torch.nn.functional as F
from _common import wall_us

DT, DEV = torch.bfloat16, "cuda"
SPECS = {"lowrank": "lowrank:ratio=0.5", "monarch": "monarch:nblocks=4,ratio=0.5", "blockdiag": "blockdiag:nblocks=4",
         "nm24": "nm:n=2,m=4"}


def us(fn, n=2000):
    return round(wall_us(fn, n, warmup=50), 2)


def primitives(rows):
    x = torch.randn(1, 1, 2048, device=DEV, dtype=DT)
    lin = torch.nn.Linear(2048, 2048, bias=False, device=DEV, dtype=DT)
    y = torch.randn(1, 6144, device=DEV, dtype=DT)
    h = torch.randn(1, 16384, device=DEV, dtype=DT)
    with torch.no_grad():
        cases = {
            "F.linear 2048x2048, 1 token": lambda: F.linear(x, lin.weight),
            "nn.Linear 2048x2048, 1 token": lambda: lin(x),
            "torch.empty (1, 2048) bf16": lambda: torch.empty((1, 2048), device=DEV, dtype=DT),
            "torch.empty (8, 6144) fp32": lambda: torch.empty((8, 6144), device=DEV, dtype=torch.float32),
            "split into 3": lambda: y.split(2048, dim=-1),
            "slice y[:, :2048]": lambda: y[:, :2048],
            "view (1, 1, 2048)": lambda: y[:, :2048].view(1, 1, 2048),
            "silu (1, 8192)": lambda: F.silu(h[:, :8192]),
            "silu(g) * u": lambda: F.silu(h[:, :8192]) * h[:, 8192:],
            "raw stream query": lambda: torch._C._cuda_getCurrentRawStream(0),
        }
        for name, fn in cases.items():
            rows.append({"case": name, "us": us(fn)})
            print(rows[-1], flush=True)


def launches(rows):
    from structmat.kernels import _launch
    from structmat.kernels import decode as D

    x = torch.randn(1, 2048, device=DEV, dtype=DT)
    ops = {
        "blockdiag": (D.blockdiag_plan, (torch.randn(4, 512, 512, device=DEV, dtype=DT),)),
        "lowrank (PDL pair)": (D.lowrank_plan, (torch.randn(2048, 512, device=DEV, dtype=DT) * 0.05,
                                                torch.randn(512, 2048, device=DEV, dtype=DT) * 0.05)),
        "nm 2:4": (D.nm_plan, (torch.randn(2048, 1024, device=DEV, dtype=DT),
                               torch.randint(0, 4, (2048, 1024), device=DEV, dtype=torch.uint8), 2, 4)),
    }
    for name, (plan_of, operands) in ops.items():
        out = {}
        # (through Triton; direct with the tensors, the launcher resolving each pointer through the driver; direct
        # with their addresses, session 22)
        for direct, addresses in ((False, False), (True, False), (True, True)):
            _launch.DIRECT[0], _launch.ADDRESSES[0] = direct, addresses
            run = plan_of(x, *operands)
            with torch.no_grad():
                out[direct, addresses] = run(x, *operands).clone()
                rows.append({"case": f"launch {name}", "direct": direct, "addresses": addresses,
                             "us": us(lambda: run(x, *operands))})
            print(rows[-1], flush=True)
        rows[-1]["bitwise_equal"] = all(torch.equal(out[False, False], o) for o in out.values())
        print("  equal:", rows[-1]["bitwise_equal"], flush=True)
    _launch.DIRECT[0] = _launch.ADDRESSES[0] = True


def layers(rows):
    """One structured layer's eager call at one token ((1, 1, in), as a block gives it) under each backend, with and
    without the layer's eager form (structures.base.EAGER_FORM), beside nn.Linear: what dispatch.HOST_US holds."""
    from structmat.kernels import _launch, dispatch
    from structmat.structures import base, build

    form = base.EAGER_FORM[0]
    for inp, outf in ((2048, 2048), (2048, 8192), (8192, 2048)):
        xi = torch.randn(1, 1, inp, device=DEV, dtype=DT)
        lin = torch.nn.Linear(inp, outf, bias=False, device=DEV, dtype=DT)
        with torch.no_grad():
            rows.append({"case": f"layer nn.Linear {inp}->{outf}", "us": us(lambda: lin(xi), 1000)})
        print(rows[-1], flush=True)
        for name, spec in SPECS.items():
            layer = build(spec, inp, outf, bias=False, device=DEV, dtype=DT).init_()
            for backend in ("auto", "decode", "reference"):
                for eager_form in (True, False):
                    base.EAGER_FORM[0] = form if eager_form else None
                    with dispatch.use_backend(backend), torch.no_grad():
                        layer(xi)
                        choice = dispatch.LAST_CHOICE[layer.name]
                        t = us(lambda: layer(xi), 1000)
                    rows.append({"case": f"layer {name} {inp}->{outf}", "backend": backend, "choice": choice,
                                 "eager_form": eager_form, "us": t})
                    print(rows[-1], flush=True)
            base.EAGER_FORM[0] = form
            _launch.ADDRESSES[0] = False  # (the eager form with the tensors given to the launcher: session 22's A/B)
            with torch.no_grad():
                layer(xi)
                rows.append({"case": f"layer {name} {inp}->{outf}", "backend": "auto", "eager_form": True,
                             "addresses": False, "us": us(lambda: layer(xi), 1000)})
            _launch.ADDRESSES[0] = True
            print(rows[-1], flush=True)
    base.EAGER_FORM[0] = form


class Block(torch.nn.Module):
    """q/k/v, o and a gated MLP of the bench shape (hidden 2048, SwiGLU 8192)."""

    def __init__(self, spec: str) -> None:
        super().__init__()
        from structmat.structures import build

        def make(i, o):
            if spec == "dense":
                return torch.nn.Linear(i, o, bias=False, device=DEV, dtype=DT)
            return build(spec, i, o, bias=False, device=DEV, dtype=DT).init_()

        self.q_proj, self.k_proj, self.v_proj = make(2048, 2048), make(2048, 2048), make(2048, 2048)
        self.mlp = MLP(make)

    def qkv(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class MLP(torch.nn.Module):
    def __init__(self, make) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = make(2048, 8192), make(2048, 8192), make(8192, 2048)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def blocks(rows):
    import structmat

    x = torch.randn(1, 1, 2048, device=DEV, dtype=DT)
    for name, spec in {"dense": "dense", **SPECS}.items():
        block = Block(spec)
        for fused in (False, True):
            if fused:
                if name == "dense":
                    continue
                structmat.fuse_siblings(block)
            with torch.no_grad():
                rows.append({"case": f"q/k/v {name}", "fused": fused, "us": us(lambda: block.qkv(x), 1000)})
                print(rows[-1], flush=True)
                rows.append({"case": f"gated MLP {name}", "fused": fused, "gated": "forward" in block.mlp.__dict__,
                             "us": us(lambda: block.mlp(x), 1000)})
                print(rows[-1], flush=True)
        del block


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    rows: list[dict] = []
    for section in (primitives, launches, layers, blocks):
        try:
            section(rows)
        except Exception as err:  # a diagnostic: report and go on
            import traceback

            traceback.print_exc()
            rows.append({"case": section.__name__, "error": repr(err)[:400]})
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    path = Path(args.out) / f"host-costs-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": rows, "run_info": info}, indent=1))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
