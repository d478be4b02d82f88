"""Monarch, low-rank and 2:4 siblings at many tokens (issue 12, session 21): q/k/v (and gate/up) as one product.

The Monarch model's prefill (4x2048, bf16) missed 1.3x dense (1.17x eager, 1.26x compiled): its GEMMs ran at 1.48x
dense's, and the thin attention projections (2048^2 at nb=4, ratio 0.5: K = 512 in both stages) at only 1.16-1.23x.
``ops.monarch_siblings`` runs the fused siblings' stacks as two grouped launches for all members (stage 1 three
times as wide, stage 2 three times the groups). Prediction: q/k/v 1.2x -> 1.45-1.6x dense per member-equivalent;
gate/up unchanged within 5% (cuBLAS there, the same GEMMs); the model's prefill -0.4 to -0.6 ms per forward.
Low-rank (``siblings._lowrank_siblings``: one GEMM over the stacked V, one strided-batched GEMM): 5-10% on q/k/v.
2:4 (``ops.nm`` on the stacked rows: one taller layer, a third of the tile launches): 5-15% on q/k/v.

Per sibling set of the bench model (its exact Monarch spec) at ``--tokens``: GPU ms (``triton.testing.do_bench``)
of dense (the members' F.linear each, and one F.linear on the stacked weight), the members each through their own
``auto`` path, and the group's product (Monarch: on each engine); then each model's eager prefill unfused and fused
(``structmat.fuse_siblings``), interleaved, against dense's.

    PYTHONPATH=src python benchmarks/experiments/siblings_many.py --out DIR [--structures monarch,lowrank,nm24]

Writes ``siblings-many-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import json

import _common  # (puts src/ on the path)
import torch
import torch.nn.functional as F


def set_row(structure: str, members: int, in_f: int, out_f: int, tokens: int, dev, dt) -> dict:
    from triton.testing import do_bench

    import structmat
    from structmat.bench.infer import STRUCTURES
    from structmat.kernels import dispatch, ops
    from structmat.siblings import _lowrank_siblings
    from structmat.structures import build as build_layer

    torch.manual_seed(0)
    layers = [build_layer(STRUCTURES[structure], in_f, out_f, bias=False).to(dev, dt).eval() for _ in range(members)]
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
        row["auto_choice"] = dispatch.LAST_CHOICE.get(layers[0].name)
        row["auto_each_ms"] = do_bench(lambda: [m(x) for m in layers], rep=200)
        names = ("q_proj", "k_proj", "v_proj") if members == 3 else ("gate_proj", "up_proj")
        group = structmat.fuse_siblings(torch.nn.ModuleDict(dict(zip(names, layers))), gated_mlp=False)[0]
        A, B = group.stacks
        if structure == "lowrank":
            variants = {"grouped": lambda: _lowrank_siblings(x, A, B)}
        elif structure == "nm24":  # (the stacked rows as one taller N:M layer: its tiles serve every member)
            variants = {"grouped": lambda: ops.nm(x, A, B, 2, 4)}
        else:
            variants = {f"grouped_{e}": (lambda e=e: ops.monarch_siblings(x, A, B, members, e))
                        for e in ("triton", "cublas")}
        for name, fn in variants.items():
            row[f"{name}_max_rel_err"] = float((fn().float() - want).abs().max() / want.abs().max())
            row[f"{name}_ms"] = do_bench(fn, rep=200)
    base = row["dense_each_ms"]
    row["vs_dense_each"] = {k[:-3]: base / v for k, v in row.items() if k.endswith("_ms")}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--structures", default="monarch,lowrank,nm24")
    args = ap.parse_args()
    from structmat.bench.infer import SHAPE, build, prefill_tps

    dev, dt = torch.device("cuda"), torch.bfloat16
    h, f = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    result: dict = {"device": torch.cuda.get_device_name(), "tokens": args.tokens, "sets": {}, "models": {}}
    structures = args.structures.split(",")
    for structure in structures:
        for label, (members, in_f, out_f) in {"qkv": (3, h, h), "gate_up": (2, h, f)}.items():
            row = set_row(structure, members, in_f, out_f, args.tokens, dev, dt)
            result["sets"][f"{structure} {label}"] = row
            print(structure, label, json.dumps(row), flush=True)
    models = {name: build(name, dt, SHAPE) for name in (None, *structures, *(s + "+fused" for s in structures))}
    for rnd in range(args.rounds):  # (interleaved: the host drifts between rounds)
        for name, model in models.items():
            result["models"].setdefault(name or "dense", []).append(prefill_tps(model, 4, 2048, reps=5))
        print("round", rnd, {k: round(v[-1]) for k, v in result["models"].items()}, flush=True)
    _common.write_prefill_result(result, args.out, "siblings-many")


if __name__ == "__main__":
    main()
