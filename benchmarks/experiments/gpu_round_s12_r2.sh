#!/usr/bin/env bash
# Session 12, GPU round 2 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s12_r2.sh
# Round 1: 2-4 tiles in flight made the 2:4 expanded-tile kernel slower (not latency-bound), and prefetching its input
# tile by hand took it out of Triton's pipeline (both dropped); the low-rank first stage summed in its kernel helped
# (2048->8192 at 16 tokens 17.1 -> 14.4 us), Monarch's did not (8192->2048 13.3 -> 14.8: Monarch keeps the split
# summed by stage 2? measured again here). Now: the two-stage products above one token joined by programmatic
# dependent launch (MULTI_TOKEN_PDL), the expanded-tile kernel's unmasked form on whole tiles (NM_EXACT), auto taking
# low-rank's decode kernels at 2+ tokens (provisional cost entry). The GPU tests first.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gpu-tests 200 python3 -m pytest -q -x -m gpu tests/test_inference.py \
  -k "(decode_kernels_match_reference_gpu and bfloat16) or repeats_bit_for_bit or direct_launch or eager_form"
step layers 200 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures nm24,lowrank,monarch \
  --tokens 4,16 --variants-only decode@inexact
step kernels 120 python3 -m structmat.bench.kernels --out "$OUT/12" --graphs --tokens 1,4,16 \
  --shapes 4096x4096,2048x8192,8192x2048 --dtypes bf16 --modes fwd --no-semi --budget-s 90
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
