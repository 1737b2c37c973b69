"""Writing a folder atomically: everything goes into a temporary folder beside the target, which is renamed onto
the target only when complete. A previous folder is moved aside first and removed after the rename (put back
if the rename fails), so a reader sees the old folder or the new one, never a half-written one."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from src.errors import ConfigError, WriteError


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(target: Path, replaceable: Iterable[str]) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes `target`. An existing `target` is replaced only when it
    holds nothing but file names in `replaceable` (a previous export), so a wrong --output never deletes a user's
    folder: ConfigError otherwise. A failed write (OSError) is a WriteError and leaves `target` as it was."""
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise ConfigError(f"output {target} is a file; a Hugging Face export is a folder. Choose a new name.")
        others = sorted(p.name for p in target.iterdir() if p.name not in set(replaceable))
        if others:
            raise ConfigError(f"output folder {target} exists and holds other files ({', '.join(others[:5])}); "
                              f"choose a new folder name (an earlier export of this kind would be replaced).")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes it 0700
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
            try:
                os.replace(tmp, target)
            except OSError:
                os.replace(old / target.name, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync(target.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(f"could not write the folder {target} ({type(e).__name__}: {e}); nothing was replaced. "
                         f"Free some space (or fix permissions) and run again.") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
