#!/usr/bin/env bash
# GPU check of the trainer in one command (under 8 minutes on one H100/H200), writing docs/gpu_check.md:
# CUDA WKV6 kernel build, cuda/fla vs torch backend accuracy, backend timing, 20 training steps at RWKV6-1.6B
# shapes (Bone-row, Bone-col, LoRA; grad_cp 0/1) and one DeepSpeed ZeRO-2 step through train.py.
#
#   bash scripts/gpu_check.sh                 # on a GPU machine
#   bash scripts/gpu_check.sh --dry-run       # on CPU: every section at tiny sizes, CUDA-only ones skipped
#
# Needs a CUDA build of torch and ninja for the kernel. CUDA_HOME (the real toolkit root, not the directory of
# a wrapper nvcc) and TORCH_CUDA_ARCH_LIST (the GPU's compute capability) get defaults when unset.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=${WANDB_MODE:-disabled}
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
