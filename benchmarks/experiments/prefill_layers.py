"""Where a structured model's prefill time goes (issue 12: Monarch nb=4 prefill 0.79x dense, low-rank 1.20x, target
1.3x): each block linear of the `structmat bench infer` model (hidden 2048, SwiGLU 8192, its exact specs) forward at
8192 tokens (4 x 2048), bf16, under every backend that applies, against dense F.linear of the same shape; then the
whole model's prefill (4 x 2048, HF forward, logits_to_keep=1) with each backend forced. GPU times from CUDA events
over many repetitions (triton.testing.do_bench).

    PYTHONPATH=src python benchmarks/experiments/prefill_layers.py --out DIR [--structures monarch,lowrank]
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--structures", default="monarch,lowrank")
    ap.add_argument("--tokens", default="8192", help="comma list of token counts for the layer rows")
    ap.add_argument("--monarch-fused", action="store_true",
                    help="also each Monarch model and layer under auto with the one-launch many-token kernel on "
                         "(kernels.ops.MONARCH_FUSED), in the same process (rows 'auto+fused')")
    args = ap.parse_args()
    from triton.testing import do_bench

    from structmat.bench.infer import SHAPE, STRUCTURES, build, prefill_tps
    from structmat.kernels import dispatch, ops
    from structmat.structures import build as build_layer

    def backends(name: str) -> list[str]:
        extra = ["auto+fused"] if args.monarch_fused and name.startswith("monarch") else []
        return ["auto", "reference", "triton", "cublas", *extra]

    def forced(backend: str):
        """dispatch.use_backend, with 'auto+fused' as auto with the fused Monarch kernel on"""
        fused = backend == "auto+fused"
        ops.MONARCH_FUSED[0] = fused
        dispatch.clear_cache()  # (the decisions depend on the knob)
        return dispatch.use_backend("auto" if fused else backend)

    dev, dt = torch.device("cuda"), torch.bfloat16
    h, f = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    shapes = {"2048x2048": (h, h), "2048x8192": (h, f), "8192x2048": (f, h)}
    counts = [int(t) for t in args.tokens.split(",")]
    result: dict = {"device": torch.cuda.get_device_name(), "tokens": counts, "layers": {}, "models": {}}
    for structure, tokens, (label, (in_f, out_f)) in [(s, t, sh) for s in args.structures.split(",") for t in counts
                                                      for sh in shapes.items()]:
        spec = STRUCTURES.get(structure, structure)
        torch.manual_seed(0)
        x = torch.randn(tokens, in_f, device=dev, dtype=dt)
        w = torch.randn(out_f, in_f, device=dev, dtype=dt) / in_f ** 0.5
        layer = build_layer(spec, in_f, out_f, bias=False).to(dev, dt).eval()
        row = {"spec": str(getattr(layer, "spec", spec)), "dense_ms": do_bench(lambda: F.linear(x, w), rep=200)}
        with torch.no_grad():
            for backend in backends(structure):
                try:
                    with forced(backend):
                        layer(x)
                        row[f"{backend}_ms"] = do_bench(lambda: layer(x), rep=200)
                        row[f"{backend}_choice"] = dict(dispatch.LAST_CHOICE)
                except Exception as err:  # a backend that does not apply: recorded, not fatal
                    row[f"{backend}_error"] = f"{type(err).__name__}: {err}"[:300]
        row["speed_vs_dense"] = {k[:-3]: row["dense_ms"] / v for k, v in row.items() if k.endswith("_ms")}
        result["layers"][f"{structure} {label} @{tokens}"] = row
        print(structure, label, tokens, json.dumps(row), flush=True)
        del layer, x, w
    for name in ["dense", *args.structures.split(",")]:
        model = build(None if name == "dense" else name, dt, SHAPE)
        for backend in ["auto"] if name == "dense" else backends(name):
            with forced(backend):
                tps = prefill_tps(model, 4, 2048, reps=5)
            result["models"][f"{name} {backend}"] = tps
            print(name, backend, f"{tps:.0f} tok/s", flush=True)
        del model
        torch.cuda.empty_cache()
    dense = result["models"]["dense auto"]
    result["models_vs_dense"] = {k: v / dense for k, v in result["models"].items()}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"prefill-layers-{stamp}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result["models_vs_dense"], indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
