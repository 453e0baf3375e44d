"""`qwenflux run` and `qwenflux status` on the session's trained tiny run: the workflow reuses
the data and training the session fixture ran through it, gates, registers, promotes and runs
batch inference on the champion; a rerun reuses every step; a changed registry input reruns
the gate alone."""

import json
from pathlib import Path

import pytest
from conftest import tiny_overrides
from mlflow.tracking import MlflowClient

from pipelines.cli import main
from pipelines.run_layout import RunLayout
from pipelines.workflow import WorkflowStore
from pipelines.workflow_status import find_record

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def workflow_args(tiny_trained_run, tiny_models_dir, tmp_path_factory):
    config, _ = tiny_trained_run
    folder = tmp_path_factory.mktemp("workflow_requests")
    requests = folder / "requests.jsonl"
    rows = [
        {"id": "red", "mode": "text", "prompt": "a white circle on a red background", "seed": 1},
        {"id": "bad", "mode": "no-such-mode"},
    ]
    requests.write_text("".join(json.dumps(row) + "\n" for row in rows))
    overrides = tiny_overrides(
        Path(config.run.root),
        tiny_models_dir,
        f"train.dataset={config.train.dataset}",
        f"infer.requests_file={requests}",
    )
    return config, [argument for item in overrides for argument in ("--set", item)]


def _run(args, *extra) -> int:
    return main(["run", *extra, "--config", "tiny", *args, "--verbose"])


def test_run_all_reuses_the_trained_steps_and_finishes_the_workflow(workflow_args, capsys):
    config, args = workflow_args
    assert _run(args, "all") == 0
    record = find_record(WorkflowStore(RunLayout(config)), None)
    states = {name: entry["state"] for name, entry in record["steps"].items()}
    assert states == {
        "data": "reused",
        "train": "reused",
        "register": "done",
        "promote": "done",
        "infer": "done",
    }
    register = record["steps"]["register"]["outputs"]
    assert register["gate_passed"] is True and register["version"] is not None
    assert record["steps"]["promote"]["outputs"]["champion"] == register["version"]
    infer = record["steps"]["infer"]["outputs"]
    assert infer["model"].endswith(f"/{register['version']}")
    assert (infer["total"], infer["ok"], infer["failed"]) == (2, 1, 1)
    assert (Path(infer["out_dir"]) / "images" / "red.png").is_file()
    printed = capsys.readouterr().out
    assert f"workflow run {record['run_id']}" in printed and "state finished" in printed

    assert main(["status", "--config", "tiny", *args]) == 0
    status = capsys.readouterr().out
    for name in ("data", "train", "register", "promote", "infer"):
        assert f"  {name} " in status
    assert "Ray dashboard:" in status and "mlflow ui --backend-store-uri" in status

    client = MlflowClient(RunLayout(config).tracking_uri)
    children = client.search_runs(
        [client.get_run(record["mlflow_run_id"]).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{record['mlflow_run_id']}'",
    )
    assert sorted(run.data.tags["workflow_step"] for run in children) == [
        "data",
        "infer",
        "promote",
        "register",
        "train",
    ]


def test_a_rerun_reuses_every_step_and_a_changed_gate_input_reruns_only_the_gate(
    workflow_args, capsys
):
    config, args = workflow_args
    assert _run(args, "all") == 0
    store = WorkflowStore(RunLayout(config))
    again = find_record(store, None)
    assert {entry["state"] for entry in again["steps"].values()} == {"reused"}
    assert _run([*args, "--set", "registry.min_improvement=0.05"], "register") == 0
    changed = find_record(store, None)
    states = {name: entry["state"] for name, entry in changed["steps"].items()}
    assert states == {"data": "reused", "train": "reused", "register": "done"}
    assert (
        changed["steps"]["register"]["outputs"]["version"]
        == (again["steps"]["register"]["outputs"]["version"])
    ), "the same training registered a second version"
    assert main(["status", again["run_id"], "--config", "tiny", *args]) == 0
    assert f"workflow run {again['run_id']}" in capsys.readouterr().out
    assert main(["status", "no-such-run", "--config", "tiny", *args]) == 2
    assert "no workflow run 'no-such-run'" in capsys.readouterr().err
