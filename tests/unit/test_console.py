"""A quiet run: the terminal gets what the pipeline says and its progress bars; the run's log
file gets everything, including output written below Python (C-level stderr, subprocesses)."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.unit

SCRIPT = textwrap.dedent(
    """
    import os, subprocess, sys, warnings
    from pathlib import Path
    from pipelines.console import complain, progress, quiet_run, say

    with quiet_run(Path(sys.argv[1]), verbose=sys.argv[2] == "verbose"):
        say("summary line")
        print("library chatter on stdout")
        warnings.warn("a library FutureWarning", FutureWarning)
        os.write(2, b"C-level log line\\n")
        subprocess.run([sys.executable, "-c", "print('child process line')"], check=True)
        for _ in progress(range(3), desc="stage1"):
            pass
        complain("qwenflux: error: something named")
    print("after the run")
    """
)


def _run(tmp_path, mode: str) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / "logs" / "demo.log"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(log), mode], capture_output=True, text=True, check=True
    )
    return done, log.read_text() if log.exists() else ""


def test_quiet_run_shows_the_story_and_logs_everything(tmp_path):
    done, log = _run(tmp_path, "quiet")
    assert done.stdout.splitlines()[0] == "summary line"
    assert "stage1" in done.stdout and "after the run" in done.stdout
    assert done.stderr.strip() == "qwenflux: error: something named"
    for noise in ("library chatter", "FutureWarning", "C-level log line", "child process line"):
        assert noise not in done.stdout + done.stderr
        assert noise in log
    assert "summary line" in log and "something named" in log
    assert "stage1" not in log


def test_verbose_run_shows_everything_and_writes_no_log(tmp_path):
    done, log = _run(tmp_path, "verbose")
    for line in ("summary line", "library chatter", "child process line", "stage1"):
        assert line in done.stdout + done.stderr
    assert "C-level log line" in done.stderr
    assert log == ""
