"""src/config.py: one owner per setting (choice lists from their rooms, the AdapterConfig built here, the strategy
parsed once), --help text per field, bool switches, and "did you mean" for misspellings."""
from __future__ import annotations

from pathlib import Path

import pytest

import train
from src.adapters.config import METHODS, AdapterConfig
from src.config import StrategySpec, TrainConfig, build_parser, load_config
from src.data.dataset import DATA_TYPES
from src.errors import ConfigError
from src.wkv import BACKENDS

SCRATCH = ["--n_layer", "2", "--n_embd", "64", "--vocab_size", "100", "--peft", "none"]


def test_bare_dry_run_is_a_switch_and_still_takes_a_value() -> None:
    assert load_config([*SCRATCH, "--dry_run"]).dry_run is True
    assert load_config([*SCRATCH, "--dry_run", "1"]).dry_run is True
    assert load_config([*SCRATCH, "--dry_run", "false", "--data_file", "d"]).dry_run is False


def test_bare_dry_run_through_train_main(capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(["--n_layer", "2", "--n_embd", "64", "--vocab_size", "65536", "--bone_b", "32", "--dry_run"]) == 0
    assert "total trainable" in capsys.readouterr().out


def test_every_field_has_help_text_shown_by_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for name in ("load_model", "bone_b", "grad_cp", "dry_run"):
        assert f"--{name}" in out
    assert "Bone block size b" in out and "gradient checkpointing" in out


def test_misspelled_flag_gets_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        load_config([*SCRATCH, "--bone_bb", "32"])
    assert e.value.code == 2
    assert "did you mean --bone_b?" in capsys.readouterr().err


def test_unknown_yaml_key_gets_a_suggestion_and_the_valid_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lr_int: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"lr_int \(did you mean lr_init\?\).*Valid keys: .*lr_init"):
        load_config(["--config", str(path)])


def test_choice_lists_come_from_their_owners() -> None:
    import src.config as config

    assert config.DATA_TYPES is DATA_TYPES and config.BACKENDS is BACKENDS and config.METHODS is METHODS
    for flag, allowed in (("peft", METHODS), ("data_type", DATA_TYPES), ("wkv_backend", BACKENDS)):
        help_text = next(a.help for a in build_parser()._actions if a.dest == flag)
        assert all(choice in help_text for choice in allowed), flag


@pytest.mark.parametrize("flag, value", [("peft", "dora"), ("bone_b", "0"), ("bone_grouping", "diag"),
                                         ("lora_r", "0"), ("adapter_targets", "att.keyy"), ("train_parts", "emb")])
def test_adapter_settings_are_validated_once_by_adapter_config_and_name_the_flag(flag: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"--{flag}"):
        load_config(["--load_model", "m.pth", "--data_file", "d", f"--{flag}", value])


def test_adapter_config_is_built_from_the_settings() -> None:
    cfg = load_config(["--load_model", "m.pth", "--data_file", "d", "--peft", "lora", "--lora_r", "8",
                       "--adapter_targets", "att.key", "--train_parts", "ln"])
    assert cfg.adapter == AdapterConfig(method="lora", b=64, grouping="row", lora_r=8, lora_alpha=32.0,
                                        targets=("att.key",), train_parts=("ln",))


@pytest.mark.parametrize("name, spec", [
    ("auto", StrategySpec("auto", False, 0, False)), ("ddp", StrategySpec("ddp", False, 0, False)),
    ("deepspeed_stage_2", StrategySpec("deepspeed_stage_2", True, 2, False)),
    ("deepspeed_stage_3_offload", StrategySpec("deepspeed_stage_3_offload", True, 3, True))])
def test_strategy_is_parsed_once(name: str, spec: StrategySpec) -> None:
    assert StrategySpec.parse(name) == spec == TrainConfig(strategy=name).strategy_spec


def test_unusable_wkv_backend_fails_at_startup_before_any_data(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = train.main(["--load_model", str(tmp_path / "never_read.pth"), "--data_file", str(tmp_path / "none.jsonl"),
                       "--wkv_backend", "cuda", "--accelerator", "cpu", "--proj_dir", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2 and "WKV backend 'cuda' is not available" in err, err
