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


def submission_id() -> str:
    """The Ray job this process runs as, when `qwenflux submit` started it; "" otherwise."""
    return os.environ.get(SUBMISSION_ID_VAR, "")
