"""Training-state files: the atomic, weights_only Lightning CheckpointIO, listing the complete states of a run,
cleaning up after interrupted writes, replacing a state folder, and choosing what `--resume` continues from."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from src.atomic import atomic_save
from src.checkpoint import safe_torch_load
from src.config import TrainConfig
from src.errors import CheckpointError
from src.run_files import SUPERSEDED_DIR, state_dir, state_order


class SafeAtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that writes atomically (temp + rename) and loads with weights_only=True."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_save(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(path)
        checkpoint = safe_torch_load(path, what="training state", fix="delete it to resume from the previous one",
                                     map_location=map_location or "cpu")
        if not isinstance(checkpoint, dict) or "rwkv_bone" not in checkpoint:
            raise CheckpointError(f"{path} is not a training state written by this trainer (no 'rwkv_bone' record); "
                                  f"resume from a proj_dir/checkpoints/state-epoch*.ckpt file, or use --resume auto.")
        return checkpoint


def list_states(proj_dir: str | Path) -> list[Path]:
    """Complete training states in proj_dir, oldest first (temp files of interrupted writes are ignored)."""
    folder = state_dir(proj_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if state_order(p) is not None]
    return sorted(found, key=lambda p: state_order(p) or (0, 0.0))


def remove_stale_temporaries(proj_dir: str | Path) -> list[Path]:
    """Delete what writes cut short by a kill left in proj_dir and its checkpoints folder: atomic_path's
    ".<name>.<random>.tmp" files and DeepSpeed's ".<state>.tmp" folders. Call before a run starts writing."""
    removed = []
    for folder in (Path(proj_dir), state_dir(proj_dir)):
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if p.name.startswith(".") and p.name.endswith(".tmp"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                    removed.append(p)
    return removed


def replace_folder(src: Path, dest: Path) -> None:
    """Move folder `src` to `dest`, replacing an existing `dest` (os.replace cannot replace a non-empty folder).
    The old folder is first renamed to a ".tmp" name that `remove_stale_temporaries` deletes, so a kill at any
    point leaves either state complete or none under `dest`'s name, never a mixture."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old.tmp")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dest, old)
        os.replace(src, dest)
        shutil.rmtree(old)
    else:
        os.replace(src, dest)


def supersede_newer_states(proj_dir: str | Path, resumed: Path) -> list[Path]:
    """When a run resumes from a state that is not the newest, the newer states belong to the abandoned
    continuation: move them to checkpoints/superseded/ (kept, not deleted) so that a later `--resume auto`
    cannot pick one of them up instead of the new run's states."""
    states = list_states(proj_dir)
    if resumed.resolve() not in [s.resolve() for s in states]:
        return []
    newer = states[[s.resolve() for s in states].index(resumed.resolve()) + 1:]
    moved = []
    target = state_dir(proj_dir) / SUPERSEDED_DIR
    for s in newer:
        target.mkdir(exist_ok=True)
        dest = target / s.name
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        os.replace(s, dest)
        moved.append(dest)
    return moved


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """`--resume auto`: newest complete state in proj_dir or None (fresh start); `--resume PATH`: that path."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        states = list_states(cfg.proj_dir)
        return states[-1] if states else None
    return Path(cfg.resume)
