"""Run a CLI command or a server as its own process group, as an operator or a scheduler would:
a test can SIGKILL the whole group (the command and every process it started) like a crash, and
stops the servers it started by their group."""

import os
import signal
import subprocess
from pathlib import Path

REPOSITORY = Path(__file__).parents[1]


def start_group(command: list[str], *, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `command` in a new session (its own process group) from the repository root, with
    stdout and stderr merged into one unbuffered text pipe; `env` replaces os.environ."""
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
        cwd=REPOSITORY,
    )


def stop_group(process: subprocess.Popen, *, grace_s: float = 5) -> None:
    """SIGTERM the process's group, then SIGKILL it if it has not exited after `grace_s`."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
