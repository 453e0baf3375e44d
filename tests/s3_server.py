"""A real S3-compatible endpoint on 127.0.0.1: moto's standalone server (its HTTP API, not an
in-process mock), for the object-storage tests.

    with s3_server(root, bucket="runs") as env: ...   env: the AWS_* variables that point
                                                       boto3, pyarrow, Ray and MLflow at it
    s3_client(env)                                     a boto3 client of that server

The server runs in its own session and is stopped by whoever started it, on the way out.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from mlflow_servers import free_port
from subprocess_runs import stop_group


@contextlib.contextmanager
def s3_server(root: Path, *, bucket: str, timeout_s: float = 60) -> Iterator[dict[str, str]]:
    """Start moto_server, create `bucket`, yield the client environment, stop the server."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = root / "moto.log"
    command = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, cwd=root, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "qwenflux-test",
        "AWS_SECRET_ACCESS_KEY": "qwenflux-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
        "MLFLOW_S3_ENDPOINT_URL": url,
    }
    try:
        _wait_up(url, process, log, timeout_s)
        s3_client(env).create_bucket(Bucket=bucket)
        yield env
    finally:
        stop_group(process)


def s3_client(env: dict[str, str]):
    """A boto3 S3 client for the server `s3_server` yielded `env` for."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def _wait_up(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited ({process.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except (OSError, urllib.error.URLError):
            time.sleep(0.3)
    raise RuntimeError(f"moto_server not up after {timeout_s} s:\n{log.read_text()}")
