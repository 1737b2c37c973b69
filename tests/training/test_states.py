"""src/training/states.py: replacing a state folder, and setting newer states aside on resume."""
from __future__ import annotations

from pathlib import Path

from src.training.states import replace_folder, supersede_newer_states


def test_replace_folder_replaces_a_non_empty_folder(tmp_path: Path) -> None:
    src, dest = tmp_path / ".state.tmp", tmp_path / "state"
    for folder, text in ((src, "new"), (dest, "old")):
        (folder / "checkpoint").mkdir(parents=True)
        (folder / "checkpoint" / "shard.pt").write_text(text)
    replace_folder(src, dest)
    assert (dest / "checkpoint" / "shard.pt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_newer_states_are_superseded_when_resuming_an_older_one(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for epoch in (1, 2, 3):
        (folder / f"state-epoch{epoch:06d}.ckpt").write_text(str(epoch))
    moved = supersede_newer_states(tmp_path, folder / "state-epoch000001.ckpt")
    assert [p.name for p in moved] == ["state-epoch000002.ckpt", "state-epoch000003.ckpt"]
    assert sorted(p.name for p in folder.iterdir()) == ["state-epoch000001.ckpt", "superseded"]
    assert supersede_newer_states(tmp_path, folder / "state-epoch000001.ckpt") == []
