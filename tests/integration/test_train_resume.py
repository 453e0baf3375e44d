"""Exact resume of training: a straight run vs a run SIGKILLed in stage 2 (the whole process
group, as a crash would) and rerun with the same command. The per-step losses match to 1e-6,
and the rerun really resumed (stage 1 was not trained again).

The straight run uses DDP, the killed one FSDP2 (per-block sharding, sharded AdamW states
gathered into the checkpoint and scattered back on resume), so the same comparison also shows
that FSDP trains exactly what DDP trains."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient
from subprocess_runs import start_group

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = (3, 3, 3)


def _command(root: Path, models, dataset: Path, *, strategy: str = "ddp") -> list[str]:
    command = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "train",
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
        f"train.dataset={dataset}",
        "--set",
        "train.checkpoint_every_steps=2",
        "--set",
        "train.validate_every_steps=100",
        "--set",
        f"train.resources.strategy={strategy}",
    ]
    for position, steps in enumerate(STEPS, start=1):
        command += ["--set", f"train.stages.{position}.num_steps={steps}"]
        command += ["--set", f"train.stages.{position}.warmup_steps=1"]
        command += ["--set", f"train.stages.{position}.decay_steps=1"]
    return command


def _losses(root: Path) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("train")
    runs = client.search_runs([experiment.experiment_id])
    return {
        run.data.tags["stage"]: [
            (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")
        ]
        for run in runs
        if "stage" in run.data.tags
    }


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_models_dir, tiny_data_run):
    data_config, _ = tiny_data_run
    dataset = Path(data_config.run.root) / "data"
    root = tmp_path_factory.mktemp("straight")
    process = start_group(_command(root, tiny_models_dir, dataset))
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return dataset, _losses(root)


def _logged_steps(root: Path, stage: str) -> int:
    try:
        return len(_losses(root).get(stage, []))
    except Exception:  # the run has not created its MLflow database or experiment yet
        return 0


def _wait_for_steps(root: Path, process: subprocess.Popen, stage: str, count: int) -> None:
    """`stage` has logged `count` steps (stage 2's second step: stage 1's checkpoints and stage
    2's first are written; Ray Train may not have registered the newest one yet, and resume then
    starts a bit earlier)."""
    deadline = time.monotonic() + 600
    while _logged_steps(root, stage) < count:
        assert process.poll() is None, "the run ended before the planned kill"
        assert time.monotonic() < deadline
        time.sleep(0.3)


def _train_workers(process: subprocess.Popen) -> list[psutil.Process]:
    return [
        child
        for child in psutil.Process(process.pid).children(recursive=True)
        if "RayTrainWorker" in " ".join(child.cmdline())
    ]


def _assert_same_losses(got, expected) -> None:
    for stage in ("stage1", "stage2", "stage3"):
        final = dict(got[stage])
        assert sorted(final) == list(range(STEPS[int(stage[-1]) - 1]))
        for step, value in expected[stage]:
            assert abs(final[step] - value) <= 1e-6, (stage, step, final[step], value)


def test_killed_worker_then_sigkill_then_rerun_matches_straight_run(
    tmp_path, tiny_models_dir, straight
):
    """One FSDP run lives through both failures: a Ray Train worker killed in stage 2 (Ray Train
    restarts the worker group from the last checkpoint and goes on), then the whole process
    group SIGKILLed in stage 3 and the same command rerun (it resumes across the stage 2 -> 3
    boundary). Every per-step loss equals the straight DDP run's within 1e-6."""
    dataset, expected = straight
    root = tmp_path / "resumed"
    command = _command(root, tiny_models_dir, dataset, strategy="fsdp")
    run = start_group(command)
    _wait_for_steps(root, run, "stage2", 2)
    workers = _train_workers(run)
    assert len(workers) == 2, "expected the two Ray Train worker processes"
    workers[1].kill()
    _wait_for_steps(root, run, "stage3", 1)
    replaced = {worker.pid for worker in _train_workers(run)}
    assert replaced and not replaced & {worker.pid for worker in workers}, (
        "Ray Train did not restart the worker group"
    )
    os.killpg(run.pid, signal.SIGKILL)
    run.communicate(timeout=60)
    assert run.returncode != 0, "the run ended before the kill; nothing was resumed"

    rerun = start_group(command)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output[-3000:]
    got = _losses(root)
    steps_of_stage_one = [step for step, _ in got["stage1"]]
    assert steps_of_stage_one.count(0) == 1, "the rerun started from scratch instead of resuming"
    _assert_same_losses(got, expected)
