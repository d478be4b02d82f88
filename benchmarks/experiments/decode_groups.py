"""Per-group decode cost (issue 12): the products one decode step of the bench-infer model runs per block once its
siblings are fused (``structmat.fuse_siblings``), at one token, cold from HBM, under launch variants of the
one-launch two-stage kernel.

Run on the GPU machine:  ``PYTHONPATH=src python benchmarks/experiments/decode_groups.py --out DIR``

Per structure (low-rank and Monarch at 50%, block-diagonal nb=4, 2:4, and dense), the four products of a block:
``qkv`` (three 2048x2048 siblings, one product), ``gate_up`` (two 2048->8192), ``o`` (2048x2048) and ``down``
(8192->2048), each timed as ``decode_layers.py`` times a layer (a CUDA graph cycling through copies whose weights
exceed 256 MB, so every call reads from HBM). Dense runs ``F.linear`` on the stacked weight (the fair fused
baseline). For low-rank and Monarch every variant in ``VARIANTS`` (tile budget, warps, K splits of stage 1,
pipeline stages) is timed too: the sum over a block's four products, times 8 layers, is what the variant changes
in the compiled decode step.
Writes ``decode-groups-<UTC>.json`` after every structure.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
import time
import traceback
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch
import torch.nn.functional as F
from decode_layers import COLD_BYTES, cycle, graph_us
from decode_layers import variant as apply

DTYPE = torch.bfloat16
DEVICE = "cuda"
SPECS = {"lowrank": "lowrank:ratio=0.5", "monarch": "monarch:nblocks=4,ratio=0.5", "blockdiag": "blockdiag:nblocks=4",
         "nm24": "nm:n=2,m=4", "dense": "dense"}
GROUPS = {"qkv": (3, 2048, 2048), "gate_up": (2, 2048, 8192), "o": (1, 2048, 2048), "down": (1, 8192, 2048)}
#: name -> settings of structmat.kernels._triton_decode (FUSED_TILE, FUSED_WARPS, FUSED_MAX_SPLITS, num_stages)
VARIANTS = {"base": {}, "tile4k": dict(FUSED_TILE=4096), "tile16k": dict(FUSED_TILE=16384),
            "w8": dict(FUSED_WARPS=8), "w2": dict(FUSED_WARPS=2), "splits4": dict(FUSED_MAX_SPLITS=4),
            "splits16": dict(FUSED_MAX_SPLITS=16), "st2": dict(num_stages=2),
            "tile16k-w8": dict(FUSED_TILE=16384, FUSED_WARPS=8),
            # (session 20, above one token) low-rank's PDL pair only up to 4 MB of second stage, whatever its rank
            "pair4mb": dict(PDL_DOT_NARROW_MAX_BYTES=0)}


class Siblings(torch.nn.Module):
    def __init__(self, spec: str, g: int, inp: int, out: int) -> None:
        super().__init__()
        from structmat.structures import build

        names = ("q_proj", "k_proj", "v_proj") if g == 3 else ("gate_proj", "up_proj") if g == 2 else ("o_proj",)
        for name in names:
            setattr(self, name, build(spec, inp, out, bias=False, device=DEVICE, dtype=DTYPE).init_())
        self.names = names


def runner(spec: str, g: int, inp: int, out: int, x: torch.Tensor):
    """(one product of the group for x, weight bytes): the fused group's planned call, or the single layer's
    decode plan (dense: F.linear on the stacked weight)."""
    from structmat import siblings
    from structmat.kernels import dispatch

    mod = Siblings(spec, g, inp, out)
    layers = [getattr(mod, n) for n in mod.names]
    nbytes = sum(t.numel() * t.element_size() for m in layers for t in [*m.parameters(), *m.buffers()])
    if g > 1:
        (group,) = siblings.fuse_siblings(mod)
        run = group._planned(x)
        return (lambda: run(x)), nbytes
    layer = layers[0]
    if layer.name == "dense":
        W = layer.weight
        return (lambda: F.linear(x, W)), nbytes
    dispatch._GRAPHED[0] = True  # as a captured call decides
    try:
        with torch.no_grad():
            layer(x)
        plan = next(iter(layer._plans.values()))
    finally:
        dispatch._GRAPHED[0] = None
    return (lambda: plan(x, *[t for n, t in [*layer.named_parameters(), *layer.named_buffers()] if n != "bias"])
            if layer.name != "nm" else plan(x, layer.values, layer.index, layer.n, layer.m)), nbytes


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--structures", default=",".join(SPECS))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="for low-rank and Monarch")
    ap.add_argument("--tokens", type=int, default=1, help="tokens per product (session 20: above one token too)")
    args = ap.parse_args()
    from structmat.eval.results import run_info, write_json

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"decode-groups-{stamp}.json"
    rep: dict = {"rows": [], "errors": [], "cold_bytes": COLD_BYTES, "tokens": args.tokens}
    t0 = time.time()
    torch.manual_seed(0)
    with torch.no_grad():
        for s in args.structures.split(","):
            variants = args.variants.split(",") if s in ("lowrank", "monarch") else ["base"]
            for v in variants:
                undo = apply(VARIANTS[v])
                try:
                    total = 0.0
                    for gname, (g, inp, out) in GROUPS.items():
                        x = torch.randn(args.tokens, inp, device=DEVICE, dtype=DTYPE)
                        fn, nbytes = runner(SPECS[s], g, inp, out, x)
                        k = int(min(128, max(2, math.ceil(COLD_BYTES / nbytes))))
                        copies = [fn] + [runner(SPECS[s], g, inp, out, x)[0] for _ in range(k - 1)]
                        us = graph_us(cycle(copies))
                        total += us
                        rep["rows"].append(dict(structure=s, variant=v, group=gname, members=g, inp=inp, out=out,
                                                weight_bytes=nbytes, copies=k, cold_us=us,
                                                cold_gbs=nbytes / us * 1e-3))
                        print(f"{s:9s} {v:10s} {gname:8s} {us:7.1f} us {nbytes / us * 1e-3:7.0f} GB/s", flush=True)
                        del copies, fn
                    rep["rows"].append(dict(structure=s, variant=v, group="block", cold_us=total))
                    print(f"{s:9s} {v:10s} block    {total:7.1f} us", flush=True)
                except Exception:
                    rep["errors"].append({"case": f"{s}-{v}", "trace": traceback.format_exc()[-2000:]})
                    traceback.print_exc()
                finally:
                    undo()
                torch.cuda.empty_cache()
            rep["seconds"] = time.time() - t0
            rep["run_info"] = run_info(vars(args), device="cuda")
            write_json(path, rep)
    print(f"wrote {path} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
