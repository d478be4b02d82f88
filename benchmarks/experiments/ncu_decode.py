"""What bounds the few-token kernels (issue 12): each case runs once between cudaProfilerStart/Stop, inside an NVTX
range named after it, so that Nsight Compute profiles exactly those kernels (caches flushed before each pass, so
the weight comes from HBM as in a model).

Run on the GPU machine (Firecracker runtime; ncu leaves the clocks alone with ``--clock-control none``):
  ncu --profile-from-start off --clock-control none --nvtx --set full -o REPORT \
      python3 benchmarks/experiments/ncu_decode.py [--cases a,b]
  ncu --import REPORT.ncu-rep --page details > details.txt
  python benchmarks/experiments/ncu_decode.py --summarize details.txt --out DIR   (-> DIR/ncu-decode-<UTC>.json)
``--time`` also times each case with ``do_bench`` (eager, launch included: a check that the cases run, not a speed).

Cases (bf16; shapes of `structmat bench kernels` and the bench-infer Llama):
  dense_<in>x<out>_t<n>    F.linear (cuBLAS)
  nm24_<in>x<out>_t<n>     2:4 decode kernel (byte-permute kernel at one token, sparse tensor cores at 16; positions
                           packed as the layers store them since session 15: this script passed one uint8 per value
                           until session 16)
  lr<r>_<in>x<out>_t<n>    low-rank decode kernels (one token: the PDL pair, as captured; above: the gemv pair)
  lrcublas<r>_..._t<n>     low-rank as two cuBLAS GEMMs (the dispatch's choice above ~4 MB of second stage)
  model:<name>             (``--models``) one forward of one token through a one-block bench-infer Llama
                           (``structmat.bench.infer.build``: dense, lowrank+fused, ...), every kernel of it
A rank that is not a multiple of 8 (819 in session 14's first round) leaves the factors' rows unaligned: Triton then
loads the weight 2 bytes at a time (no vectorized loads, 95 registers instead of 61 for the fused gate/up second
stage), which is not what the bench's ranks (multiples of 8) run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
from pathlib import Path

import _common  # noqa: F401  (src on the path)
import torch
import torch.nn.functional as F

DTYPE = torch.bfloat16


def _nm_operands(out_f: int, in_f: int, gen):
    """2:4 values and their positions, packed as the layers store them (2 bits each: ``pack_positions``)."""
    from structmat.structures.sparse import pack_positions

    vals = torch.randn(out_f, in_f // 2, generator=gen, device="cuda").to(DTYPE) * 0.02
    pos = torch.stack([torch.randperm(4, generator=gen, device="cuda")[:2].sort().values
                       for _ in range(64)])  # a few patterns, tiled (the kernels never assume any)
    pos = pos[torch.randint(0, 64, (out_f * in_f // 4,), generator=gen, device="cuda")].reshape(out_f, -1)
    return vals, pack_positions(pos.to(torch.uint8), 2).contiguous()


def cases(gen):
    from structmat.kernels import decode

    out = {}
    shapes = [(2048, 8192), (8192, 2048), (4096, 4096)]
    for in_f, out_f in shapes:
        w = torch.randn(out_f, in_f, generator=gen, device="cuda").to(DTYPE) * 0.02
        vals, pos = _nm_operands(out_f, in_f, gen)
        for n in (1, 16):
            x = torch.randn(n, in_f, generator=gen, device="cuda").to(DTYPE)
            out[f"dense_{in_f}x{out_f}_t{n}"] = (lambda x=x, w=w: F.linear(x, w))
            out[f"nm24_{in_f}x{out_f}_t{n}"] = (lambda x=x, v=vals, p=pos: decode.nm(x, v, p, 2, 4))
    for in_f, out_f, r in ((2048, 8192, 512), (4096, 4096, 1024), (2048, 8192, 816), (8192, 2048, 816)):
        U = torch.randn(out_f, r, generator=gen, device="cuda").to(DTYPE) * 0.02
        V = torch.randn(r, in_f, generator=gen, device="cuda").to(DTYPE) * 0.02
        for n in (1, 16):
            x = torch.randn(n, in_f, generator=gen, device="cuda").to(DTYPE)
            out[f"lr{r}_{in_f}x{out_f}_t{n}"] = (lambda x=x, U=U, V=V: decode.lowrank(x, U, V))
            out[f"lrcublas{r}_{in_f}x{out_f}_t{n}"] = (lambda x=x, U=U, V=V: F.linear(F.linear(x, V), U))
    # the fused low-rank model's gate/up product (two siblings over one input) at one token
    U2 = torch.randn(2, 8192, 816, generator=gen, device="cuda").to(DTYPE) * 0.02
    V2 = torch.randn(2 * 816, 2048, generator=gen, device="cuda").to(DTYPE) * 0.02
    x = torch.randn(1, 2048, generator=gen, device="cuda").to(DTYPE)
    out["lrgateup816_2048x16384_t1"] = lambda: decode.lowrank(x, U2, V2)
    return out


def model_cases(names):
    """One forward of one token (no cache) through a one-block bench-infer Llama of each name."""
    from structmat.bench.infer import SHAPE, build

    out = {}
    for name in names:
        model = build(None if name == "dense" else name, DTYPE, dict(SHAPE, num_hidden_layers=1))
        ids = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        out[f"model:{name}"] = (lambda m=model: m(input_ids=ids, use_cache=False))
    return out


#: Per kernel from the details page: what bounds a few-token kernel (time, DRAM use, occupancy and its limit, issue)
SUMMARY = {"duration_us": "Duration", "dram_pct": "DRAM Throughput", "registers": "Registers Per Thread",
           "waves_per_sm": "Waves Per SM", "achieved_occupancy_pct": "Achieved Occupancy",
           "theoretical_occupancy_pct": "Theoretical Occupancy", "block_limit_registers": "Block Limit Registers",
           "issued_warp_per_scheduler": "Issued Warp Per Scheduler"}


def summarize(details: str) -> list[dict]:
    """The kernels of an ``ncu --page details`` listing, each with its case (NVTX range), grid, block and SUMMARY."""
    lines = details.split("\n")
    head = re.compile(r"^  (\S.*?) \((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\), Context")
    starts = [i for i, line in enumerate(lines) if head.match(line)] + [len(lines)]
    out = []
    for a, b in zip(starts, starts[1:]):
        m = head.match(lines[a])
        row = {"kernel": m.group(1)[:80], "grid": [int(m.group(i)) for i in (2, 3, 4)],
               "block": [int(m.group(i)) for i in (5, 6, 7)], "case": None}
        for line in lines[a:b]:
            nv = re.search(r"<\d+,(.*)>", line)
            if nv and row["case"] is None:
                row["case"] = nv.group(1)
            for key, label in SUMMARY.items():
                if key not in row and re.match(r"\s+" + re.escape(label) + r"\s", line):
                    try:
                        row[key] = float(line.split()[-1].replace(",", ""))
                    except ValueError:
                        pass
        out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--summarize", default="", help="an ncu details page to summarize (no GPU run)")
    ap.add_argument("--out", default=".", help="where --summarize writes ncu-decode-<UTC>.json")
    ap.add_argument("--measured", default="", help="with --summarize: when and by what the listing was made")
    ap.add_argument("--cases", default="", help="comma-separated names or prefixes (default: all)")
    ap.add_argument("--models", default="", help="comma-separated bench-infer models (model:<name> cases only)")
    ap.add_argument("--time", action="store_true", help="also time each case (no ncu): do_bench, L2 flushed")
    args = ap.parse_args()
    if args.summarize:
        from structmat.eval.results import write_json

        rows = summarize(Path(args.summarize).read_text())
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = Path(args.out) / f"ncu-decode-{stamp}.json"
        write_json(path, {"source": Path(args.summarize).name, "measured": args.measured, "device": "NVIDIA H200 (ncu, --clock-control none, "
                          "caches flushed before each pass)", "kernels": rows})
        print(json.dumps(rows[:3], indent=1), f"... {len(rows)} kernels -> {path}")
        return 0
    from structmat.kernels import decode

    gen = torch.Generator(device="cuda").manual_seed(0)
    with decode.captured_form():  # one token: the PDL pair the captured step runs (eager calls take one grid)
        todo = model_cases(args.models.split(",")) if args.models else cases(gen)
        want = [c for c in args.cases.split(",") if c]
        names = [k for k in todo if not want or any(k.startswith(c) for c in want)]
        for name in names:  # compile and plan outside the profiled range
            with torch.no_grad():
                todo[name]()
                todo[name]()
        torch.cuda.synchronize()
        if args.time:
            for name in names:
                ms = _common.bench(todo[name])
                print(f"{name:32s} {ms * 1e3:8.2f} us (do_bench, L2 flushed, with launch)", flush=True)
        torch.cuda.profiler.start()
        for name in names:
            torch.cuda.nvtx.range_push(name)
            with torch.no_grad():
                todo[name]()
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()
        torch.cuda.profiler.stop()
    print("cases:", ",".join(names), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
