#!/usr/bin/env bash
# Session 14, GPU round 6 (one H200, nothing carried), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s14_r6.sh
# Monarch above one token chosen by stage (dispatch.MONARCH_STAGE_COST; the Triton path allowed at an off-tile block
# rank up to 16 tokens): the GPU tests (dispatch changed: the compiled step must stay one graph on the device's
# torch), Monarch per layer at 2-64 tokens (auto against each path, cold and hot), the rows of `structmat bench
# kernels` under CUDA graphs at 1 / 4 / 16 tokens, and the Monarch models' captured steps at batch 1 and 8 and
# compiled batch-1 step beside dense's, on this tree and on the tree before (old/a = `git archive d1cd3ef src
# benchmarks/experiments`, untracked, carried with the working tree).
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step tests 220 python3 -m pytest -q -m gpu tests/test_inference.py -x -k "one_graph or captured_decode_reads or (decode_kernels_match_reference_gpu and bfloat16) or repeats_bit_for_bit or direct_launch or eager_form"
step layers 150 python3 benchmarks/experiments/decode_layers.py --out "$OUT/12" --no-variants --tokens 2,4,16,32,64 \
  --structures monarch,monarch:nblocks=4,monarch:nblocks=8 --shapes 4096x4096,2048x8192,8192x2048
step kernels 100 python3 -m structmat bench kernels --out "$OUT/12" --graphs --tokens 1,4,16 \
  --shapes 4096x4096,2048x8192,8192x2048 --dtypes bf16 --modes fwd --no-semi --budget-s 90
M=dense,monarch,monarch+fused
step floor 150 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models $M --graph-batches 1,8 \
  --eager-models "" --generate-models "" --step-compile $M
mkdir -p "$OUT/12/old"
step floor_old 150 python3 old/a/benchmarks/experiments/decode_floor.py --out "$OUT/12/old" --models $M \
  --graph-batches 1,8 --eager-models "" --generate-models "" --step-compile $M
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
