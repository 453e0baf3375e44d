"""The workflow runner on small real steps (files in the run directory, real MLflow on SQLite):
skipping unchanged steps, rerunning what a changed input reaches, resuming a failed run under
its id, `--from`, steps the config does not need, the run-directory lock, and MLflow's
parent + child runs."""

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.config import load_config
from pipelines.run_layout import RunLayout
from pipelines.workflow import (
    Step,
    StepResult,
    WorkflowError,
    WorkflowStore,
    chain_for,
    run_workflow,
)
from pipelines.workflow_status import find_record, format_status
from pipelines.workflow_tracking import WorkflowTracker

pytestmark = pytest.mark.integration


class Steps:
    """Three steps that write files from their inputs; `fail_in` makes one raise once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[tuple[str, bool]] = []
        self.fail_in = ""

    def _write(self, name: str, text: str) -> str:
        path = self.root / "work" / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)

    def make(self) -> tuple[Step, ...]:
        def run(name):
            def step(context):
                self.calls.append((name, context.forced))
                if self.fail_in == name:
                    self.fail_in = ""
                    raise RuntimeError(f"{name} broke")
                text = json.dumps([context.config.run.seed, context.upstream], sort_keys=True)
                return StepResult(outputs={"file": self._write(name, text), "n": 1}, summary="")

            return step

        return (
            Step(name="a", reads=(), fingerprint=lambda c: {"seed": c.run.seed}, run=run("a")),
            Step(
                name="b",
                reads=("a",),
                fingerprint=lambda c: {"lr": c.train.optimizer.learning_rate},
                run=run("b"),
            ),
            Step(
                name="c",
                reads=("b",),
                fingerprint=lambda c: {},
                run=run("c"),
                not_needed=lambda c: "" if c.infer.requests_file else "no requests file",
            ),
        )


@pytest.fixture
def setup(tmp_path):
    config = load_config("tiny", [f"run.root={tmp_path / 'run'}", "infer.requests_file=r.jsonl"])
    return config, Steps(tmp_path), WorkflowTracker(config)


def _run(config, steps, tracker, **options):
    return run_workflow(
        config,
        target=options.pop("target", "all"),
        steps=steps.make(),
        tracker=tracker,
        report=lambda line: None,
        **options,
    )


def _states(record):
    return {name: entry["state"] for name, entry in record["steps"].items()}


def test_unchanged_steps_are_reused_and_a_changed_input_reruns_downstream(setup):
    config, steps, tracker = setup
    first = _run(config, steps, tracker, run_id="one")
    assert first["state"] == "finished" and _states(first) == dict.fromkeys("abc", "done")
    again = _run(config, steps, tracker, run_id="two")
    assert _states(again) == dict.fromkeys("abc", "reused")
    assert again["steps"]["c"]["reused_from"] == "one" and len(steps.calls) == 3
    changed = replace(
        config,
        train=replace(config.train, optimizer=replace(config.train.optimizer, learning_rate=1.0)),
    )
    third = _run(changed, steps, tracker, run_id="three")
    assert _states(third) == {"a": "reused", "b": "done", "c": "reused"}
    # c's inputs hold b's outputs, which did not change (same file path and count): c is reused.
    assert [name for name, _ in steps.calls[3:]] == ["b"]
    reseeded = replace(config, run=replace(config.run, seed=7))
    fourth = _run(reseeded, steps, tracker, run_id="four")
    assert _states(fourth) == {"a": "done", "b": "done", "c": "reused"}


def test_a_failed_run_resumes_under_its_id_and_keeps_its_done_steps(setup):
    config, steps, tracker = setup
    steps.fail_in = "b"
    with pytest.raises(RuntimeError, match="b broke"):
        _run(config, steps, tracker)
    store = WorkflowStore(RunLayout(config))
    failed = find_record(store, None)
    assert failed["state"] == "failed" and _states(failed)["b"] == "failed"
    assert "b broke" in failed["steps"]["b"]["error"] and store.marker("b") is None
    resumed = _run(config, steps, tracker)
    assert resumed["run_id"] == failed["run_id"] and resumed["attempts"] == 2
    assert _states(resumed) == dict.fromkeys("abc", "done")
    assert [name for name, _ in steps.calls] == ["a", "b", "b", "c"]
    assert len(store.records()) == 1


def test_from_forces_a_new_run_from_that_step(setup):
    config, steps, tracker = setup
    _run(config, steps, tracker, run_id="one")
    forced = _run(config, steps, tracker, from_step="b")
    assert forced["run_id"] != "one" and forced["from_step"] == "b"
    assert _states(forced) == {"a": "reused", "b": "done", "c": "done"}
    assert steps.calls[3:] == [("b", True), ("c", True)]
    with pytest.raises(WorkflowError, match="not a step of target a"):
        _run(config, steps, tracker, target="a", from_step="b")


def test_targets_take_their_upstream_and_unneeded_steps_are_not_run(setup):
    config, steps, tracker = setup
    made = steps.make()
    assert [step.name for step in chain_for("b", made)] == ["a", "b"]
    with pytest.raises(WorkflowError, match="unknown target"):
        chain_for("z", made)
    no_requests = replace(config, infer=replace(config.infer, requests_file=""))
    record = _run(no_requests, steps, tracker)
    assert _states(record) == {"a": "done", "b": "done", "c": "not-run"}
    assert record["steps"]["c"]["reason"] == "no requests file"


def test_mlflow_holds_a_parent_per_run_and_a_child_per_step(setup):
    config, steps, tracker = setup
    record = _run(config, steps, tracker, run_id="one")
    _run(config, steps, tracker, run_id="two")
    client = MlflowClient(RunLayout(config).tracking_uri)
    parent = client.get_run(record["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["workflow_run_id"] == "one"
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{record['mlflow_run_id']}'",
    )
    assert sorted(run.data.tags["workflow_step"] for run in children) == ["a", "b", "c"]
    assert {run.data.tags["step_state"] for run in children} == {"done"}
    assert all(run.data.metrics["output.n"] == 1.0 for run in children)
    two = find_record(WorkflowStore(RunLayout(config)), "two")
    assert two["mlflow_experiment_id"] == parent.info.experiment_id
    text = format_status(two, run_link=tracker.run_link)
    assert "state finished" in text and "(reused from one)" in text
    assert f"run {two['mlflow_run_id']} (mlflow ui --backend-store-uri sqlite:" in text


def test_a_live_lock_refuses_a_second_workflow_and_a_dead_one_is_taken_over(setup):
    config, steps, tracker = setup
    lock = RunLayout(config).workflow / "lock"
    lock.parent.mkdir(parents=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": "other"}
    lock.write_text(json.dumps(holder))
    with pytest.raises(WorkflowError, match="another workflow runs"):
        _run(config, steps, tracker)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    lock.write_text(json.dumps(holder | {"pid": int(dead.stdout)}))
    assert _run(config, steps, tracker)["state"] == "finished" and not lock.exists()
