"""`qwenflux status [RUN_ID]`: a workflow run's steps, their state, duration and outputs, with
the MLflow and Ray dashboard links (and the Ray job's state when it was submitted)."""

from __future__ import annotations

from typing import Any

from pipelines.workflow import WorkflowError, WorkflowStore

_SHOWN_OUTPUTS = {
    "data": ("dataset_version", "dataset_id", "new_rows", "encoded", "rejected"),
    "train": ("training", "dataset_version"),
    "register": ("version", "gate_passed", "gate_validation_loss"),
    "promote": ("champion", "promoted"),
    "infer": ("model", "ok", "failed", "out_dir"),
}


def find_record(store: WorkflowStore, run_id: str | None) -> dict[str, Any]:
    """The named run's record, or the latest run's."""
    if run_id is not None:
        record = store.load(run_id)
        if record is None:
            known = ", ".join(item["run_id"] for item in store.records()[-5:]) or "none"
            raise WorkflowError(f"no workflow run {run_id!r} in {store.folder} (latest: {known})")
        return record
    records = store.records()
    if not records:
        raise WorkflowError(f"no workflow run in {store.folder} yet: start one with `qwenflux run`")
    return records[-1]


def format_status(record: dict[str, Any], *, run_link, job_state: str = "") -> str:
    """The status table of one run; `run_link(record)` renders its MLflow link."""
    lines = [
        f"workflow run {record['run_id']}  target {record['target']}"
        + (f" (--from {record['from_step']})" if record.get("from_step") else ""),
        f"state {record['state']}  started {record['created_at']}"
        + (f"  finished {record['finished_at']}" if record.get("finished_at") else "")
        + f"  attempts {record['attempts']}",
    ]
    if record.get("error"):
        lines.append(f"error {record['error']}")
    lines.append(f"  {'step':<9} {'state':<8} {'time':>8}  outputs")
    for name, entry in record["steps"].items():
        duration = f"{entry['duration_s']:.1f} s" if "duration_s" in entry else "-"
        lines.append(f"  {name:<9} {entry['state']:<8} {duration:>8}  {_outputs(name, entry)}")
    if record.get("mlflow_run_id"):
        lines.append(f"MLflow: {run_link(record)}")
    lines.append(f"Ray dashboard: {record.get('ray_dashboard') or 'none (in-process cluster)'}")
    if record.get("submission_id"):
        lines.append(f"Ray job: {record['submission_id']} {job_state}".rstrip())
    return "\n".join(lines)


def _outputs(step: str, entry: dict[str, Any]) -> str:
    if entry["state"] == "not-run":
        return entry.get("reason", "")
    if entry["state"] == "failed":
        return entry.get("error", "")
    outputs = entry.get("outputs") or {}
    shown = [
        f"{key}={_short(outputs[key])}" for key in _SHOWN_OUTPUTS.get(step, ()) if key in outputs
    ]
    if entry.get("reused_from"):
        shown.append(f"(reused from {entry['reused_from']})")
    return " ".join(shown)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
