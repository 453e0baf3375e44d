"""`qwenflux submit` before any cluster is reached: the workflow command it sends (a run id is
added when none is given, and names the submission), and the errors that stop it at once."""

import pytest

from pipelines.cli import main
from pipelines.environment import FORWARDED_ENV, submitted_environment
from pipelines.submit import SubmitError, workflow_command

pytestmark = pytest.mark.unit


def test_a_run_id_is_added_once_and_kept_when_given():
    command, run_id, target = workflow_command(["run", "all", "--config", "a100x8"])
    assert target == "all" and run_id.startswith("a100x8-")
    assert command == ["run", "all", "--config", "a100x8", "--run-id", run_id]
    given = ["run", "train", "--config", "tiny", "--run-id", "nightly-2026-12-01"]
    assert workflow_command(given) == (given, "nightly-2026-12-01", "train")
    with pytest.raises(SubmitError, match="run TARGET"):
        workflow_command(["data", "--config", "tiny"])


def test_credentials_come_from_the_environment_only_when_set(monkeypatch):
    for key in FORWARDED_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    passed = submitted_environment()
    assert passed["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert passed["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
    assert "AWS_SECRET_ACCESS_KEY" not in passed and passed["HF_HUB_OFFLINE"] == "1"


def test_a_bad_workflow_command_fails_here_before_any_job(capsys, monkeypatch):
    monkeypatch.delenv("RAY_JOB_SUBMISSION_ADDRESS", raising=False)
    address = ["--address", "http://127.0.0.1:9"]  # nothing listens: never reached
    assert main(["submit", *address, "--", "data", "--config", "tiny"]) == 2
    assert "run TARGET" in capsys.readouterr().err
    assert main(["submit", *address, "--", "run", "all", "--set", "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err
    assert main(["submit", "--", "run", "all", "--config", "tiny"]) == 2
    assert "--address" in capsys.readouterr().err
