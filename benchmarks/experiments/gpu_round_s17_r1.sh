#!/usr/bin/env bash
# Session 17, GPU round 1 (one H200), issue 12, from the repo root (written in session 17; run in session 19, logs in
# benchmarks/results/logs/s19-round1/):
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s17_r1.sh
# Monarch's many-token forward as one persistent kernel (kernels/_triton_monarch.py, the intermediate in per-program
# L2 scratch; opt-in STRUCTMAT_MONARCH_FUSED=1): its GPU test (every tile setting against float64), then per layer
# at 1024 / 8192 tokens against the two-launch paths and dense (monarch_many.py); round 2 has the model's prefill.
# (Each step compiles the kernel's settings for its shapes' specializations first: the limits allow for it.)
# Predicted: 2048^2 (1.23x with two launches; ~17 of its 76 us move the intermediate through HBM) toward 1.5x;
# 4096^2 (tensor-core bound, 1.77x) no gain; the model's prefill 1.21x toward 1.25x (the 2048<->8192 layers, block
# rank 200, pad each chunk to 208, or to 256 in the settings without a 16-wide tail).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
python3 -c "import triton, torch; print(triton.__version__, torch.__version__)" > "$OUT/versions.txt" 2>&1
step tests 240 python3 -m pytest -q -m gpu tests/test_kernels.py -x -k "monarch_fused"
step many 300 python3 benchmarks/experiments/monarch_many.py --out "$OUT/12" --tokens 1024,8192
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt versions.txt && rm -rf "$OUT/12"
exit 0
