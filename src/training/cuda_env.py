"""The build environment of the CUDA WKV6 kernel (used by the training preflight and the GPU check): where the
CUDA toolkit really is, the GPU's compute capability, and an environment with defaults for CUDA_HOME and
TORCH_CUDA_ARCH_LIST where they are unset.

The `nvcc` on PATH may be a wrapper script: pointing CUDA_HOME at its folder fails the link with
`cannot find -lcudart`, so the wrapper is followed to the real toolkit root. Everything here reads the
environment only from the mapping it is given.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

DEFAULT_ARCH = "9.0"  # H100/H200


def default_toolkit_roots() -> list[Path]:
    """/usr/local/cuda, then the /usr/local/cuda-* folders, newest name first."""
    return [Path("/usr/local/cuda")] + sorted(Path("/usr/local").glob("cuda-*"), reverse=True)


def find_cuda_home(nvcc_on_path: str | None, roots: Sequence[Path] | None = None) -> str | None:
    """The CUDA toolkit root (has bin/nvcc and the cudart library): the first of `roots` (default
    `default_toolkit_roots()`) that is one, else the toolkit of the `nvcc` on PATH, following a wrapper script
    (`exec /x/bin/nvcc "$@"`) to the real one."""
    candidates = list(default_toolkit_roots() if roots is None else roots)
    if nvcc_on_path:
        real = Path(nvcc_on_path).resolve()
        candidates.append(real.parent.parent)
        if real.is_file() and real.stat().st_size < 100_000:
            text = real.read_bytes().decode("utf-8", errors="replace")
            candidates += [Path(m).parent.parent for m in re.findall(r"(/\S+/bin/nvcc)\b", text)]
    for root in candidates:
        libs = list(root.glob("lib64/libcudart.so*")) + list(root.glob("lib/libcudart.so*")) + \
            list(root.glob("targets/*/lib/libcudart.so*"))
        if (root / "bin" / "nvcc").is_file() and libs:
            return str(root)
    return None


def gpu_compute_capability(environ: Mapping[str, str]) -> str | None:
    """"9.0" for an H100/H200 (";"-joined when the GPUs differ), from the nvidia-smi on environ's PATH; None
    without one."""
    smi = shutil.which("nvidia-smi", path=environ.get("PATH"))
    if smi is None:
        return None
    proc = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True,
                          timeout=30, env=dict(environ))
    caps = sorted({line.strip() for line in proc.stdout.splitlines() if re.fullmatch(r"\d+\.\d+", line.strip())})
    return ";".join(caps) if proc.returncode == 0 and caps else None


def cuda_build_env(environ: Mapping[str, str]) -> dict[str, str]:
    """environ plus defaults for CUDA_HOME (the real toolkit root) and TORCH_CUDA_ARCH_LIST (the GPU's compute
    capability, else DEFAULT_ARCH) where they are unset."""
    env = dict(environ)
    if not env.get("CUDA_HOME"):
        home = find_cuda_home(shutil.which("nvcc", path=env.get("PATH")))
        if home:
            env["CUDA_HOME"] = home
    if not env.get("TORCH_CUDA_ARCH_LIST"):
        env["TORCH_CUDA_ARCH_LIST"] = gpu_compute_capability(env) or DEFAULT_ARCH
    return env
