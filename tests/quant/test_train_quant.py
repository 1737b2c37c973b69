"""train.py on a quantised base: an nf4 run trains and writes an adapter that records quant=nf4; resuming it
with another --quant is refused; --quant with --peft none is a config error."""
from __future__ import annotations

from pathlib import Path

import pytest

from src.adapters.files import load_adapter_file
from src.config import load_config
from src.errors import ConfigError
from tests.test_train import assets, common_args, run_train  # noqa: F401 - assets is a fixture

pytest.importorskip("bitsandbytes")


@pytest.mark.slow
def test_nf4_run_trains_records_quant_and_refuses_another_quant_on_resume(assets: dict[str, Path],  # noqa: F811
                                                                           tmp_path: Path) -> None:
    proj = tmp_path / "run"
    res = run_train(common_args(assets, proj, quant="nf4", epoch_count=1))
    assert res.returncode == 0, res.stderr[-3000:]
    _, cfg, meta = load_adapter_file(proj / "adapter-final.safetensors")
    assert cfg.quant == "nf4" and meta["quant"] == "nf4"
    res = run_train(common_args(assets, proj, quant="int8", epoch_count=2))
    assert res.returncode != 0
    assert "refusing to resume: quant: 'nf4' -> 'int8'" in res.stderr, res.stderr[-2000:]


def test_quant_needs_an_adapter_method(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--quant nf4"):
        load_config(["--n_layer", "2", "--n_embd", "64", "--vocab_size", "256", "--peft", "none", "--quant", "nf4",
                     "--dry_run", "1", "--proj_dir", str(tmp_path)])
