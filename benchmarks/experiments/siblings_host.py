"""Host time of a fused q/k/v at one token (issue 12, session 21): what eager decode pays per layer for its siblings.

A fused member's call went through ``SiblingGroup.output`` on every token (grad, compile, token-count and plan
checks, then the held product's slice): with the launches stubbed on a CPU, three fused members cost the host as
much as three unfused layers (27 against 25-27 us), though they launch one product instead of three. Members now
keep an eager form (``SiblingGroup.eager_member``): the held slice or the product, nothing else asked.

For each structure, three 2048-wide siblings (``--width``) called on one token under ``torch.inference_mode``:
microseconds per token (best of ``--repeats`` loops of ``--calls``) unfused, fused, and three ``nn.Linear``; then a
SwiGLU MLP (4x wide) unfused, fused (the gated two products) and dense, N:M's fused MLP also with its gated input
formed by a kernel of its own (``EAGER_GATE_IN_ROW`` off, session 22). On a
CPU the Triton launches are no-ops (``decode_host.stub_launches``: the host's own cost); on a GPU they are real and
the device is synchronized once per loop.

    PYTHONPATH=src python benchmarks/experiments/siblings_host.py [--out DIR]

Writes ``siblings-host-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch
from torch import nn

SPECS = {"lowrank": "lowrank:ratio=0.5", "monarch": "monarch:nblocks=4,ratio=0.5", "blockdiag": "blockdiag:nblocks=4",
         "nm24": "nm:n=2,m=4"}


class MLP(nn.Module):
    """A SwiGLU MLP (gate, up: width -> 4 width; down back): ``fuse_siblings`` makes it two products (gated)."""

    def __init__(self, make, w: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = make(w, 4 * w), make(w, 4 * w), make(4 * w, w)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class QKV(nn.Module):
    def __init__(self, make) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (make() for _ in range(3))

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    import structmat
    from structmat.bench.decode_host import stub_launches, time_us
    from structmat.eval.results import run_info, write_json
    from structmat.structures import build

    import structmat.siblings as siblings
    from structmat.kernels import _triton_decode

    cuda = torch.cuda.is_available()
    if not cuda:
        stub_launches()
        torch.set_num_threads(1)
        # (fuse_siblings installs the gated MLP where it reproduces the MLP on a random token; stubbed kernels
        # compute nothing, so that check is skipped here: only host time is measured)
        siblings._gated_ok = lambda parent, group: (isinstance(parent, MLP)
                                                    and group.members == [parent.gate_proj, parent.up_proj])
    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    w = args.width
    x = torch.randn(1, 1, w, device=dev, dtype=dt)
    rows = {}
    with torch.inference_mode():
        linear = QKV(lambda: nn.Linear(w, w, bias=False, device=dev, dtype=dt))
        rows["nn.Linear"] = time_us(lambda: linear(x), args.calls, args.repeats, sync)
        for name, spec in SPECS.items():
            model = QKV(lambda: build(spec, w, w, bias=False, device=dev, dtype=dt).eval())
            unfused = time_us(lambda: model(x), args.calls, args.repeats, sync)
            structmat.fuse_siblings(model)
            fused = time_us(lambda: model(x), args.calls, args.repeats, sync)
            # with biases (as Qwen2's q/k/v): the group adds them once (session 22; before, each member added its own)
            biased = QKV(lambda: build(spec, w, w, bias=True, device=dev, dtype=dt).eval())
            structmat.fuse_siblings(biased)
            fused_biased = time_us(lambda: biased(x), args.calls, args.repeats, sync)
            rows[name] = {"unfused_us": unfused, "fused_us": fused, "fused_biased_us": fused_biased}
            print(f"{name:>10}: unfused {unfused:6.2f} us, fused {fused:6.2f} us (with biases {fused_biased:6.2f}) "
                  f"per token (3 nn.Linear {rows['nn.Linear']:.2f})", flush=True)
        # a gated MLP: dense, each structure unfused and fused (two products), N:M's down product with its gated
        # input formed inside the row kernel in eager calls or by a kernel of its own (EAGER_GATE_IN_ROW, session 22)
        make = (lambda i, o: nn.Linear(i, o, bias=False, device=dev, dtype=dt))
        dense_mlp = MLP(make, w)
        rows["mlp nn.Linear"] = time_us(lambda: dense_mlp(x), args.calls, args.repeats, sync)
        for name, spec in SPECS.items():
            mlp = MLP(lambda i, o: build(spec, i, o, bias=False, device=dev, dtype=dt).eval(), w)
            row = {"unfused_us": time_us(lambda: mlp(x), args.calls, args.repeats, sync)}
            structmat.fuse_siblings(mlp)
            row["gated"] = "forward" in mlp.__dict__
            for in_row in ((True, False) if name == "nm24" else (True,)):
                _triton_decode.EAGER_GATE_IN_ROW[0] = in_row
                structmat.unfuse_siblings(mlp)
                structmat.fuse_siblings(mlp)  # (plans made anew under the setting)
                row["fused_us" if in_row else "fused_gate_first_us"] = time_us(lambda: mlp(x), args.calls,
                                                                               args.repeats, sync)
            _triton_decode.EAGER_GATE_IN_ROW[0] = True
            rows[f"mlp {name}"] = row
            print(f"{'mlp ' + name:>14}: {row} (dense {rows['mlp nn.Linear']:.2f})", flush=True)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu (launches stubbed)", "width": w,
              "rows": rows, "run_info": run_info(vars(args))}
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    print("wrote", write_json(Path(args.out) / f"siblings-host-{stamp}.json", result))


if __name__ == "__main__":
    main()
