"""Starting and reaching Ray the same way for laptops, CI and clusters.

`ray_session(run)` joins `run.ray_address` when set (or the cluster a Ray job runs on: the job's
RAY_ADDRESS), else starts an in-process cluster whose temp folder lives under the run directory
(nothing is written to the shared system temp or home). A session that is already initialised
(a test fixture, an enclosing workflow) is reused and left running. It yields the cluster's
dashboard URL ("" when it has none: the in-process cluster starts no dashboard).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipelines.environment import QUIET_ENV, apply_quiet_environment, ray_job_address

# Ray puts unix sockets at <temp>/session_<date>_<pid>/sockets/plasma_store (~62 more bytes) and
# the kernel caps such paths at 107 bytes: deep run folders get a short temp root instead.
_MAX_TEMP_DIR_CHARS = 44
PLACEMENT_GROUP_CLEANER_LOGGER = (
    "ray.train.v2._internal.execution.controller.placement_group_cleaner"
)


def local_temp_dir(temp_root: Path) -> str:
    """A short, run-local folder for Ray's session files."""
    candidate = (temp_root / "ray").resolve()
    if len(str(candidate)) > _MAX_TEMP_DIR_CHARS:
        base = os.environ.get("TMPDIR") or tempfile.gettempdir()
        if len(base) > _MAX_TEMP_DIR_CHARS - 14:
            base = "/tmp"
        candidate = Path(tempfile.mkdtemp(prefix="ray-", dir=base))
    candidate.mkdir(parents=True, exist_ok=True)
    return str(candidate)


def joins_cluster(run) -> bool:
    """Whether `ray_session(run)` joins a running cluster (configured, or the Ray job's own)
    rather than starting an in-process one."""
    return bool(run.ray_address or ray_job_address())


_dashboard_url = ""
"""The dashboard of the session this process started (reused sessions report it too)."""


@contextlib.contextmanager
def ray_session(run, *, temp_root: Path) -> Iterator[str]:
    """Ray for the duration of a pipeline step or workflow (see module docstring)."""
    import ray

    global _dashboard_url
    if ray.is_initialized():
        yield _dashboard_url
        return
    apply_quiet_environment()
    # Workers on a cluster do not inherit the driver's environment: hand them the same one.
    env_vars = {key: os.environ[key] for key in QUIET_ENV}
    if ray_job_address():
        # A job's driver: its runtime_env (qwenflux submit puts the same variables in it) holds
        # for its workers, and Ray refuses a driver runtime_env that sets the same keys again.
        # Jobs started otherwise (a KubeRay RayJob) get the quiet environment from the worker
        # entry points themselves (apply_quiet_environment in each task and actor).
        context = ray.init(address=ray_job_address(), log_to_driver=True)
    elif run.ray_address:
        context = ray.init(
            address=run.ray_address, log_to_driver=True, runtime_env={"env_vars": env_vars}
        )
    else:
        context = ray.init(
            num_cpus=run.local_num_cpus,
            include_dashboard=False,
            _temp_dir=local_temp_dir(temp_root),
            log_to_driver=True,
            runtime_env={
                "env_vars": env_vars,
                "worker_process_setup_hook": f"{__name__}.quiet_local_worker",
            },
        )
    url = context.dashboard_url or ""
    _dashboard_url = url if not url or "://" in url else f"http://{url}"
    try:
        yield _dashboard_url
    finally:
        _dashboard_url = ""
        ray.shutdown()


def quiet_local_worker() -> None:
    """Worker setup hook of the in-process cluster: Ray Train's placement-group cleaner asks the
    state API (served by the dashboard, which a local run does not start) once a second whether
    the controller lives, and warns each time it cannot. Locally the whole cluster dies with the
    driver, so that watch has nothing to clean; its warnings only bury the progress bars."""
    import logging

    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
