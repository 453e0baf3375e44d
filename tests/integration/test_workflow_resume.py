"""The whole workflow (`qwenflux run all`, a subprocess as an operator or a scheduler runs it)
against crashes and growth.

Both runs mix two sources (url lists served on 127.0.0.1 and a local folder read directly).
Crashes: one run goes straight through; another is SIGKILLed (its whole process group, as a
crash would) inside each step in turn (data, train, register, promote, infer), and the same
command is rerun after each kill. The finished run equals the straight one: the same shard
keys, every per-step training loss within 1e-6, one registered version, the same PNG bytes.

Growth (a scheduled refresh): the straight run's url-list folder gains a second list and the
same command runs again: only the new list's rows are downloaded and encoded (counted, and no
earlier chunk or shard file is touched), training trains on dataset version 2, a second
candidate is registered, the champion changes only if the gate says so, and inference runs on
the champion. Version 1 stays readable.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import sources_override, tiny_overrides
from mlflow.tracking import MlflowClient
from subprocess_runs import start_group

from components.data import shard_format
from components.data.demo_corpus import write_synthetic_corpus, write_url_list
from components.tiny_models import PHOTOS_COUNT
from components.training.loader import BucketIndex

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.workflow]

STEP_ORDER = ("data", "train", "register", "promote", "infer")
FIRST_LIST, SECOND_LIST = 32, 16
"""Rows of list A (the first run) and list B (the refresh)."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A served image folder and its rows split into two url lists (A now, B for the refresh)."""
    folder = tmp_path_factory.mktemp("corpus")
    items = write_synthetic_corpus(folder, count=FIRST_LIST + SECOND_LIST, seed=5, max_side_px=160)
    (folder / "later").mkdir()
    write_url_list(items[:FIRST_LIST], folder / "later" / "a.parquet")
    write_url_list(items[FIRST_LIST:], folder / "later" / "b.parquet")
    requests = folder / "requests.jsonl"
    rows = [
        {"id": "red", "mode": "text", "prompt": "a white circle on a red background", "seed": 1},
        {"id": "blue", "mode": "text", "prompt": "a black square on a blue background", "seed": 2},
        {"id": "bad", "mode": "no-such-mode"},
    ]
    requests.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder, requests


def _lists_folder(root: Path, corpus_folder: Path, names: tuple[str, ...]) -> Path:
    lists = root.parent / f"{root.name}-lists"
    lists.mkdir(exist_ok=True)
    for name in names:
        (lists / name).write_bytes((corpus_folder / "later" / name).read_bytes())
    return lists


def _command(root: Path, models, corpus_folder: Path, requests: Path, lists: Path) -> list[str]:
    overrides = tiny_overrides(
        root,
        models,
        # A mixed-source run: the url lists (a new one arrives for the refresh) and a folder.
        sources_override(
            {"name": "web", "kind": "url_list", "paths": [lists], "serve_dir": corpus_folder},
            {
                "name": "photos",
                "kind": "folder",
                "paths": [models.photos],
                "weight": 0.5,
                "metadata_file": "metadata.jsonl",
            },
        ),
        "data.resources.chunk_size=8",
        f"infer.requests_file={requests}",
    )
    command = [sys.executable, "-m", "pipelines.cli", "run", "all", "--config", "tiny"]
    return command + [argument for item in overrides for argument in ("--set", item)]


def _finish(command: list[str]) -> str:
    process = start_group(command)
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-4000:]
    return output


def _record(root: Path) -> dict | None:
    """The latest workflow record under `root` (None before the first is written)."""
    paths = sorted((root / "workflow" / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(paths[-1].read_text()) if paths else None


def _kill_inside(command: list[str], root: Path, step: str, delay: float) -> str:
    """Start the command, SIGKILL its process group `delay` seconds after `step` starts, and
    check that the kill landed inside the step (its completion marker is not written)."""
    process = start_group(command)
    deadline = time.monotonic() + 600
    while True:
        assert process.poll() is None, f"the run ended before {step} started: {_tail(process)}"
        assert time.monotonic() < deadline, f"{step} never started"
        try:
            record = _record(root)
        except (json.JSONDecodeError, FileNotFoundError):
            record = None
        if record is not None and record["steps"][step]["state"] == "running":
            break
        time.sleep(0.005)
    time.sleep(delay)
    os.killpg(process.pid, signal.SIGKILL)
    output, _ = process.communicate(timeout=60)
    marker = root / "workflow" / "steps" / f"{step}.json"
    assert not marker.exists(), f"the kill {delay:.2f}s into {step} landed after it finished"
    return output


def _tail(process: subprocess.Popen) -> str:
    process.kill()
    output, _ = process.communicate(timeout=60)
    return output[-3000:]


def _shard_keys(root: Path) -> list[tuple[str, str]]:
    keys = []
    for path in shard_format.list_shards(root / "data"):
        table = pq.read_table(path, columns=["sample_key", "bucket_id"])
        keys += zip(table["sample_key"].to_pylist(), table["bucket_id"].to_pylist(), strict=True)
    return sorted(keys)


def _losses(root: Path, training_run_id: str) -> dict[str, dict[int, float]]:
    """Per stage, the per-step losses of the training whose MLflow parent run is given."""
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("train")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{training_run_id}'",
    )
    return {
        run.data.tags["stage"]: {
            m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")
        }
        for run in runs
        if "stage" in run.data.tags
    }


def _versions(root: Path) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return sorted(
        client.search_model_versions("name = 'qwen2vl-flux-tiny'"), key=lambda v: int(v.version)
    )


def _images(out_dir: str) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((Path(out_dir) / "images").glob("*"))}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_models_dir, corpus):
    folder, requests = corpus
    root = tmp_path_factory.mktemp("straight") / "run"
    lists = _lists_folder(root, folder, ("a.parquet",))
    command = _command(root, tiny_models_dir, folder, requests, lists)
    _finish(command)
    return root, command, lists, _record(root)


@pytest.fixture(scope="module")
def killed(tmp_path_factory, tiny_models_dir, corpus, straight):
    folder, requests = corpus
    _, _, _, expected = straight
    root = tmp_path_factory.mktemp("killed") / "run"
    lists = _lists_folder(root, folder, ("a.parquet",))
    command = _command(root, tiny_models_dir, folder, requests, lists)
    seed = int(os.environ.get("QWENFLUX_KILL_SEED", time.time_ns() % 10**6))
    chooser = random.Random(seed)
    delays = {}
    for step in STEP_ORDER:
        # Somewhere in the first half of the step, by the straight run's duration.
        delays[step] = chooser.uniform(0.05, 0.5) * expected["steps"][step]["duration_s"]
        _kill_inside(command, root, step, delays[step])
    print(f"kill seed {seed}: SIGKILL " + ", ".join(f"{s} +{d:.2f}s" for s, d in delays.items()))
    _finish(command)
    return root, _record(root)


def test_a_run_killed_inside_every_step_finishes_like_an_uninterrupted_one(straight, killed):
    straight_root, _, _, expected = straight
    root, record = killed
    assert record["state"] == "finished" and record["attempts"] == len(STEP_ORDER) + 1
    assert all(record["steps"][step]["state"] == "done" for step in STEP_ORDER)
    assert record["run_id"] != expected["run_id"]

    assert _shard_keys(root) == _shard_keys(straight_root)
    assert len(_shard_keys(root)) > 20
    got = _losses(root, record["steps"]["train"]["outputs"]["training_run_id"])
    want = _losses(straight_root, expected["steps"]["train"]["outputs"]["training_run_id"])
    assert sorted(got) == sorted(want) == ["stage1", "stage2", "stage3"]
    for stage, losses in want.items():
        assert sorted(got[stage]) == sorted(losses), stage
        for step, value in losses.items():
            assert abs(got[stage][step] - value) <= 1e-6, (stage, step, got[stage][step], value)

    assert [str(v.version) for v in _versions(root)] == ["1"]
    for step in ("register", "promote"):
        assert record["steps"][step]["outputs"] == expected["steps"][step]["outputs"], step
    infer = record["steps"]["infer"]["outputs"]
    assert (infer["total"], infer["ok"], infer["failed"]) == (3, 2, 1)
    images = _images(infer["out_dir"])
    assert sorted(images) == ["blue.png", "red.png"]
    assert images == _images(expected["steps"]["infer"]["outputs"]["out_dir"])


@pytest.fixture(scope="module")
def refreshed(straight, corpus):
    root, command, lists, first = straight
    data = root / "data"
    before = {path: path.stat().st_mtime_ns for path in sorted(data.rglob("*.parquet"))}
    (lists / "b.parquet").write_bytes((corpus[0] / "later" / "b.parquet").read_bytes())
    output = _finish(command)
    return root, first, _record(root), before, output


def test_a_new_url_list_is_a_new_dataset_version_trained_registered_and_gated(refreshed):
    root, first, record, before, output = refreshed
    data_dir = root / "data"
    assert record["run_id"] != first["run_id"] and record["state"] == "finished"
    steps = record["steps"]
    data = steps["data"]["outputs"]
    assert (
        data["dataset_version"] == 2
        and data["dataset_id"] != first["steps"]["data"]["outputs"]["dataset_id"]
    )
    # The folder's rows are all in version 1; only the new list's rows are new.
    reused = FIRST_LIST + PHOTOS_COUNT
    assert (data["source_rows"], data["new_rows"]) == (reused + SECOND_LIST, SECOND_LIST)
    first_encoded = first["steps"]["data"]["outputs"]["encoded"]
    assert data["encoded"] == first_encoded + data["new_encoded"] and data["new_encoded"] > 0
    assert f"(new {SECOND_LIST}, reused {reused})" in output
    # Nothing of version 1 was redone: its chunk outcomes, fitted images and shards are untouched.
    unchanged = [
        path for path, mtime in before.items() if path.exists() and path.stat().st_mtime_ns == mtime
    ]
    changed = sorted(set(before) - set(unchanged))
    # What did change: the source registry gained B's rows, dedup looked at all rows again.
    assert changed == sorted(
        [data_dir / "source.parquet", data_dir / "work" / "duplicates.parquet"]
    )
    manifest = shard_format.read_manifest(root / "data")
    new_chunks = {entry["path"] for entry in manifest["shards"] if entry["added_in"] == 2}
    assert new_chunks and all(
        entry["source_list"] == "b.parquet"
        for entry in manifest["shards"]
        if entry["path"] in new_chunks
    )

    # Version 1 is still there and reads as it did.
    old = BucketIndex.from_dataset(root / "data", version=1)
    assert (
        old.num_rows
        == first_encoded
        == shard_format.read_manifest(root / "data", 1)["counts"]["encoded"]
    )
    assert BucketIndex.from_dataset(root / "data").num_rows == data["encoded"]

    train = steps["train"]["outputs"]
    assert train["dataset_version"] == 2
    assert train["training"] != first["steps"]["train"]["outputs"]["training"]
    register = steps["register"]["outputs"]
    versions = _versions(root)
    assert [str(v.version) for v in versions] == ["1", "2"] and register["version"] == "2"
    assert versions[1].tags["dataset_version"] == "2" and versions[0].tags["dataset_version"] == "1"
    # Version 2 holds out other rows than version 1: the gate measured the champion (version 1)
    # on version 2's held-out rows too, and promotion compares those two numbers.
    tags = versions[1].tags
    assert tags["gate.champion_version"] == "1"
    beats = float(tags["gate.validation_loss"]) < float(tags["gate.champion_validation_loss"])
    assert register["gate_champion_validation_loss"] == float(tags["gate.champion_validation_loss"])
    promote = steps["promote"]["outputs"]
    assert promote["promoted"] == beats and promote["champion"] == ("2" if beats else "1")
    infer = steps["infer"]["outputs"]
    assert infer["model"].endswith(f"/{promote['champion']}")
    # An unchanged champion's images are already there (skipped); a new one's are generated.
    assert sorted(_images(infer["out_dir"])) == ["blue.png", "red.png"]
