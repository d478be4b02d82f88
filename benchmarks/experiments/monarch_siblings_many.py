"""Monarch siblings at many tokens (issue 12, session 21): q/k/v (and gate/up) as one grouped product.

The Monarch model's prefill (4x2048, bf16) missed 1.3x dense (1.17x eager, 1.26x compiled): its GEMMs ran at 1.48x
dense's, and the thin attention projections (2048^2 at nb=4, ratio 0.5: K = 512 in both stages) at only 1.16-1.23x.
``ops.monarch_siblings`` runs the fused siblings' stacks as two grouped launches for all members (stage 1 three
times as wide, stage 2 three times the groups). Prediction: q/k/v 1.2x -> 1.45-1.6x dense per member-equivalent;
gate/up unchanged within 5% (cuBLAS there, the same GEMMs); the model's prefill -0.4 to -0.6 ms per forward.

Per sibling set of the bench model (its exact Monarch spec) at ``--tokens``: GPU ms (``triton.testing.do_bench``)
of dense (the members' F.linear each, and one F.linear on the stacked weight), the members each through their own
``auto`` path (``ops.monarch`` on the engine ``auto`` picks), and the grouped product on each engine; then the
Monarch model's eager prefill unfused and fused (``structmat.fuse_siblings``), interleaved, against dense's.

    PYTHONPATH=src python benchmarks/experiments/monarch_siblings_many.py --out DIR [--tokens 8192]

Writes ``monarch-siblings-many-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch
import torch.nn.functional as F


def set_row(members: int, in_f: int, out_f: int, tokens: int, dev, dt) -> dict:
    from triton.testing import do_bench

    import structmat
    from structmat.bench.infer import STRUCTURES
    from structmat.kernels import dispatch, ops
    from structmat.structures import build as build_layer

    torch.manual_seed(0)
    layers = [build_layer(STRUCTURES["monarch"], in_f, out_f, bias=False).to(dev, dt).eval() for _ in range(members)]
    dense = [m.to_dense().detach().to(dt) for m in layers]
    stacked = torch.cat(dense, 0)
    x = torch.randn(tokens, in_f, device=dev, dtype=dt)
    row: dict = {"spec": str(layers[0].spec), "members": members}
    with torch.no_grad():
        row["dense_each_ms"] = do_bench(lambda: [F.linear(x, w) for w in dense], rep=200)
        row["dense_stacked_ms"] = do_bench(lambda: F.linear(x, stacked), rep=200)
        want = F.linear(x, stacked).float()
        for m in layers:
            m(x)
        row["auto_choice"] = dispatch.LAST_CHOICE.get("monarch")
        row["auto_each_ms"] = do_bench(lambda: [m(x) for m in layers], rep=200)
        names = ("q_proj", "k_proj", "v_proj") if members == 3 else ("gate_proj", "up_proj")
        group = structmat.fuse_siblings(torch.nn.ModuleDict(dict(zip(names, layers))), gated_mlp=False)[0]
        R, L = group.stacks
        for engine in ("triton", "cublas"):
            y = ops.monarch_siblings(x, R, L, members, engine)
            row[f"grouped_{engine}_max_rel_err"] = float((y.float() - want).abs().max() / want.abs().max())
            row[f"grouped_{engine}_ms"] = do_bench(lambda: ops.monarch_siblings(x, R, L, members, engine), rep=200)
    base = row["dense_each_ms"]
    row["vs_dense_each"] = {k[:-3]: base / v for k, v in row.items() if k.endswith("_ms")}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from structmat.bench.infer import SHAPE, build, prefill_tps

    dev, dt = torch.device("cuda"), torch.bfloat16
    h, f = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    result: dict = {"device": torch.cuda.get_device_name(), "tokens": args.tokens, "sets": {}, "models": {}}
    for label, (members, in_f, out_f) in {"qkv": (3, h, h), "gate_up": (2, h, f)}.items():
        row = set_row(members, in_f, out_f, args.tokens, dev, dt)
        result["sets"][label] = row
        print(label, json.dumps(row), flush=True)
    dense, unfused, fused = (build(name, dt, SHAPE) for name in (None, "monarch", "monarch+fused"))
    for rnd in range(args.rounds):  # (interleaved: the host drifts between rounds)
        for name, model in (("dense", dense), ("monarch", unfused), ("monarch+fused", fused)):
            result["models"].setdefault(name, []).append(prefill_tps(model, 4, 2048, reps=5))
        print("round", rnd, {k: round(v[-1]) for k, v in result["models"].items()}, flush=True)
    best = {k: max(v) for k, v in result["models"].items()}
    result["models_vs_dense"] = {k: v / best["dense"] for k, v in best.items()}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"monarch-siblings-many-{stamp}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result["models_vs_dense"], indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
