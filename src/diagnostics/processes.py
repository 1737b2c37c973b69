"""Running a piece of the project in a fresh Python process: the command that calls a library function (so a
measurement or a GPU-check section gets a process of its own, whose memory and crashes are its own), and a run
whose whole process group is killed when its time box runs out."""
from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def function_command(python: str, module: str, function: str, args: Sequence[str] = ()) -> list[str]:
    """argv that runs `sys.exit(module.function(list_of_args))` in a fresh interpreter; run it with the repository
    root as the working directory (the root is then on sys.path, as for `python -m scripts.<name>`)."""
    code = f"import sys; from {module} import {function}; sys.exit({function}(sys.argv[1:]))"
    return [python, "-c", code, *args]


def run_killable(cmd: Sequence[str], timeout: float | None, env: Mapping[str, str] | None,
                 cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    """subprocess.run (output captured as text) in a new process group; on timeout the whole group (the
    command's own workers included) is killed before TimeoutExpired is raised. timeout None: no limit;
    env None: this process's."""
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=None if env is None else dict(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(list(cmd), timeout, output=out, stderr=err) from None
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def last_lines(text: str, n: int) -> str:
    """The last n lines of text, stripped."""
    return "\n".join(text.strip().splitlines()[-n:])
