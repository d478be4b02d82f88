"""2:4 prefill (issue 12, session 21): how large the rebuilt weight tiles should be, and what the ``cat`` cost.

Session 20 measured the 2:4 model's eager prefill (4x2048, bf16) at 0.67x dense after one Triton expansion per tile;
the GPU side predicted 0.85-0.95x (dense-sized GEMMs, an expansion writing each tile, a ``cat`` of the tiles'
outputs), so the rest was thought to be host time: per tile a Triton launch through its binding (now past it:
``_launch.LaunchCache``) and a GEMM, then the ``cat`` (now each GEMM writes its output columns). For each block
linear of the bench model (its exact 2:4 spec) at 8192 tokens, per tile fraction (``sparse.TILE_WEIGHT_FRACTION``):
GPU ms (``triton.testing.do_bench``) and host us per call (the host's time to issue 20 calls, no sync inside) of

  ``slices``  the inference path now (``kernels.ops.nm``: tiles' GEMMs into their output columns)
  ``cat``     the same tiles' outputs concatenated (the path before this session)
  ``dense``   ``F.linear`` on the dense weight

then the whole 2:4 model's eager prefill (``structmat.bench.infer.prefill_tps``) per fraction against dense's, in
the same process.

    PYTHONPATH=src python benchmarks/experiments/nm_prefill_tiles.py --out DIR [--fractions 0.25,0.5,1]

Writes ``nm-prefill-tiles-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import json
import time

import _common  # (puts src/ on the path)
import torch
import torch.nn.functional as F


def host_us(fn, calls: int = 20) -> float:
    """Host microseconds to issue one call (best of 5 loops of ``calls``; the GPU drained before each loop)."""
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    torch.cuda.synchronize()
    return best


def layer_row(in_f: int, out_f: int, tokens: int, fractions: list, dev, dt) -> dict:
    from triton.testing import do_bench

    from structmat.bench.infer import STRUCTURES
    from structmat.kernels import _triton_nm_expand, ops
    from structmat.structures import build as build_layer
    from structmat.structures import sparse

    torch.manual_seed(0)
    layer = build_layer(STRUCTURES["nm24"], in_f, out_f, bias=False).to(dev, dt).eval()
    values, index = layer.values.detach(), layer.index
    x = torch.randn(tokens, in_f, device=dev, dtype=dt)
    w = layer.to_dense().detach().to(dt)
    want = F.linear(x, w)

    def cat():
        return torch.cat([F.linear(x, _triton_nm_expand.nm_expand(values[lo:hi], index[lo:hi], 2, 4))
                          for lo, hi in sparse._row_blocks(out_f, in_f, tokens)], dim=1)

    def slices():
        return ops.nm(x, values, index, 2, 4)

    row = {"dense_ms": do_bench(lambda: F.linear(x, w), rep=200), "dense_host_us": host_us(lambda: F.linear(x, w))}
    with torch.no_grad():
        for frac in fractions:
            sparse.TILE_WEIGHT_FRACTION = frac
            got = slices()
            row[f"{frac} tiles"] = len(sparse._row_blocks(out_f, in_f, tokens))
            row[f"{frac} max_abs_err"] = float((got.float() - want.float()).abs().max())
            row[f"{frac} cat_equal"] = bool(torch.equal(cat(), got))
            for name, fn in (("slices", slices), ("cat", cat)):
                row[f"{frac} {name}_ms"] = do_bench(fn, rep=200)
                row[f"{frac} {name}_host_us"] = host_us(fn)
                row[f"{frac} {name}_vs_dense"] = row["dense_ms"] / row[f"{frac} {name}_ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--fractions", default="0.25,0.5,1")
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    from structmat.bench.infer import SHAPE, build, prefill_tps
    from structmat.structures import sparse

    dev, dt = torch.device("cuda"), torch.bfloat16
    h, f = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    fractions = [float(v) for v in args.fractions.split(",")]
    result: dict = {"device": torch.cuda.get_device_name(), "tokens": args.tokens, "fractions": fractions,
                    "layers": {}, "models": {}}
    saved = sparse.TILE_WEIGHT_FRACTION
    try:
        for label, (in_f, out_f) in {"2048x2048": (h, h), "2048x8192": (h, f), "8192x2048": (f, h)}.items():
            row = layer_row(in_f, out_f, args.tokens, fractions, dev, dt)
            result["layers"][label] = row
            print(label, json.dumps(row), flush=True)
        dense = build(None, dt, SHAPE)
        model = build("nm24", dt, SHAPE)
        for rnd in range(3):  # (interleaved: the host drifts between rounds)
            result["models"].setdefault("dense", []).append(prefill_tps(dense, 4, 2048, reps=5))
            for frac in fractions:
                sparse.TILE_WEIGHT_FRACTION = frac
                result["models"].setdefault(f"nm24 {frac}", []).append(prefill_tps(model, 4, 2048, reps=5))
            print("round", rnd, {k: round(v[-1]) for k, v in result["models"].items()}, flush=True)
    finally:
        sparse.TILE_WEIGHT_FRACTION = saved
    _common.write_prefill_result(result, args.out, "nm-prefill-tiles")


if __name__ == "__main__":
    main()
