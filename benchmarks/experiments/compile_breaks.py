"""Graphs, graph breaks and recompiles of the compiled decode step, per model (issue 12, session 13).

Run on the GPU machine:
  ``PYTHONPATH=src python benchmarks/experiments/compile_breaks.py --out DIR --models dense,lowrank+fused``

The step of ``infer.graph_decode_tps(model, 1, compile_mode="default")`` (static cache, batch 1), compiled by
inductor, run twice, then captured in a CUDA graph as that function does: for each model the number of graphs dynamo
compiled, its graph-break reasons (``torch._dynamo.utils.counters``) and the recompiles logged while the step was
warmed and captured. Session 13 round 2 found the fused low-rank model's compiled step 7% slower since c40468b with
the same kernels per token, and its inductor kernels named as from many small graphs. Writes
``compile-breaks-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record)[:2000])


def main() -> int:
    from structmat.bench import infer

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--models", default="dense,lowrank+fused")
    args = ap.parse_args()
    torch._logging.set_logs(graph_breaks=True, recompiles=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"compile-breaks-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in args.models.split(","):
        model = infer.build(None if name == "dense" else name, torch.bfloat16, infer.SHAPE)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        handler = _Collect()
        logging.getLogger("torch._dynamo").addHandler(handler)
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(len(gm.graph.nodes))
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)

        step, pos = infer.decode_step(model, 1, 32)
        step = torch.compile(step, backend=backend)
        step()
        step()
        infer.capture(step)
        logging.getLogger("torch._dynamo").removeHandler(handler)
        rows[name] = {"graphs": len(graphs), "graph_nodes": graphs,
                      "graph_breaks": {k: v for k, v in torch._dynamo.utils.counters["graph_break"].items()},
                      "log": handler.lines[:60]}
        print(name, rows[name]["graphs"], json.dumps(rows[name]["graph_breaks"])[:3000], flush=True)
        for line in handler.lines[:20]:
            print("   ", line[:600], flush=True)
        path.write_text(json.dumps({"rows": rows, "device": torch.cuda.get_device_name()}, indent=1))
        del model
        torch.cuda.empty_cache()
    print("wrote", path)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
