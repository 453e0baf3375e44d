"""Workflow runs: the pipeline's steps as one resumable run with an id.

    qwenflux run all|data|train|register|promote|infer --config PRESET [--from STEP] [--run-id ID]
    qwenflux status [RUN_ID] --config PRESET

A run walks the steps its target needs, in order (pipelines/workflow_steps.py). A step's inputs
are a fingerprint of the config it reads plus the outputs of the steps it reads; its completion
marker keeps the inputs hash and outputs. A step is skipped, and its recorded outputs reused,
when its marker holds the same inputs hash; when they differ it runs again, and so does every
step downstream (their inputs hold its outputs). Rerunning a run that did not finish resumes it
under the same id: steps it finished stay done, the interrupted one resumes from its own files
(chunks and shards, checkpoints, inference results). `--from STEP` starts a new run that runs STEP
and every later step even when nothing changed (training then trains afresh).

Files, under <root>/workflow/ (every write is a temp file and a rename):
    runs/<id>.json     a run's record: target, state, and per step: state, inputs hash, times,
                       outputs, MLflow run id
    steps/<step>.json  the step's completion marker: inputs, inputs hash, outputs, run id
    lock               the process running a workflow in this run directory (host, pid, run id)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.data.shard_format import write_json_atomic
from pipelines.config import PipelineConfig
from pipelines.run_layout import RunLayout

RUN_STATES = ("running", "failed", "finished")
STEP_STATES = ("pending", "running", "done", "reused", "not-run", "failed")
"""done: ran in this run; reused: outputs taken from an earlier run's marker (inputs unchanged);
not-run: the config asks for no such step (e.g. no requests file for batch inference)."""


class WorkflowError(RuntimeError):
    """A workflow that cannot start: unknown target or step, a run directory in use."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StepContext:
    """What a step's run function gets."""

    config: PipelineConfig
    upstream: dict[str, dict[str, Any]]
    """Outputs of the steps it reads, by step name."""
    run_id: str
    """The workflow run's id."""
    mlflow_run_id: str
    """The step's MLflow run, a child of the workflow's (the training's runs nest under it)."""
    forced: bool
    """`--from` reached this step: start afresh where the step can (training does)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StepResult:
    outputs: dict[str, Any]
    """JSON values the marker keeps and downstream steps read."""
    summary: str
    """Printed when the step finishes."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Step:
    name: str
    reads: tuple[str, ...]
    """Steps whose outputs this one takes (they run first)."""
    fingerprint: Callable[[PipelineConfig], dict[str, Any]]
    """What of the config (and of files it names) the step's result depends on."""
    run: Callable[[StepContext], StepResult]
    not_needed: Callable[[PipelineConfig], str] = lambda config: ""
    """Why the config asks for no such step ("" = it is needed)."""


def inputs_hash(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def new_run_id(preset: str) -> str:
    """A new workflow run's id, `<preset>-<UTC time>` (`qwenflux submit` names runs so too)."""
    return f"{preset}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


class WorkflowStore:
    """The workflow files of one run directory (see the module docstring)."""

    def __init__(self, layout: RunLayout) -> None:
        self.folder = layout.workflow

    def record_path(self, run_id: str) -> Path:
        return self.folder / "runs" / f"{run_id}.json"

    def marker_path(self, step: str) -> Path:
        return self.folder / "steps" / f"{step}.json"

    def load(self, run_id: str) -> dict[str, Any] | None:
        path = self.record_path(run_id)
        return json.loads(path.read_text()) if path.is_file() else None

    def save(self, record: dict[str, Any]) -> None:
        write_json_atomic(self.record_path(record["run_id"]), record)

    def records(self) -> list[dict[str, Any]]:
        """Every run's record, oldest first."""
        found = [json.loads(path.read_text()) for path in (self.folder / "runs").glob("*.json")]
        return sorted(found, key=lambda record: (record["created_at"], record["run_id"]))

    def marker(self, step: str) -> dict[str, Any] | None:
        path = self.marker_path(step)
        return json.loads(path.read_text()) if path.is_file() else None

    def write_marker(self, step: str, marker: dict[str, Any]) -> None:
        write_json_atomic(self.marker_path(step), marker)

    @contextlib.contextmanager
    def lock(self, run_id: str) -> Iterator[None]:
        """One workflow at a time per run directory. A lock left by a dead process on this
        host (a killed run) is taken over; one held elsewhere is an error naming its holder."""
        path = self.folder / "lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id}
        for _ in range(2):
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                _clear_stale_lock(path)
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump(holder, handle)
            break
        else:
            held = path.read_text()
            raise WorkflowError(
                f"{path}: another workflow runs in this run directory ({held}); wait for it, or "
                "delete the file if that process is gone"
            )
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def _clear_stale_lock(path: Path) -> None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if holder.get("host") != socket.gethostname():
        return
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        path.unlink(missing_ok=True)
    except PermissionError:
        return


def chain_for(target: str, steps: tuple[Step, ...]) -> list[Step]:
    """The steps `target` needs, in run order ("all": every step)."""
    by_name = {step.name: step for step in steps}
    if target == "all":
        return list(steps)
    if target not in by_name:
        raise WorkflowError(f"unknown target {target!r}: one of all, {', '.join(by_name)}")
    needed: set[str] = set()
    pending = [target]
    while pending:
        name = pending.pop()
        if name not in needed:
            needed.add(name)
            pending.extend(by_name[name].reads)
    return [step for step in steps if step.name in needed]


def open_run(
    store: WorkflowStore,
    config: PipelineConfig,
    *,
    target: str,
    chain: list[Step],
    run_id: str | None,
    from_step: str | None,
) -> dict[str, Any]:
    """The record to run: the named run, else the latest unfinished run of the same target
    (resume), else a new one. `--from` always starts a new run."""
    names = [step.name for step in chain]
    if from_step is not None and from_step not in names:
        raise WorkflowError(f"--from {from_step}: not a step of target {target} ({names})")
    if run_id is not None:
        existing = store.load(run_id)
        if existing is not None:
            if existing["target"] != target or (from_step and existing["from_step"] != from_step):
                raise WorkflowError(
                    f"workflow run {run_id} exists with target {existing['target']} "
                    f"(--from {existing['from_step']}); choose another --run-id"
                )
            return existing
    elif from_step is None:
        unfinished = [
            record
            for record in store.records()
            if record["state"] != "finished" and record["target"] == target
        ]
        if unfinished:
            return unfinished[-1]
    if run_id is None:
        run_id = new_run_id(config.run.name)
        taken = {record["run_id"] for record in store.records()}
        run_id = next(
            candidate
            for candidate in (run_id, *(f"{run_id}-{n}" for n in range(2, 1000)))
            if candidate not in taken
        )
    return {
        "run_id": run_id,
        "target": target,
        "from_step": from_step,
        "preset": config.run.name,
        "created_at": _now(),
        "state": "running",
        "attempts": 0,
        "mlflow_run_id": "",
        "steps": {name: {"state": "pending"} for name in names},
    }


def run_workflow(
    config: PipelineConfig,
    *,
    target: str,
    steps: tuple[Step, ...],
    tracker,
    run_id: str | None = None,
    from_step: str | None = None,
    annotations: dict[str, str] | None = None,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) a workflow; returns its final record. `annotations` (the Ray dashboard,
    a job submission id) are kept in the record. A step that raises marks the step and the run
    failed (the record says which, with the error) and re-raises."""
    layout = RunLayout(config)
    store = WorkflowStore(layout)
    chain = chain_for(target, steps)
    record = open_run(store, config, target=target, chain=chain, run_id=run_id, from_step=from_step)
    with store.lock(record["run_id"]):
        record["state"], record["attempts"] = "running", record["attempts"] + 1
        record.update({key: value for key, value in (annotations or {}).items() if value})
        record["mlflow_run_id"] = tracker.open_parent(record)
        store.save(record)
        verb = "resuming" if record["attempts"] > 1 else "starting"
        report(f"workflow run {record['run_id']} ({target}): {verb}")
        names = [step.name for step in chain]
        forced_from = names.index(record["from_step"]) if record["from_step"] else len(names)
        try:
            for index, step in enumerate(chain):
                forced = index >= forced_from
                _walk_step(step, record, store, config, tracker, forced=forced, report=report)
        except BaseException as error:
            record["state"], record["error"] = "failed", f"{type(error).__name__}: {error}"
            record["finished_at"] = _now()
            store.save(record)
            tracker.close_parent(record)
            raise
        record["state"], record["finished_at"] = "finished", _now()
        record.pop("error", None)
        store.save(record)
        tracker.close_parent(record)
    return record


def _walk_step(step, record, store, config, tracker, *, forced, report) -> None:
    entry = record["steps"][step.name]
    reason = step.not_needed(config)
    upstream = {name: record["steps"][name].get("outputs", {}) for name in step.reads}
    inputs = {"config": step.fingerprint(config), "upstream": upstream}
    digest = inputs_hash(inputs)
    if reason:
        entry.update(state="not-run", reason=reason, inputs_hash=digest, outputs={})
        store.save(record)
        report(f"  {step.name:<9} not run: {reason}")
        return
    if entry.get("state") == "done" and entry.get("inputs_hash") == digest:
        report(f"  {step.name:<9} done earlier in this run")
        return
    marker = store.marker(step.name)
    if not forced and marker is not None and marker["inputs_hash"] == digest:
        entry.update(
            state="reused",
            inputs_hash=digest,
            outputs=marker["outputs"],
            reused_from=marker["run_id"],
        )
        entry["mlflow_run_id"] = tracker.step_run(record, step.name, entry)
        store.save(record)
        report(f"  {step.name:<9} unchanged since run {marker['run_id']}: reused")
        return
    entry.update(state="running", inputs_hash=digest, started_at=_now())
    entry.pop("error", None)
    entry["mlflow_run_id"] = tracker.step_run(record, step.name, entry)
    store.save(record)
    context = StepContext(
        config=config,
        upstream=upstream,
        run_id=record["run_id"],
        mlflow_run_id=entry["mlflow_run_id"],
        forced=forced,
    )
    _run_step(step, context, record, store, tracker, inputs=inputs, report=report)


def _run_step(step, context, record, store, tracker, *, inputs, report) -> None:
    entry = record["steps"][step.name]
    started = time.monotonic()
    report(f"  {step.name:<9} running")
    try:
        result = step.run(context)
    except BaseException as error:
        entry.update(
            state="failed",
            error=f"{type(error).__name__}: {error}",
            duration_s=round(time.monotonic() - started, 1),
        )
        tracker.step_run(record, step.name, entry)
        store.save(record)
        report(f"  {step.name:<9} FAILED: {entry['error']}")
        raise
    entry.update(
        state="done",
        outputs=result.outputs,
        finished_at=_now(),
        duration_s=round(time.monotonic() - started, 1),
    )
    tracker.step_run(record, step.name, entry)
    store.write_marker(
        step.name,
        {
            "inputs": inputs,
            "inputs_hash": entry["inputs_hash"],
            "outputs": result.outputs,
            "run_id": record["run_id"],
            "finished_at": entry["finished_at"],
        },
    )
    store.save(record)
    report(f"  {step.name:<9} done in {entry['duration_s']:.1f} s")
    if result.summary:
        report("\n".join(f"    {line}" for line in result.summary.splitlines()))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
