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


def ray_job_address() -> str:
    """The cluster a Ray job's entrypoint runs on (Ray sets RAY_ADDRESS for it); "" elsewhere."""
    return os.environ.get("RAY_ADDRESS", "")
