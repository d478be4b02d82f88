#!/usr/bin/env bash
# Session 11, GPU round 8 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s11_r8.sh
# The fused 2:4 model's down product at one token formed SiLU(gate) * up inside the row kernel for every value it
# gathered (sm_90 SASS: 32 instructions a value against 15 without): now a small kernel forms it once into the
# plan's scratch and the row kernel reads it (NM_ROW_GATE_FIRST, STRUCTMAT_NM_GATE_FIRST=0 for the old form).
# Predicted: the fused model's compiled batch-1 step 2-5% faster (1.18x -> 1.20-1.24x dense). The GPU tests (act
# forms against float64), then the batch-1 steps, captured and compiled, with the old form and the new.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step gpu-tests 150 python3 -m pytest -q -x -m gpu tests/test_inference.py \
  -k "(decode_kernels_match_reference_gpu and bfloat16) or repeats_bit_for_bit or direct_launch"
STRUCTMAT_NM_GATE_FIRST=0 step floor-old 90 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" \
  --models dense,nm24+fused --graph-batches 1 --eager-models "" --generate-models "" --step-compile dense,nm24+fused
step floor-new 90 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" \
  --models dense,nm24+fused --graph-batches 1 --eager-models "" --generate-models "" --step-compile dense,nm24+fused
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
