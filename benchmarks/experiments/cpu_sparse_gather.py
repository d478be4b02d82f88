"""Can 2:4 decode on a CPU beat its reference (a tile of the weight rebuilt per call, then a dense GEMM) without a
dense copy (issue 12, session 19)? Per layer, float32, SmolLM2's shapes, 1 / 4 / 16 tokens, microseconds per call
(the best of 5 loops): ``nn.Linear``; the layer (its reference); the kept inputs gathered (positions unpacked in
int32, ``index_select``, one contraction with the values: reads no dense tile but makes a tokens x out x kept
temporary); and that gather compiled by inductor (one C++ loop). Each is checked against the layer's output.

    PYTHONPATH=src python benchmarks/experiments/cpu_sparse_gather.py [--out DIR]

Writes ``cpu-sparse-gather-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import time
from pathlib import Path

import _common  # noqa: F401  (puts src/ on the path)
import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (576, 1536), (1536, 576)]
TOKENS = [1, 4, 16]


def gather_nm(x, values, packed, n: int, m: int):
    from structmat.structures.sparse import position_bits

    out, kept = values.shape
    bits = position_bits(m)
    shifts = torch.arange(8 // bits, dtype=torch.int32, device=x.device) * bits
    pos = ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & (m - 1)).view(out, -1)[:, :kept]
    cols = pos + torch.arange(kept, dtype=torch.int32, device=x.device) // n * m
    xp = F.pad(x, (0, kept // n * m - x.shape[1]))
    picked = xp.index_select(1, cols.reshape(-1)).view(x.shape[0], out, kept)
    return torch.einsum("tok,ok->to", picked, values)


def best_us(fn, calls: int = 100, loops: int = 5) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(loops):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    import structmat
    from structmat.eval.results import run_info, write_json

    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 4 * len(SHAPES) * len(TOKENS)  # one static graph per case
    compiled = torch.compile(gather_nm, dynamic=False)
    rows = []
    for i, o in SHAPES:
        linear = torch.nn.Linear(i, o, bias=False)
        layer = structmat.build("nm:n=2,m=4", i, o, bias=False).eval()
        args_nm = (layer.values, layer.index, layer.n, layer.m)
        for tokens in TOKENS:
            x = torch.randn(tokens, i)
            with torch.no_grad():
                ref = layer(x)
                start = time.perf_counter()
                fused = compiled(x, *args_nm)
                compile_s = time.perf_counter() - start
                for name, got in (("gather", gather_nm(x, *args_nm)), ("compiled", fused)):
                    if not torch.allclose(got, ref, rtol=1e-4, atol=1e-4):
                        raise RuntimeError(f"{name} differs at {i}->{o}, {tokens} tokens")
                row = {"shape": [i, o], "tokens": tokens, "dense_us": best_us(lambda: linear(x)),
                       "reference_us": best_us(lambda: layer(x)),
                       "gather_us": best_us(lambda: gather_nm(x, *args_nm)),
                       "compiled_gather_us": best_us(lambda: compiled(x, *args_nm)), "compile_s": compile_s}
            rows.append(row)
            print(f"{i}->{o} {tokens:2d} tokens: dense {row['dense_us']:.0f} us, reference "
                  f"{row['reference_us'] / row['dense_us']:.1f}x, gather {row['gather_us'] / row['dense_us']:.1f}x, "
                  f"compiled gather {row['compiled_gather_us'] / row['dense_us']:.1f}x dense's time", flush=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = write_json(Path(args.out) / f"cpu-sparse-gather-{stamp}.json",
                      {"info": run_info(vars(args)), "threads": torch.get_num_threads(),
                       "load_average": os.getloadavg(), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
