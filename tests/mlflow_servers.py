"""Real `mlflow server` processes on 127.0.0.1 for the registry and authentication tests.

    with mlflow_server(root) as url: ...                        SQLite backend, proxied artifacts
    with mlflow_server(root, admin_password="...") as url: ...  plus MLflow's basic-auth app

The server runs in its own session (its uvicorn workers too) and is stopped by that session on
the way out. With authentication, the user store lives in `root` (basic_auth.ini points it there)
and `admin` gets the given password on first start.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from subprocess_runs import stop_group

ADMIN = "admin"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({process.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server not healthy after {timeout_s} s:\n{log.read_text()}")


@contextlib.contextmanager
def mlflow_server(
    root: Path,
    *,
    admin_password: str | None = None,
    while_starting: Callable[[], object] | None = None,
    timeout_s: float = 90,
) -> Iterator[str]:
    """Start the server, yield its URL once healthy, stop it (see the module docstring).
    `while_starting` runs meanwhile (the server takes about 15 s of imports on 2 cores)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = root / "server.log"
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--backend-store-uri=sqlite:///{root / 'mlflow.db'}",
        f"--artifacts-destination={root / 'artifacts'}",
        "--workers=1",
    ]
    # No job runner: it is not needed here and leaves huey stores in /dev/shm.
    env = os.environ | {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    if admin_password is not None:
        config = root / "basic_auth.ini"
        config.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
            f"admin_username = {ADMIN}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        command.append("--app-name=basic-auth")
        env |= {
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex(),
        }
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        if while_starting is not None:
            while_starting()
        _wait_healthy(url, process, log, timeout_s)
        yield url
    finally:
        stop_group(process)
