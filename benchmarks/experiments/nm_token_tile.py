"""2:4 decode at 32-64 tokens with wider token tiles (issue 12, session 10): correctness on the GPU, then the captured
decode step of the 2:4 bench model, for each largest token tile of the expanded-tile kernel.

Run on the GPU machine:  ``PYTHONPATH=src python benchmarks/experiments/nm_token_tile.py --out DIR``

For NM_BLOCK_N in (16, 32, 64): the N:M decode op against float64 at 17, 33 and 64 tokens (bench-size and awkward
shapes, bf16), and the captured decode step of the 2:4 bench model at batch 8 and 32 (``infer.graph_decode_tps``, one
process: the same host for every row). Writes ``nm-token-tile-<UTC>.json``. (Its first run,
``nm-token-tile-20261204T100349Z.json``, did not invalidate the model's plans between tiles: its ``graph`` rows all
timed the 16-token tile; its error rows are valid, each op call planned afresh.)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))


def main() -> int:
    from test_inference import TOL, decode_errors

    from structmat.bench import infer
    from structmat.structures.base import invalidate_plans
    from structmat.kernels import _triton_decode as TD

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--tiles", default="16,32,64")
    args = ap.parse_args()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"nm-token-tile-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = {"nm_big": (2048, 2048, dict(n=2, m=4)), "nm_down": (8192, 2048, dict(n=2, m=4)),
              "nm": (40, 24, dict(n=2, m=4)), "nm_38": (48, 24, dict(n=3, m=8))}
    rows = {}
    model = infer.build("nm24", torch.bfloat16, infer.SHAPE)
    for tile in (int(t) for t in args.tiles.split(",")):
        TD.NM_BLOCK_N[0] = tile
        TD.clear_plans()
        invalidate_plans()  # (the model's layers keep their plans: without this every tile timed the first one's)
        errs = decode_errors("cuda", torch.bfloat16, shapes, (17, 33, 64))
        bad = {k: v for k, v in errs.items() if not v <= TOL["bfloat16"]}
        steps = [infer.graph_decode_tps(model, b) for b in (8, 32)]
        rows[tile] = {"max_err": max(errs.values()), "bad": bad, "graph": steps}
        print(tile, rows[tile], flush=True)
        path.write_text(json.dumps({"rows": rows, "device": torch.cuda.get_device_name()}, indent=1))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
