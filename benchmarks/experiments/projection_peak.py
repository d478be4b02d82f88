"""Device memory of one whitened low-rank projection per layer shape of the 1B-shaped Llama block (H200), above
the weight and its Gram (the number ``compress._projection_bytes`` bounds for ``offload="all"``):

    PYTHONPATH=src python benchmarks/experiments/projection_peak.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: compress_gpu
from compress_gpu import projection_working_set  # noqa: E402

from structmat.calibrate import InputStats  # noqa: E402
from structmat.compress import _projection_bytes  # noqa: E402

SHAPES = {"q_proj/o_proj": (2048, 2048), "k_proj/v_proj": (512, 2048), "gate_proj/up_proj": (8192, 2048),
          "down_proj": (2048, 8192)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.ones(16, 16, device=dev) @ torch.ones(16, 16, device=dev)  # cuBLAS's workspace, outside the counts
    rows = {}
    for label, (out_f, in_f) in SHAPES.items():
        gen = torch.Generator(device=dev).manual_seed(0)
        weight = torch.randn(out_f, in_f, device=dev, generator=gen).to(torch.bfloat16)
        peak = projection_working_set(weight, 0.5)
        module = torch.nn.Linear(in_f, out_f, bias=False, device="meta", dtype=torch.bfloat16)
        gram = InputStats(torch.empty(in_f, in_f, device="meta"), torch.empty(in_f, device="meta"), 1)
        estimate = _projection_bytes(module, gram) - out_f * in_f * 2 - in_f * in_f * 4
        rows[label] = {"shape": [out_f, in_f], "peak_above_weight_and_gram_bytes": peak,
                       "estimate_above_weight_and_gram_bytes": estimate, "estimate_holds": peak <= estimate}
        print(label, rows[label], flush=True)
        del weight
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"projection-peak-{stamp}.json"
    path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
