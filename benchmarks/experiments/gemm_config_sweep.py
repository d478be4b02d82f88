"""Is the grouped GEMM's autotune grid leaving Monarch's prefill speed on the table? (issue 12: the Monarch model's
prefill 1.16-1.26x dense, target 1.3x; its thin 2048x2048 layers at nb=4 run 1.16x dense at 8192 tokens, the MLP's
1.5-1.6x, session 19.)

Records every grouped-GEMM launch of a Monarch layer's forward at 8192 tokens (Triton engine forced: 2048x2048 nb=4,
the fused q/k/v group of three, and 4096x4096 nb=4), then times each launch with every config of a wide grid
(tiles 64-256, BLOCK_K 64/128, 4/8 warps, 3-5 stages, within shared memory), against the config the autotuner picks
today and against dense F.linear of the layer's shape. do_bench medians (L2 flushed), bf16. Prediction: the best
config within 5% of today's pick (the grid's 128x128x64 / 128x256x64 already cover the classic Hopper tiles); a win
above 10% on a stage goes into ``_triton_gemm._configs``.

    PYTHONPATH=src python benchmarks/experiments/gemm_config_sweep.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import _common  # noqa: F401  (src on the path)
import torch
import torch.nn.functional as F


def grid_configs(smem: int) -> list[dict]:
    out = []
    for bm in (64, 128, 256):
        for bn in (64, 128, 256):
            for bk in (64, 128):
                for w in (4, 8):
                    for s in (3, 4, 5):
                        if bm * bn > 256 * 128 or (bm * bn >= 128 * 128 and w == 4) or (bm * bn <= 64 * 64 and w == 8):
                            continue
                        if (bm + bn) * bk * 2 * s > smem:
                            continue
                        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    import triton
    from triton.testing import do_bench

    from structmat.kernels import _triton_gemm, dispatch, ops
    from structmat.siblings import fuse_siblings
    from structmat.structures import build as build_layer

    dev, dt = torch.device("cuda"), torch.bfloat16
    smem = torch.cuda.get_device_properties(dev).shared_memory_per_block_optin
    configs = grid_configs(smem - 4096)
    calls: list[tuple] = []
    real = ops.grouped_gemm

    def recording(*a, **k):
        calls.append((a, k))
        return real(*a, **k)

    result: dict = {"device": torch.cuda.get_device_name(), "tokens": args.tokens, "configs": len(configs),
                    "cases": {}}
    t0 = time.time()
    cases = {"monarch 2048x2048 nb=4": (2048, 2048, 1), "monarch q/k/v 3x2048x2048 nb=4 fused": (2048, 2048, 3),
             "monarch 4096x4096 nb=4": (4096, 4096, 1)}
    for label, (in_f, out_f, members) in cases.items():
        torch.manual_seed(0)
        x = torch.randn(args.tokens, in_f, device=dev, dtype=dt)
        layers = torch.nn.ModuleDict({n: build_layer("monarch:nblocks=4", in_f, out_f, bias=False)
                                      for n in ("q_proj", "k_proj", "v_proj")[:members]}).to(dev, dt).eval()
        if members > 1:
            fuse_siblings(layers)
        w = torch.randn(out_f * members, in_f, device=dev, dtype=dt)
        case = {"spec": str(layers[next(iter(layers))].spec), "dense_ms": do_bench(lambda: F.linear(x, w), rep=100)}
        run = (lambda: [m(x) for m in layers.values()])
        with torch.no_grad(), dispatch.use_backend("triton"):
            run()  # plan + autotune
            case["layer_ms"] = do_bench(run, rep=100)
            calls.clear()
            ops.grouped_gemm = recording
            try:
                run()
            finally:
                ops.grouped_gemm = real
        case["layer_vs_dense"] = case["dense_ms"] / case["layer_ms"]
        case["launches"] = []
        for (a, sa, b, sb, c, sc, groups, M, N, K), kw in calls:
            key = (_triton_gemm._bucket(M), N, K, sa[1], sb[1], sc[2], a.dtype, b.dtype, c.dtype,
                   _triton_gemm._precision(a.dtype), a.device.index)
            picked = _triton_gemm._BEST.get(key)
            chunk, chunk_stride = kw.get("chunk", 0), kw.get("chunk_stride", 0)
            kargs = (a, b, c, M, N, K, _triton_gemm._bucket(M), *sa, *sb, *sc, chunk_stride, chunk)
            prec = _triton_gemm._precision(a.dtype)
            flop = 2.0 * groups * M * N * K
            rows = []
            for cfg in configs:
                meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
                grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), groups)

                def launch(cfg=cfg, meta=meta, grid=grid):
                    _triton_gemm._grouped_gemm[grid](*kargs, PRECISION=prec, num_warps=cfg["num_warps"],
                                                     num_stages=cfg["num_stages"], **meta)
                try:
                    ms = do_bench(launch, warmup=5, rep=40)
                except Exception as err:  # out of resources for this config: recorded
                    rows.append(dict(cfg, error=f"{type(err).__name__}"[:80]))
                    continue
                rows.append(dict(cfg, ms=ms, tflops=flop / ms / 1e9))
            ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
            picked_row = next((r for r in ok if picked and all(r[k] == picked.get(k) for k in
                                                                ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps",
                                                                 "num_stages"))), None)
            launch_row = dict(groups=groups, M=M, N=N, K=K, chunk=chunk, picked=picked,
                              picked_ms=(picked_row or {}).get("ms"), best=ok[:5], worst=ok[-1:],
                              errors=sum("error" in r for r in rows))
            if picked_row and ok:
                launch_row["best_vs_picked"] = picked_row["ms"] / ok[0]["ms"]
            case["launches"].append(launch_row)
            print(label, f"g={groups} M={M} N={N} K={K} chunk={chunk}", "picked", picked_row and
                  f"{picked_row['ms'] * 1e3:.1f} us", "best", ok and ok[0], flush=True)
        result["cases"][label] = case
        print(label, json.dumps({k: v for k, v in case.items() if k != "launches"}), f"[{time.time() - t0:.0f}s]",
              flush=True)
        del layers, x, w
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"gemm-config-sweep-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    print("wrote", path)


if __name__ == "__main__":
    main()
