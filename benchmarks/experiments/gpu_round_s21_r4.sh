#!/usr/bin/env bash
# Session 21, GPU round 4 (one H200), issue 12, from the repo root:
#   OUT=$OUT bash benchmarks/experiments/gpu_round_s21_r4.sh
# Eager decode (the must-show "eager >= 1.0x dense"): fused members now keep an eager form
# (SiblingGroup.eager_member), fused q/k/v 27.4 -> 20.5 us of host per token on the CPU with launches stubbed;
# prediction on the GPU host (~3.5x slower Python): ~25 us per layer and token less, fused models +2-4% (session 19:
# low-rank 1.03x, Monarch 1.06x, block-diagonal 1.05x, 2:4 0.99x -> all >= 1.0x). siblings_host.py first (real
# launches), then HF generate eager at batch 1, 9 interleaved rounds (the host drifts by +-30% between rounds).
# Session 22: host_costs.py first (per-call host time: primitives, each decode launch through Triton / direct with
# the tensors / direct with their addresses, layers' eager forms with and without addresses, q/k/v and MLP blocks).
# Prediction: passing addresses skips a data_ptr call and a cuPointerGetAttribute per pointer in Triton's launcher,
# ~0.5-1 us each on the lent host: 2-5 us less per launch (4-6 pointers), lowrank's eager layer 28.6 -> 24-26 us
# against nn.Linear's 23.6 (session 9, host-costs-20261204T075901Z.json); unfused eager decode +2-4%. Also eager
# fused 2:4's gated down product forms its input inside the row kernel (one launch; EAGER_GATE_IN_ROW): siblings_host
# times its MLP both ways; fused 2:4 eager 0.99x -> ~1.01x.
STEP_DIR=${OUT:?set OUT}/12
source benchmarks/experiments/_round.sh
step hostcosts 120 python3 benchmarks/experiments/host_costs.py --out "$OUT/12"
step host 60 python3 benchmarks/experiments/siblings_host.py --out "$OUT/12"
step eager 400 python3 benchmarks/experiments/decode_floor.py --out "$OUT/12" --models dense --graph-batches 1 \
  --eager-models "" --generate-models "" --eager-rounds 9 \
  --eager-interleaved dense,lowrank,monarch,blockdiag,nm24,lowrank+fused,monarch+fused,blockdiag+fused,nm24+fused
tar czf "$OUT/round.tgz" -C "$OUT" 12 steps.log gpu.txt && rm -rf "$OUT/12"
exit 0
