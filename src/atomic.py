"""Atomic file writes: write to a temporary name in the same folder, fsync, then rename over the target.

A reader never sees a half-written file; a failed write (disk full, kill) leaves the previous good file
in place and removes the temporary one, and is raised as WriteError naming the file.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from src.errors import RWKVBoneError, WriteError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``.

    The caller writes the whole file to the yielded path. On any exception the temporary file is
    removed and ``path`` keeps its previous content; an OSError (a full disk) is raised as WriteError,
    anything else propagates unchanged.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and safetensors, which replaces the file) make it 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(_write_failure(target, e)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save(path: str | os.PathLike, save: Callable[[Path], None]) -> None:
    """Write ``path`` atomically with ``save(tmp)`` (torch.save, safetensors). Any failure of ``save`` other
    than our own errors is a failed write, raised as WriteError: these libraries report a full disk as
    RuntimeError or SafetensorError."""
    target = Path(path)
    with atomic_path(target) as tmp:
        try:
            save(tmp)
        except RWKVBoneError:
            raise
        except Exception as e:
            raise WriteError(_write_failure(target, e)) from e


def _write_failure(target: Path, e: Exception) -> str:
    free = shutil.disk_usage(target.parent).free / 2**30
    reason = str(e).splitlines()[0] if str(e) else ""
    return (f"could not write {target} ({type(e).__name__}: {reason}); {free:.2f} GiB free in {target.parent}. "
            f"Nothing was replaced: the previous {target.name}, if any, is intact. Free some space (or fix "
            f"permissions) and run again.")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
