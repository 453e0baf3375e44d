"""`qwenflux submit`: a workflow run as a Ray job, through Ray's Job Submission SDK.

    qwenflux submit --address http://HEAD:8265 [--wait] [--working-dir DIR] [--python PY] \
        -- run all --config a100x8 [--set ...] [--run-id ID]

The job's entrypoint is `PY -m pipelines.cli run ...` with a `--run-id` (the one given, else a
new `<preset>-<UTC time>`), and its submission id is `qwenflux-<run id>-<target>`: Ray refuses a
second job with the same id, so a schedule that fires twice submits one job. A run whose job
failed or was stopped is resubmitted as `...-r2`, `-r3` (the workflow then resumes that run).
The runtime_env carries the working directory (or none: the cluster's image has the code) and,
as environment variables, the MLflow and object-store settings and credentials the submitter's
own environment holds (FORWARDED_ENV); they never appear on the command line or in the logs.
`--wait` streams the job's logs and returns its exit status.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from dataclasses import dataclass

from pipelines.console import say
from pipelines.environment import SUBMISSION_ID_VAR, submitted_environment
from pipelines.workflow import new_run_id

AGENT_WAIT_S = 120.0
"""How long a submission waits for a starting cluster's job agent."""
ACTIVE_STATES = ("PENDING", "RUNNING")
DONE_STATES = ("SUCCEEDED",)


class SubmitError(RuntimeError):
    """A submission that cannot be made: no `run` command after `--`, a cluster unreachable."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Submission:
    submission_id: str
    run_id: str
    state: str
    """The job's state after submitting (or the existing job's, for a duplicate)."""
    is_new: bool


def workflow_command(argv: list[str]) -> tuple[list[str], str, str]:
    """(the `run` command with a --run-id, run id, target) from the words after `--`."""
    if len(argv) < 2 or argv[0] != "run":
        raise SubmitError("submit runs a workflow: give `-- run TARGET --config ...` after it")
    target = argv[1]
    if "--run-id" in argv:
        position = argv.index("--run-id")
        if position + 1 >= len(argv):
            raise SubmitError("--run-id needs a value")
        return argv, argv[position + 1], target
    preset = argv[argv.index("--config") + 1] if "--config" in argv else "tiny"
    run_id = new_run_id(preset.rsplit("/", 1)[-1].removesuffix(".toml"))
    return [*argv, "--run-id", run_id], run_id, target


def submit_workflow(
    argv: list[str], *, address: str, python: str = "python", working_dir: str = ""
) -> Submission:
    """Submit the workflow `argv` (see the module docstring); a duplicate is not resubmitted."""
    from ray.job_submission import JobSubmissionClient

    command, run_id, target = workflow_command(argv)
    client = JobSubmissionClient(address)
    base = f"qwenflux-{run_id}-{target}"
    existing = {job.submission_id: str(job.status) for job in client.list_jobs()}
    submission_id = base
    attempt = 1
    while submission_id in existing:
        state = existing[submission_id]
        if state in ACTIVE_STATES or state in DONE_STATES:
            return Submission(submission_id=submission_id, run_id=run_id, state=state, is_new=False)
        attempt += 1
        submission_id = f"{base}-r{attempt}"
    runtime_env = {"env_vars": submitted_environment() | {SUBMISSION_ID_VAR: submission_id}}
    if working_dir:
        runtime_env["working_dir"] = working_dir
    entrypoint = shlex.join([python, "-m", "pipelines.cli", *command])
    try:
        _submit_when_ready(
            client,
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env=runtime_env,
            metadata={"workflow_run_id": run_id, "workflow_target": target},
        )
    except RuntimeError as error:
        if "already exists" not in str(error):
            raise
        state = str(client.get_job_status(submission_id))
        return Submission(submission_id=submission_id, run_id=run_id, state=state, is_new=False)
    state = str(client.get_job_status(submission_id))
    return Submission(submission_id=submission_id, run_id=run_id, state=state, is_new=True)


def _submit_when_ready(client, *, timeout_s: float = AGENT_WAIT_S, **job) -> None:
    """submit_job, retried while the head's job agent is still starting (a fresh cluster
    answers "No available agent to submit job" for its first seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.submit_job(**job)
            return
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def follow_job(address: str, submission_id: str) -> str:
    """Stream the job's logs to the terminal until it ends; returns its final state."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)

    async def tail() -> None:
        async for lines in client.tail_job_logs(submission_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())
    return str(client.get_job_status(submission_id))


def job_state(address: str, submission_id: str) -> str:
    """The job's state, or why it cannot be read (for `qwenflux status`)."""
    try:
        from ray.job_submission import JobSubmissionClient

        return str(JobSubmissionClient(address).get_job_status(submission_id))
    except Exception as error:  # an unreachable or stopped cluster must not break `status`
        return f"unknown ({type(error).__name__}: {str(error)[:120]})"


def run_submit(argv: list[str], *, address: str, wait: bool, python: str, working_dir: str) -> int:
    submission = submit_workflow(argv, address=address, python=python, working_dir=working_dir)
    verb = "submitted" if submission.is_new else "already submitted"
    say(f"{verb}: job {submission.submission_id} ({submission.state}), run {submission.run_id}")
    if not wait:
        return 0
    state = follow_job(address, submission.submission_id)
    say(f"job {submission.submission_id}: {state}")
    return 0 if state in DONE_STATES else 1
