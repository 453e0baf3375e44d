"""Resume: SIGKILL the data pipeline (the whole process group, as a crash would) at a random
point, rerun the same command, and the shards hold exactly the keys of an uninterrupted run."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from components.data import shard_format

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _command(root: Path, models) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipelines.cli",
        "data",
        "--verbose",  # a failure's assertion message then shows the whole log
        "--config",
        "tiny",
        "--set",
        f"run.root={root}",
        "--set",
        f"data.encode.qwen2vl={models.qwen2vl}",
        "--set",
        f"data.encode.flux={models.flux}",
        "--set",
        "data.source.synthetic_count=40",
        "--set",
        "data.resources.chunk_size=8",
    ]


def _run(command: list[str], *, kill_after: float | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
        cwd=Path(__file__).parents[2],
    )
    if kill_after is not None:
        try:
            process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    output, _ = process.communicate(timeout=600)
    return subprocess.CompletedProcess(command, process.returncode, output, "")


def _shard_keys(root: Path) -> list[tuple[str, str]]:
    keys = []
    for path in shard_format.list_shards(root / "data"):
        table = pq.read_table(path, columns=["sample_key", "bucket_id"])
        keys += list(
            zip(table["sample_key"].to_pylist(), table["bucket_id"].to_pylist(), strict=True)
        )
    return sorted(keys)


def test_sigkill_then_rerun_gives_the_uninterrupted_keys(tmp_path, tiny_models_dir):
    started = time.monotonic()
    straight = _run(_command(tmp_path / "straight", tiny_models_dir))
    duration = time.monotonic() - started
    assert straight.returncode == 0, straight.stdout[-3000:]
    expected = _shard_keys(tmp_path / "straight")
    assert len(expected) > 20

    seed = int(os.environ.get("QWENFLUX_KILL_SEED", time.time_ns() % 10**6))
    kill_after = random.Random(seed).uniform(2.0, 0.9 * duration)
    print(f"kill seed {seed}: SIGKILL after {kill_after:.1f}s of a {duration:.1f}s run")
    killed = _run(_command(tmp_path / "resumed", tiny_models_dir), kill_after=kill_after)
    assert killed.returncode != 0, "the run finished before the kill; the test proved nothing"

    rerun = _run(_command(tmp_path / "resumed", tiny_models_dir))
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    straight_manifest = shard_format.read_manifest(tmp_path / "straight" / "data")
    resumed_manifest = shard_format.read_manifest(tmp_path / "resumed" / "data")
    # The synthetic corpus has no bad urls: a download rejection would mean the kill leaked.
    assert "download" not in straight_manifest["counts"]["rejected"]
    assert resumed_manifest["counts"] == straight_manifest["counts"]
    assert _shard_keys(tmp_path / "resumed") == expected
    assert resumed_manifest["buckets"] == straight_manifest["buckets"]
