#!/usr/bin/env bash
# Compare PEFT methods on the CPU demo's tiny RWKV6 base with identical data order, steps and learning rate:
# LoRA and PiSSA (r = b/2), Bone-row and Bone-col (b), Bone-unconstrained, Bone-Hadamard, Bone-row with
# b in {16, 32, 64}. Writes loss-curve PNGs and a table to docs/ (see python -m scripts.compare_methods --help).
#
#   bash scripts/compare_methods.sh                          # ~35 min on 2 CPU cores (+6 to pretrain a missing base)
#   bash scripts/compare_methods.sh --steps 300 --seeds 0 1 2
#   bash scripts/compare_methods.sh --micro --work /tmp/cmp --out /tmp/cmp/out   # plumbing check, 2 steps
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=${WANDB_MODE:-disabled}
exec "${PYTHON:-python}" -m scripts.compare_methods "$@"
