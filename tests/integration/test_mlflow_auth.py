"""MLflow for a team: a real `mlflow server` with its basic-auth app on 127.0.0.1. Without
credentials the workflow fails at once with a clear error (no Ray session, no workflow record);
with a user's credentials from the environment it tracks, trains (rank 0 logs from a Ray Train
worker), gates and registers; a user with read permission only cannot promote."""

import os
from pathlib import Path

import pytest
from conftest import tiny_overrides
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient
from mlflow_servers import ADMIN, mlflow_server

from pipelines.cli import main
from pipelines.config import load_config
from pipelines.run_layout import RunLayout

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.cluster]

ADMIN_PASSWORD = "admin-password-for-this-test"
USERS = {"trainer": "trainer-password-1", "reader": "reader-password-1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(
        tmp_path_factory.mktemp("auth_server"), admin_password=ADMIN_PASSWORD
    ) as url:
        from mlflow.server import get_app_client

        with _credentials(ADMIN, ADMIN_PASSWORD):
            users = get_app_client("basic-auth", tracking_uri=url)
            for name, password in USERS.items():
                users.create_user(username=name, password=password)
        yield url


class _credentials:
    """MLflow credentials in the environment for a block (as a user would export them)."""

    def __init__(self, username: str | None, password: str | None) -> None:
        self.values = {"MLFLOW_TRACKING_USERNAME": username, "MLFLOW_TRACKING_PASSWORD": password}

    def __enter__(self):
        self.saved = {key: os.environ.get(key) for key in self.values}
        _set_environment(self.values)

    def __exit__(self, *exc):
        _set_environment(self.saved)


def _set_environment(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _args(tiny_trained_run, tiny_models_dir, root: Path, server: str) -> list[str]:
    session_config, _ = tiny_trained_run
    overrides = tiny_overrides(
        root,
        tiny_models_dir,
        f"train.dataset={session_config.train.dataset}",
        f"tracking.tracking_uri={server}",
    )
    return ["--config", "tiny", *(word for item in overrides for word in ("--set", item))]


def test_without_credentials_the_workflow_stops_before_any_work(
    server, tiny_trained_run, tiny_models_dir, tmp_path, capsys
):
    args = _args(tiny_trained_run, tiny_models_dir, tmp_path / "run", server)
    with _credentials(None, None):
        assert main(["run", "all", *args]) == 2
    error = capsys.readouterr().err
    assert f"MLflow at {server} refused no credentials (HTTP 401)" in error
    assert "MLFLOW_TRACKING_USERNAME" in error
    with _credentials("trainer", "wrong-password"):
        assert main(["run", "train", *args]) == 2
    assert "refused user 'trainer' (HTTP 401)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "work started before the credentials were checked"


def test_a_user_trains_and_registers_and_a_reader_cannot_promote(
    server, tiny_trained_run, tiny_models_dir, tmp_path, capsys
):
    root = tmp_path / "run"
    args = _args(tiny_trained_run, tiny_models_dir, root, server)
    with _credentials("trainer", USERS["trainer"]):
        assert main(["run", "register", *args]) == 0
    config = load_config("tiny", [arg for arg in args[3::2]])
    assert RunLayout(config).tracking_uri == server
    with _credentials(ADMIN, ADMIN_PASSWORD):
        client = MlflowClient(server)
        name = config.registry.model_name
        (found,) = client.search_model_versions(f"name = '{name}'")
        version = client.get_model_version(name, found.version)  # search leaves aliases out
        assert "candidate" in version.aliases and "champion" not in version.aliases
        training = client.get_run(version.tags["training_run_id"])
        owner = get_app_client("basic-auth", tracking_uri=server).get_user_permission(
            "trainer", "experiment", training.info.experiment_id
        )
        assert owner.permission == "MANAGE", "the trainer did not create the experiment"
        stages = client.search_runs(
            [training.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{training.info.run_id}'",
        )
        assert len(stages) == 3 and all(run.data.metrics["loss"] > 0 for run in stages)
    capsys.readouterr()
    with _credentials("reader", USERS["reader"]):
        assert main(["promote", *args]) == 2
    error = capsys.readouterr().err
    assert "user 'reader' may not move the aliases of" in error and "PERMISSION_DENIED" in error
    with _credentials(ADMIN, ADMIN_PASSWORD):
        assert "champion" not in client.get_model_version(name, version.version).aliases
