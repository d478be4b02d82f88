#!/usr/bin/env bash
# Session 10, GPU round 2 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s10_r2.sh
# Round 1 measured the expanded-tile N:M kernel (general form) at 0.1-0.2x dense: latency-bound (its weight loads
# feed elementwise code, so Triton does not pipeline them) and scalar loads. Here its 2:4 form (contiguous tiles split
# into slots, the next tile's values loaded while this one is multiplied):
#   1. GPU tests of the decode kernels against float64;
#   2. 2:4 per layer at 1-64 tokens, the forms and tiles beside the gather kernel and dense (decode_layers.py);
#   3. fused Monarch prefill beside unfused and dense, with kernel profiles (prefill_fused.py; its files did not come
#      back from round 1: more than 8 files, so this round packs everything into one archive);
#   4. the captured decode step at batch 1, 8, 32 of dense and 2:4 (decode_floor.py).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gpu-tests 150 python3 -m pytest -q -x -m gpu tests/test_inference.py -k "decode_kernels_match_reference_gpu"
step nm-layers 150 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --structures nm24 \
  --tokens 1,2,4,8,16,64
step prefill 110 python3 benchmarks/experiments/prefill_fused.py --out "$OUT/12" --models dense,monarch,monarch+fused
step floor 150 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense,nm24,nm24+fused \
  --graph-batches 1,8,32 --eager-models "" --generate-models ""
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
