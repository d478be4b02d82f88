"""Host time of a fused q/k/v at one token (issue 12, session 21): what eager decode pays per layer for its siblings.

A fused member's call went through ``SiblingGroup.output`` on every token (grad, compile, token-count and plan
checks, then the held product's slice): with the launches stubbed on a CPU, three fused members cost the host as
much as three unfused layers (27 against 25-27 us), though they launch one product instead of three. Members now
keep an eager form (``SiblingGroup.eager_member``): the held slice or the product, nothing else asked.

For each structure, three 2048-wide siblings (``--width``) called on one token under ``torch.inference_mode``:
microseconds per token (best of ``--repeats`` loops of ``--calls``) unfused, fused, and three ``nn.Linear``. On a
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

    cuda = torch.cuda.is_available()
    if not cuda:
        stub_launches()
        torch.set_num_threads(1)
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
            rows[name] = {"unfused_us": unfused, "fused_us": fused}
            print(f"{name:>10}: unfused {unfused:6.2f} us, fused {fused:6.2f} us per token "
                  f"(3 nn.Linear {rows['nn.Linear']:.2f})", flush=True)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu (launches stubbed)", "width": w,
              "rows": rows, "run_info": run_info(vars(args))}
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    print("wrote", write_json(Path(args.out) / f"siblings-host-{stamp}.json", result))


if __name__ == "__main__":
    main()
