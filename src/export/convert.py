"""The one entry merge_bone.py calls: merge (or unmerge, or only convert) and write any output format."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from src.adapters.config import AdapterConfig
from src.adapters.export import check_output_path, merge_checkpoint_file, open_merged, write_checkpoint
from src.errors import ConfigError
from src.export.ai00 import write_ai00
from src.export.formats import TORCH_DTYPES, dtype_for, format_for
from src.export.gguf import write_gguf
from src.export.hf import write_hf
from src.export.layout import model_sizes


@dataclass(frozen=True)
class ExportSummary:
    cfg: AdapterConfig | None
    changed: list[str]  # tensor names the adapter changed, added or removed
    output: Path
    format: str
    dtype: str | None  # None: the base's own dtypes
    notes: list[str] = field(default_factory=list)


def export_model(base_path: str | Path, adapter_path: str | Path | None, output_path: str | Path, *,
                 fmt: str | None = None, dtype: str | None = None, unmerge: bool = False,
                 state_only: bool = False, quant: str | None = None) -> ExportSummary:
    """Write base (+ adapter merged, or unmerged) as `fmt` (default: from the output's extension; a folder is a
    Hugging Face export) in `dtype` (default per format, see src.export.formats). `quant` ("int8"/"nf4"): merge
    onto the dequantised base the adapter was trained against (--quant). Errors are RWKVBoneErrors."""
    base_path, output_path = Path(base_path), Path(output_path)
    adapter = Path(adapter_path) if adapter_path is not None else None
    fmt = format_for(output_path, fmt)
    dtype = dtype_for(fmt, dtype)
    check_output_path(output_path, {"--base_model": base_path, "--bone (adapter)": adapter})
    if fmt in ("pth", "safetensors"):
        if adapter is None:
            if unmerge or state_only or quant is not None:
                raise ConfigError("--unmerge, --state_only and --quant need the adapter (--bone).")
            merged = open_merged(base_path)
            model_sizes(merged.shapes)
            write_checkpoint(merged.cast(TORCH_DTYPES.get(dtype or ""), keep=merged.states), output_path)
            return ExportSummary(cfg=None, changed=[], output=output_path, format=fmt, dtype=dtype)
        summary = merge_checkpoint_file(base_path, adapter, output_path, unmerge=unmerge, state_only=state_only,
                                        dtype=TORCH_DTYPES.get(dtype or ""), quant=quant)
        return ExportSummary(cfg=summary.cfg, changed=summary.changed, output=output_path, format=fmt, dtype=dtype)
    if state_only:
        raise ConfigError(f"--state_only writes a .pth or .safetensors file, not {fmt}.")
    if fmt == "hf":
        for label, path in (("--base_model", base_path), ("--bone (adapter)", adapter)):
            if path is not None and path.resolve().is_relative_to(output_path.resolve()):
                raise ConfigError(f"the {label} input {path} lies inside the output folder {output_path}, which the "
                                  f"export replaces; write to a new folder.")
    merged = open_merged(base_path, adapter, unmerge=unmerge, quant=quant)
    sizes = model_sizes(merged.shapes)
    if merged.cfg is not None and merged.cfg.method == "state" and fmt in ("gguf", "hf"):
        raise ConfigError(f"{adapter} holds only a trained initial state (--peft state), and the {fmt} layout has no "
                          f"place for one: write it with --state_only (or export to pth, safetensors or ai00).")
    if fmt == "gguf":
        notes = write_gguf(merged, sizes, output_path, dtype or "fp16", model_name=output_path.stem)
    elif fmt == "hf":
        notes = write_hf(merged.cast(TORCH_DTYPES.get(dtype or "")), sizes, output_path)
    else:
        notes = write_ai00(merged, output_path)
    return ExportSummary(cfg=merged.cfg, changed=merged.changed, output=output_path, format=fmt, dtype=dtype,
                         notes=notes)
