"""The captured decode step under settings of the decode kernels, in one process (issue 12, session 10).

Run on the GPU machine:
  ``PYTHONPATH=src python benchmarks/experiments/step_knobs.py --out DIR --models monarch,monarch+fused \
      --batches 8,32 --settings '[{}, {"MULTI_TOKEN_SPLITS": 4}]'``

Each setting names module attributes of ``structmat.kernels._triton_decode`` (``_common.set_knobs``). Every model
is built once; for each setting the kernels' plan caches and the layers' plans are dropped (``invalidate_plans``)
and the step is captured again at each batch (``infer.graph_decode_tps``). Writes ``step-knobs-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from pathlib import Path

import _common  # (also puts src/ on the path)
import torch


def main() -> int:
    from structmat.bench import infer
    from structmat.kernels import _triton_decode as TD
    from structmat.structures.base import invalidate_plans

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--models", default="monarch,monarch+fused")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--settings", default='[{}, {"MULTI_TOKEN_SPLITS": 4}]')
    args = ap.parse_args()
    settings = json.loads(args.settings)
    batches = [int(b) for b in args.batches.split(",")]
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"step-knobs-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    models = {name: infer.build(None if name == "dense" else name, torch.bfloat16, infer.SHAPE)
              for name in args.models.split(",")}
    rows = []
    for setting in settings:
        saved = _common.set_knobs(TD, setting)
        try:
            TD.clear_plans()
            invalidate_plans()
            for name, model in models.items():
                steps = [infer.graph_decode_tps(model, b) for b in batches]
                rows.append({"setting": setting, "model": name, "graph": steps})
                print(json.dumps(setting), name, [round(s["ms_per_step"], 4) for s in steps], flush=True)
        finally:
            _common.restore_knobs(TD, saved)
        path.write_text(json.dumps({"rows": rows, "device": torch.cuda.get_device_name()}, indent=1))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
