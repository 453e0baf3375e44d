"""Reaching the MLflow server before any work starts, and saying why when it cannot be reached.

A tracking URI that names a server (http:// or https://) is probed once at the start of every
command that tracks or registers: one experiments search with the credentials MLflow's client
itself reads from the environment (MLFLOW_TRACKING_USERNAME / _PASSWORD, or _TOKEN). Missing or
wrong credentials (HTTP 401), a user without read access (403) or a server that does not answer
stop the command there, with the URI and what to set, before any Ray session, data or workflow
record exists. Local stores (sqlite:, file:) need no probe.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

from pipelines.environment import tracking_credentials

PROBE_TIMEOUT_S = 15.0


class TrackingAccessError(RuntimeError):
    """The MLflow server refused or did not answer."""


def check_tracking_access(tracking_uri: str) -> None:
    """Raise TrackingAccessError unless the server at `tracking_uri` answers a read."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    url = f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
    request = urllib.request.Request(url, headers=_auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as response:
            json.load(response)
    except urllib.error.HTTPError as error:
        raise TrackingAccessError(_refusal(tracking_uri, error.code)) from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise TrackingAccessError(
            f"MLflow at {tracking_uri} did not answer ({error}); check tracking.tracking_uri "
            "and that the server runs"
        ) from None


def _auth_headers() -> dict[str, str]:
    username, password, token = tracking_credentials()
    if token:
        return {"Authorization": f"Bearer {token}"}
    if username:
        pair = base64.b64encode(f"{username}:{password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    return {}


def _refusal(tracking_uri: str, status: int) -> str:
    username, _, token = tracking_credentials()
    if status == 401:
        given = "a token" if token else f"user {username!r}" if username else "no credentials"
        return (
            f"MLflow at {tracking_uri} refused {given} (HTTP 401): set MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment"
        )
    if status == 403:
        return (
            f"MLflow at {tracking_uri}: user {username!r} may not read experiments (HTTP 403); "
            "ask an MLflow admin for READ or EDIT permission"
        )
    return f"MLflow at {tracking_uri} answered HTTP {status} to a read"


def permission_denied(error: Exception, *, action: str, tracking_uri: str) -> Exception:
    """A TrackingAccessError for an MLflow PERMISSION_DENIED error (else `error` itself)."""
    if getattr(error, "error_code", "") != "PERMISSION_DENIED":
        return error
    username, _, _ = tracking_credentials()
    return TrackingAccessError(
        f"MLflow at {tracking_uri}: user {username!r} may not {action} (PERMISSION_DENIED); "
        "it needs EDIT or MANAGE permission on the registered model"
    )
