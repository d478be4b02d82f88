#!/usr/bin/env bash
# Session 24, GPU call C (one H100/H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s24_c.sh
# Call 3's checkpoint row decoded eagerly at 0.58x dense unfused (fused 1.07x; the bench's low-rank 0.93-0.95x):
# ckpt_eager_diag.py compares the reloaded checkpoint with the bench's low-rank model layer by layer (choice, factor
# alignment, host time of one call, kernels per token) and over interleaved generate rounds. Prediction: if the
# interleaved rounds put the checkpoint at ~0.95x, call 3's 0.58x was the host's noise; if they repeat it, the
# layer's call time and kernel list show the path that differs. Then session 22's held-bytes GPU test, which needs
# MiniLM's tokenizer: benchmarks/experiments/devshim.sh makes .devshim/ (carry it).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step ckpt-build 120 python3 benchmarks/infer_checkpoint.py --work /tmp/ckpt --calib-samples 16 --tokenizer-files 100
CK=$(ls -d /tmp/ckpt/compressed/target-* 2>/dev/null | head -1)
step diag 240 python3 benchmarks/experiments/ckpt_eager_diag.py --checkpoint "${CK:-/tmp/ckpt/none}" --out "$OUT/12"
step heldtest 200 env PYTHONPATH="$PWD/src:$PWD/.devshim" python3 -m pytest -q -p no:warnings -m gpu \
  tests/test_generate.py
rm -rf "$OUT/12"; exit 0
