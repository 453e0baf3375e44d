"""Run a CLI command as its own process group, as an operator or a scheduler would: a test can
SIGKILL the whole group (the command and every process it started) like a crash."""

import os
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
