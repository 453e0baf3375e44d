"""Exact resume of training from distributed checkpoints: a straight two-worker run vs runs
SIGKILLed mid-stage (the whole process group, as a crash would) and rerun, on the same two
workers and on one. The per-step losses match to 1e-6, and the reruns really resumed mid-stage.
(`make test-resume`: these runs take minutes, so make test leaves them to .ci/run.)

The straight run uses DDP, the killed ones FSDP2 (per-block sharding; each worker writes its
shards of the weights and AdamW states, and reads back what its new shards cover), so the same
comparison also shows that FSDP trains exactly what DDP trains, and that a checkpoint written
by two sharded workers resumes on one unsharded one."""

import json
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

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.resume]

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


def _wait_for_checkpoint(
    root: Path, process: subprocess.Popen, *, stage_index: int, next_step: int
) -> None:
    """A checkpoint of (stage_index, next_step) is in the training's storage (kill after it to
    resume mid-stage)."""
    deadline = time.monotonic() + 600
    while True:
        for state_file in (root / "train").glob("*/checkpoint_*/state.json"):
            state = json.loads(state_file.read_text())
            if (state["stage_index"], state["next_step"]) == (stage_index, next_step):
                return
        assert process.poll() is None, "the run ended before the planned kill"
        assert time.monotonic() < deadline
        time.sleep(0.2)


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
    _wait_for_checkpoint(root, run, stage_index=2, next_step=2)
    _wait_for_steps(root, run, "stage3", 3)  # the report of (stage 3, step 2) has returned
    os.killpg(run.pid, signal.SIGKILL)
    run.communicate(timeout=60)
    assert run.returncode != 0, "the run ended before the kill; nothing was resumed"

    rerun = start_group(command)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output[-3000:]
    got = _losses(root)
    steps_of_stage_one = [step for step, _ in got["stage1"]]
    assert steps_of_stage_one.count(0) == 1, "the rerun started from scratch instead of resuming"
    stage_three = [step for step, _ in got["stage3"]]
    assert stage_three.count(0) == stage_three.count(1) == 1, (
        f"stage 3 did not resume mid-stage (logged steps {stage_three})"
    )
    _assert_same_losses(got, expected)


def test_sigkill_mid_stage_on_two_fsdp_workers_then_resume_on_one_worker(
    tmp_path, tiny_models_dir, straight
):
    """Two FSDP workers write their own shards; the run is SIGKILLed inside stage 2 and resumed
    on ONE unsharded worker (the checkpoint resharded on load, the run's 2 x 2 micro-batch
    slots run by one worker). Stage 2 goes on mid-stage, and every per-step loss equals the
    straight two-worker run's within 1e-6."""
    dataset, expected = straight
    root = tmp_path / "one-worker"
    run = start_group(_command(root, tiny_models_dir, dataset, strategy="fsdp"))
    _wait_for_checkpoint(root, run, stage_index=1, next_step=2)
    _wait_for_steps(root, run, "stage2", 3)  # the report of (stage 2, step 2) has returned
    os.killpg(run.pid, signal.SIGKILL)
    run.communicate(timeout=60)

    one_worker = _command(root, tiny_models_dir, dataset) + [
        "--set",
        "train.resources.num_workers=1",
        "--set",
        "train.resources.cpus_per_worker=1",
    ]
    rerun = start_group(one_worker)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output[-3000:]
    got = _losses(root)
    assert [step for step, _ in got["stage1"]].count(0) == 1, "stage 1 was trained again"
    stage_two = [step for step, _ in got["stage2"]]
    assert stage_two.count(0) == stage_two.count(1) == 1, (
        f"stage 2 did not resume mid-stage (logged steps {stage_two})"
    )
    _assert_same_losses(got, expected)
