"""MLflow for workflow runs: a parent run per workflow run and a child run per step.

The parent is named `workflow-<run id>` and tagged with the run id and target; each step's child
carries `workflow_step` and `step_state` tags, the step's inputs hash, and its numeric outputs as
metrics (the training's own parent run nests under the train step's child). A resumed workflow run
reopens the same parent and the same children. Everything goes through MlflowClient with explicit
run ids, in the configured experiment (tracking.experiment_name).
"""

from __future__ import annotations

import json
from typing import Any

from pipelines.train_tracking import experiment_id, metric_entities, tracking_uri

_MLFLOW_STATUS = {
    "running": "RUNNING",
    "done": "FINISHED",
    "reused": "FINISHED",
    "failed": "FAILED",
    "finished": "FINISHED",
}


class WorkflowTracker:
    """Creates and updates the workflow's MLflow runs (see the module docstring)."""

    def __init__(self, config) -> None:
        from mlflow.tracking import MlflowClient

        self.config = config
        self.client = MlflowClient(tracking_uri=tracking_uri(config))
        self._experiment_id: str | None = None

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = experiment_id(self.client, self.config)
        return self._experiment_id

    def open_parent(self, record: dict[str, Any]) -> str:
        """The workflow run's MLflow run: created on the first attempt, reopened on resume."""
        from pipelines.data_report import code_version

        if record.get("mlflow_run_id"):
            self.client.update_run(record["mlflow_run_id"], status="RUNNING")
            return record["mlflow_run_id"]
        record["mlflow_experiment_id"] = self.experiment_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"workflow-{record['run_id']}",
            tags={
                "workflow_run_id": record["run_id"],
                "workflow_target": record["target"],
                "workflow_from_step": str(record.get("from_step") or ""),
                "preset": record["preset"],
                "git_sha": code_version()["git_sha"],
            },
        )
        return run.info.run_id

    def step_run(self, record: dict[str, Any], step: str, entry: dict[str, Any]) -> str:
        """Create or update the step's child run to match `entry`; returns its id."""
        run_id = entry.get("mlflow_run_id")
        if not run_id:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{record['run_id']}-{step}",
                tags={
                    "mlflow.parentRunId": record["mlflow_run_id"],
                    "workflow_run_id": record["run_id"],
                    "workflow_step": step,
                },
            )
            run_id = run.info.run_id
        tags = {"step_state": entry["state"], "inputs_hash": entry.get("inputs_hash", "")}
        if entry.get("reused_from"):
            tags["reused_from"] = entry["reused_from"]
        if entry.get("error"):
            tags["error"] = entry["error"][:5000]
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)
        outputs = entry.get("outputs") or {}
        if outputs:
            self.client.set_tag(run_id, "outputs", json.dumps(outputs, sort_keys=True)[:5000])
            numbers = {
                f"output.{key}": float(value)
                for key, value in outputs.items()
                if isinstance(value, int | float) and not isinstance(value, bool)
            }
            if numbers:
                self.client.log_batch(run_id, metrics=metric_entities(numbers, step=0))
        status = _MLFLOW_STATUS[entry["state"]]
        if status == "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.client.set_terminated(run_id, status=status)
        return run_id

    def close_parent(self, record: dict[str, Any]) -> None:
        status = _MLFLOW_STATUS.get(record["state"], "FAILED")
        self.client.set_terminated(record["mlflow_run_id"], status=status)

    def run_link(self, record: dict[str, Any]) -> str:
        """Where to look at a workflow run: the server's page, or how to open the UI on a local
        store. Made from the record alone, so `status` needs no MLflow call."""
        uri = tracking_uri(self.config)
        run_id = record["mlflow_run_id"]
        if uri.startswith(("http://", "https://")) and record.get("mlflow_experiment_id"):
            experiment = record["mlflow_experiment_id"]
            return f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
        return f"run {run_id} (mlflow ui --backend-store-uri {uri})"
