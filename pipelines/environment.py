"""Process environment every entry point (CLI, tests, benchmarks) runs with: no telemetry, no
update checks, nothing fetched from a hub at run time, quiet library progress output."""

from __future__ import annotations

import os

QUIET_ENV = {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "DIFFUSERS_VERBOSITY": "error",
}
"""Set unless the caller set them already."""


def apply_quiet_environment() -> None:
    """Set every QUIET_ENV variable the environment does not already set."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


RAY_JOB_MARKER = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor for a job's entrypoint (with RAY_ADDRESS, the cluster's)."""


def ray_job_address() -> str:
    """The cluster a Ray job's entrypoint runs on; "" outside a Ray job. (A plain RAY_ADDRESS is
    not enough: a local Ray session exports it to the processes it starts.)"""
    if RAY_JOB_MARKER not in os.environ:
        return ""
    return os.environ.get("RAY_ADDRESS", "")


SUBMISSION_ID_VAR = "QWENFLUX_SUBMISSION_ID"
"""Set by `qwenflux submit` for its job: the workflow run records which job ran it."""


FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "MLFLOW_S3_ENDPOINT_URL",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "HF_HOME",
    "HF_TOKEN",
)
"""What a driver hands the processes it starts elsewhere, when set: `qwenflux submit` to its job,
a training to its Ray Train workers (rank 0 logs to MLflow). The MLflow server and credentials,
object-store credentials and endpoint, the Hugging Face cache."""


def forwarded_environment() -> dict[str, str]:
    """The FORWARDED_ENV variables this process has."""
    return {key: os.environ[key] for key in FORWARDED_ENV if os.environ.get(key)}


def submitted_environment() -> dict[str, str]:
    """What `qwenflux submit` puts in its job's runtime_env: the quiet environment and the
    forwarded variables."""
    quiet = {key: os.environ.get(key, value) for key, value in QUIET_ENV.items()}
    return quiet | forwarded_environment()


def tracking_credentials() -> tuple[str, str, str]:
    """(username, password, token) MLflow's client reads from the environment ("" when unset)."""
    return tuple(
        os.environ.get(key, "")
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
    )


def submission_id() -> str:
    """The Ray job this process runs as, when `qwenflux submit` started it; "" otherwise."""
    return os.environ.get(SUBMISSION_ID_VAR, "")


def job_submission_address() -> str:
    """The Ray dashboard `qwenflux submit` talks to when --address is not given."""
    return os.environ.get("RAY_JOB_SUBMISSION_ADDRESS", "")
