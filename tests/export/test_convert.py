"""merge_bone.py's formats and dtypes: the format from the extension, conversion without an adapter, --dtype for
.pth/.safetensors (the initial state stays fp32), outputs holding only the model's tensors, one-line refusals."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import merge_bone
from src.errors import ConfigError
from src.export.formats import dtype_for, format_for
from tests.export.conftest import World, logits_of


def test_format_and_dtype_choice() -> None:
    assert [format_for(Path(p), None) for p in ("a.pth", "a.safetensors", "a.gguf", "a.st", "out", "out.d/x")] == \
        ["pth", "safetensors", "gguf", "ai00", "hf", "hf"]
    assert format_for(Path("folder"), "hf") == "hf" and format_for(Path("a.GGUF"), "gguf") == "gguf"
    with pytest.raises(ConfigError, match="does not match"):
        format_for(Path("a.pth"), "gguf")
    with pytest.raises(ConfigError, match=r"\*\.gguf"):
        format_for(Path("folder"), "gguf")
    assert (dtype_for("gguf", None), dtype_for("pth", None), dtype_for("ai00", None)) == ("fp16", None, "fp16")
    with pytest.raises(ConfigError, match="q8_0 is a GGUF"):
        dtype_for("pth", "q8_0")
    with pytest.raises(ConfigError, match="takes fp16"):
        dtype_for("ai00", "fp32")


@pytest.mark.parametrize("suffix, dtype", [(".pth", None), (".safetensors", "bf16"), (".pth", "fp16")])
def test_merge_to_checkpoint_in_a_dtype(world: World, tmp_path: Path, suffix: str, dtype: str | None,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"merged{suffix}"
    args = ["--base_model", str(world.base), "--bone", str(world.adapter), "--output", str(out)]
    assert merge_bone.main(args + (["--dtype", dtype] if dtype else [])) == 0
    assert "merged bone (b=32, grouping=row)" in capsys.readouterr().out
    sd = load_file(str(out)) if suffix == ".safetensors" else torch.load(out, weights_only=True)
    assert sd.keys() == world.merged.keys()
    want = {None: torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    for k, v in sd.items():
        assert v.dtype == (torch.float32 if k.endswith("time_state") else want), k
        assert torch.equal(v, world.merged[k].to(v.dtype)), k
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_convert_without_adapter_keeps_the_model(world: World, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "base.safetensors"
    assert merge_bone.main(["--base_model", str(world.base), "--output", str(out), "--dtype", "fp16"]) == 0
    assert "converted" in capsys.readouterr().out
    base = torch.load(world.base, weights_only=True)
    got = load_file(str(out))
    assert got.keys() == base.keys() and all(torch.equal(got[k], base[k].half()) for k in base)
    assert (logits_of(got) - logits_of(base)).abs().max() / logits_of(base).abs().max() < 1e-2


def test_cli_refuses_with_one_line(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for extra in (["--output", str(tmp_path / "a.pth"), "--dtype", "q8_0"],
                  ["--output", str(tmp_path / "a.pth"), "--format", "gguf"],
                  ["--output", str(world.base)],
                  ["--output", str(tmp_path / "a.gguf"), "--state_only"]):
        assert merge_bone.main(["--base_model", str(world.base), "--bone", str(world.adapter), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("merge_bone.py: error:"), err
    assert not list(tmp_path.iterdir())
