"""Output formats and dtypes of merge_bone.py: which format a path means, and which dtypes each format takes."""
from __future__ import annotations

from pathlib import Path

import torch

from src.errors import ConfigError

FORMATS = ("pth", "safetensors", "hf", "gguf", "ai00")
BY_SUFFIX = {".pth": "pth", ".safetensors": "safetensors", ".gguf": "gguf", ".st": "ai00"}
DTYPES = ("fp32", "fp16", "bf16", "q8_0")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# dtypes each format can hold; the first is the default (None: keep the base checkpoint's dtypes)
FORMAT_DTYPES: dict[str, tuple[str | None, ...]] = {
    "pth": (None, "fp32", "fp16", "bf16"),
    "safetensors": (None, "fp32", "fp16", "bf16"),
    "hf": (None, "fp32", "fp16", "bf16"),
    "gguf": ("fp16", "fp32", "bf16", "q8_0"),
    "ai00": ("fp16",),  # Ai00 / web-rwkv load fp16 .st files (its converter writes every tensor in fp16)
}


def format_for(output: Path, fmt: str | None) -> str:
    """The format: --format when given, else from the output's extension (.pth, .safetensors, .gguf, .st), else a
    Hugging Face folder. ConfigError for an unknown format or one that contradicts the extension."""
    guessed = BY_SUFFIX.get(output.suffix.lower(), "hf")
    if fmt is None:
        return guessed
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is unknown; use one of {', '.join(FORMATS)}.")
    if output.suffix.lower() in BY_SUFFIX and guessed != fmt:
        raise ConfigError(f"--format {fmt} does not match the output name {output.name} (a {guessed} file name); "
                          f"change one of them.")
    if fmt != "hf" and output.suffix.lower() not in BY_SUFFIX:
        suffix = next(s for s, f in BY_SUFFIX.items() if f == fmt)
        raise ConfigError(f"--format {fmt} writes a file: name the output *{suffix}.")
    return fmt


def dtype_for(fmt: str, dtype: str | None) -> str | None:
    """The dtype name to write (None: the base checkpoint's own). ConfigError when the format cannot hold it."""
    allowed = FORMAT_DTYPES[fmt]
    if dtype is None:
        return allowed[0]
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is unknown; use one of {', '.join(DTYPES)}.")
    if dtype not in allowed:
        names = ", ".join(d for d in allowed if d)
        raise ConfigError(f"--dtype {dtype} is not available for {fmt} output; it takes {names}"
                          + (" (q8_0 is a GGUF quantisation: write a .gguf)" if dtype == "q8_0" else "") + ".")
    return dtype
