"""The CUDA kernel's build environment moved to src/training/cuda_env.py (the training preflight checks the
toolchain before a run, and diagnostics sits above training); this name keeps the GPU check's imports working."""
from src.training.cuda_env import (
    DEFAULT_ARCH,
    cuda_build_env,
    default_toolkit_roots,
    find_cuda_home,
    gpu_compute_capability,
)

__all__ = ["DEFAULT_ARCH", "cuda_build_env", "default_toolkit_roots", "find_cuda_home", "gpu_compute_capability"]
