"""`qwenflux submit` on a real two-process Ray cluster (a head with its dashboard and Jobs API on
127.0.0.1, plus a second node): the tiny workflow, submitted through the Job Submission SDK,
runs its data tasks, encoder actors and two training workers across both nodes and gives the
outputs of the session's local run (shard keys, per-step losses); a second submission of the
same run is refused by Ray and reported, `status` shows the job; the test stops the cluster it
started and leaves no process behind."""

import os
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import tiny_overrides
from mlflow.tracking import MlflowClient
from ray_cluster import LocalRayCluster

from components.data import shard_format
from pipelines.cli import main
from pipelines.config import load_config
from pipelines.run_layout import RunLayout
from pipelines.workflow import WorkflowStore
from pipelines.workflow_status import find_record

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.cluster]

RUN_ID = "cluster-test"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Ray's unix socket paths under its temp folder must stay short (107 bytes): the run-local
    # TMPDIR (make test's .tmp), not the deep pytest folder.
    temp_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"qf-{os.getpid()}"
    logs = tmp_path_factory.mktemp("cluster_logs")
    cluster = LocalRayCluster(temp_dir, logs=logs, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        yield cluster.start()
    finally:
        survivors = cluster.stop()
        session_logs = temp_dir / "session_latest" / "logs"
        if session_logs.is_dir():
            shutil.copytree(session_logs, logs / "session", symlinks=False, dirs_exist_ok=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, f"processes left behind: {survivors}"


def _shard_keys(dataset: Path) -> list[tuple[str, str]]:
    keys = []
    for path in shard_format.list_shards(dataset):
        table = pq.read_table(path, columns=["sample_key", "bucket_id"])
        keys += zip(table["sample_key"].to_pylist(), table["bucket_id"].to_pylist(), strict=True)
    return sorted(keys)


def _stage_losses(tracking_uri: str, training_run_id: str) -> dict[str, list[float]]:
    client = MlflowClient(tracking_uri)
    experiment = client.get_run(training_run_id).info.experiment_id
    stages = client.search_runs(
        [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{training_run_id}'"
    )
    return {
        run.data.tags["stage"]: [
            metric.value for metric in client.get_metric_history(run.info.run_id, "loss")
        ]
        for run in stages
    }


def test_a_submitted_workflow_runs_across_two_nodes_like_a_local_run(
    tiny_models_dir, tiny_data_run, tiny_trained_run, cluster, tmp_path, capsys
):
    assert cluster.alive_nodes() == 2
    data_config, _ = tiny_data_run
    session_config, session_training = tiny_trained_run
    root = tmp_path / "submitted"
    overrides = tiny_overrides(
        root,
        tiny_models_dir,
        "data.synthetic.count=48",
        "data.resources.chunk_size=16",
    )
    workflow = ["run", "train", "--config", "tiny", "--run-id", RUN_ID, "--verbose"]
    workflow += [argument for item in overrides for argument in ("--set", item)]
    submit = ["submit", "--address", cluster.dashboard, "--python", sys.executable]
    assert main([*submit, "--wait", "--", *workflow]) == 0
    printed = capsys.readouterr().out
    assert f"submitted: job qwenflux-{RUN_ID}-train" in printed

    config = load_config("tiny", overrides)
    record = find_record(WorkflowStore(RunLayout(config)), RUN_ID)
    assert record["state"] == "finished"
    assert record["submission_id"] == f"qwenflux-{RUN_ID}-train"
    assert record["ray_dashboard"] == cluster.dashboard
    assert _shard_keys(root / "data") == _shard_keys(Path(data_config.run.root) / "data")
    outputs = record["steps"]["train"]["outputs"]
    assert outputs["dataset_id"] == session_training["dataset_id"]
    got = _stage_losses(RunLayout(config).tracking_uri, outputs["training_run_id"])
    expected = _stage_losses(
        RunLayout(session_config).tracking_uri, session_training["training_run_id"]
    )
    assert set(got) == {"stage1", "stage2", "stage3"} and got.keys() == expected.keys()
    for stage, losses in expected.items():
        assert got[stage] == pytest.approx(losses, abs=1e-6), stage

    assert main([*submit, "--", *workflow]) == 0
    assert "already submitted: job" in capsys.readouterr().out
    assert main(["status", RUN_ID, "--config", "tiny", *workflow[7:]]) == 0
    assert f"Ray job: qwenflux-{RUN_ID}-train SUCCEEDED" in capsys.readouterr().out
