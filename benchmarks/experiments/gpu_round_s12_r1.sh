#!/usr/bin/env bash
# Session 12, GPU round 1 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s12_r1.sh
# Predicted: (a) the 2:4 expanded-tile kernel at 2-16 tokens is bound by one HBM load latency per iteration (16
# iterations a program at all three bench shapes, 15.5-17.4 us); with 2-4 tiles in flight (NM_DEPTH) it should fall
# toward the bytes' time (24 MB at 2048->8192: ~7-9 us); (b) low-rank above one token, its first stage split and
# summed in the kernel (MULTI_TOKEN_REDUCE), should beat the unsplit stage 1 (32 programs at rank 512) and the two
# cuBLAS calls (8.5 us at 2048->8192 rank 512, 16 tokens). The GPU tests (session 11's last commit was not run on
# a GPU), the new forms against float64 at depth 4, the per-layer candidates at 2-64 tokens.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gpu-tests 240 python3 -m pytest -q -x -m gpu tests/test_inference.py
step depth4 120 python3 -c "
import sys; sys.path.insert(0, 'tests')
import torch
from test_inference import decode_errors, DECODE_SHAPES, TOL
from structmat.kernels import _triton_decode as TD
shapes = {k: v for k, v in DECODE_SHAPES.items() if k.startswith('nm')}
shapes['nm_big'] = (2048, 2048, dict(n=2, m=4)); shapes['nm_tall'] = (2048, 8192, dict(n=2, m=4))
for d in (2, 3, 4):
    TD.NM_DEPTH[0] = d; TD.clear_plans()
    for dt in ('bfloat16', 'float32'):
        e = decode_errors('cuda', getattr(torch, dt), shapes, (2, 4, 16, 33, 64))
        e.update({'act-' + k: v for k, v in decode_errors('cuda', getattr(torch, dt), shapes, (4, 16), act=True).items()})
        bad = {k: v for k, v in e.items() if not v <= TOL[dt]}
        print('depth', d, dt, 'max', max(e.values()), 'bad', bad, flush=True)
"
step layers 300 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures nm24,lowrank,monarch \
  --tokens 2,4,16,64 --variants-only decode@d1,decode@d2,decode@d3,decode@d4,decode@d4min1,decode@d4bm32
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
