#!/usr/bin/env bash
# GPU check of the trainer in one command (under 8 minutes on one H100/H200), writing docs/gpu_check.md:
# CUDA WKV6 kernel build, cuda/fla vs the fp32 torch backend (outputs and every gradient), one DeepSpeed ZeRO-2
# bf16 Bone-row step of the 1.6B preset through train.py at RWKV6-1.6B shapes, LoRA vs Bone tokens/s and peak
# memory at the Bone paper's Table 7 setting (1.6B shapes, ctx 512, batch 1) beside the paper's numbers, and
# WKV backend timing.
#
#   bash scripts/gpu_check.sh                 # on a GPU machine
#   bash scripts/gpu_check.sh --dry-run       # on CPU: every section at tiny sizes, CUDA-only ones skipped
#
# Needs a CUDA build of torch and ninja for the kernel. CUDA_HOME (the real toolkit root, not the directory of
# a wrapper nvcc) and TORCH_CUDA_ARCH_LIST (the GPU's compute capability) get defaults when unset.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=${WANDB_MODE:-disabled}
exec "${PYTHON:-python}" -m scripts.gpu_check "$@"
