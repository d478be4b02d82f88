#!/usr/bin/env bash
# Session 7, GPU round 2 (one H200, nothing carried), issue 14's 1B-shape bound, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s7_r2.sh
#   0. each 1B layer shape's whitened projection: its device memory against compress._projection_bytes;
#   1. the GPU tests of offload="all" (peak within the device budget, same model as offload=True);
#   2. the 1B-shaped Llama (hidden 2048, SwiGLU 8192, 16 layers, random bf16 weights as safetensors shards),
#      lowrank@whitened 0.5, 128 x 512 calibration tokens, layer-sequential: offload="all" (its peak against one
#      block + activations, stage by stage), then offload=True (blocks) in the same run for the time and peak beside it.
STEP_DIR=${OUT:?set OUT}/14
source benchmarks/experiments/_round.sh
step projection-peak 60 python3 benchmarks/experiments/projection_peak.py --out "$OUT/14"
step gpu-tests 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_blockwise_memory.py
step llama1b 400 python3 benchmarks/compress_gpu.py --work /tmp/w1b --stages llama1b_all,llama1b \
  --timeouts llama1b_all=250,llama1b=120 --out "$OUT/14"
exit 0
