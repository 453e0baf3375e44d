"""What a CLI run shows on the terminal, and where everything else goes.

A quiet run (the default) points the process's stdout and stderr file descriptors at a log file
in the run directory, so everything any library, Ray (driver and forwarded worker lines, its C++
core), MLflow or a subprocess prints lands there in full; the terminal gets only what the
pipeline says (`say`) and its progress bars (`progress`), which update in place. `--verbose`
keeps the terminal as it is and Ray's INFO logging on.

    with quiet_run(log_file, verbose=False):
        say("data: 80 samples")          # terminal and log
        for _ in progress(range(10), desc="encode"):  # terminal only
            ...
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_terminal: IO[str] | None = None
"""The terminal's stream during a quiet run; None otherwise (then sys.stdout is the terminal)."""
_terminal_errors: IO[str] | None = None
"""The terminal's error stream during a quiet run."""


def terminal() -> IO[str]:
    """Where progress bars and summaries go."""
    return _terminal if _terminal is not None else sys.stdout


def is_quiet() -> bool:
    return _terminal is not None


def say(message: str = "") -> None:
    """One line (or block) for the user: on the terminal, and in the log during a quiet run."""
    print(message, file=terminal(), flush=True)
    if _terminal is not None:
        print(message, flush=True)


def complain(message: str) -> None:
    """An error line for the user: on the terminal's stderr, and in the log during a quiet run."""
    print(message, file=_terminal_errors or sys.stderr, flush=True)
    if _terminal_errors is not None:
        print(message, file=sys.stderr, flush=True)


def progress(iterable: Any = None, **options: Any):
    """A tqdm bar on the terminal (in place); extra keywords go to tqdm."""
    from tqdm import tqdm

    options.setdefault("dynamic_ncols", True)
    return tqdm(iterable, file=terminal(), **options)


@contextlib.contextmanager
def quiet_run(log_file: Path, *, verbose: bool) -> Iterator[Path | None]:
    """Send fds 1 and 2 to `log_file` (appending) for the block, unless `verbose`; yields the
    log file (None when verbose). Restores both descriptors on the way out."""
    global _terminal, _terminal_errors
    if verbose or _terminal is not None:
        yield None
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _terminal = os.fdopen(os.dup(saved_out), "w", buffering=1)
    _terminal_errors = os.fdopen(os.dup(saved_err), "w", buffering=1)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        yield log_file
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        _terminal.close()
        _terminal_errors.close()
        _terminal = _terminal_errors = None
