"""Model Registry against a real `mlflow server` on 127.0.0.1 (and once against plain SQLite):
register with lineage and gate tags, promote by the gate, resolve aliases and versions back to
verified packages, serve one request through the pyfunc flavour."""

import io
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from checkpoint_files import write_checkpoint
from mlflow.tracking import MlflowClient
from mlflow_servers import mlflow_server
from PIL import Image

from components.inference.generator_parts import GeneratorSettings
from components.inference.package import export_package, load_package
from components.inference.registry import (
    PYFUNC_RESULT_COLUMNS,
    RegistryError,
    load_parts,
    promote,
    register_model,
    resolve_package,
)

pytestmark = pytest.mark.integration

MODEL = "flux-qwen2vl"
SETTINGS = GeneratorSettings(
    instruction="Describe this image.",
    image_tokens=16,
    vae_scaling_factor=1.0,
    vae_shift_factor=0.0,
)


@pytest.fixture(scope="module")
def server_uri(request, tmp_path_factory):
    """A real MLflow 3.17 tracking + registry server (SQLite backend, proxied artifacts); the
    test packages are exported while it starts."""
    root = tmp_path_factory.mktemp("mlflow_server")
    with mlflow_server(root, while_starting=lambda: request.getfixturevalue("packages")) as url:
        yield url


def _package(models, folder: Path, *, seed: int) -> Path:
    """A package whose checkpoint trained only the connector (seeded) and tail norm."""
    generator = torch.Generator().manual_seed(seed)
    weights = {
        "connector.weight": torch.randn(32, 16, generator=generator),
        "connector.bias": torch.randn(32, generator=generator),
        "tail.norm.weight": 1 + 0.1 * torch.randn(16, generator=generator),
    }
    write_checkpoint(folder / "checkpoint", weights)
    return export_package(
        checkpoint_dir=folder / "checkpoint",
        qwen2vl=str(models.qwen2vl),
        qwen2vl_revision=None,
        flux=str(models.flux),
        flux_revision=None,
        settings=SETTINGS,
        lineage={"training_run_id": f"seed-{seed}"},
        out_dir=folder / "package",
    )


@pytest.fixture(scope="module")
def packages(tiny_models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("packages")
    return [_package(tiny_models_dir, root / f"p{seed}", seed=seed) for seed in (1, 2)]


def _training_run(client: MlflowClient, experiment: str, artifact_location: str | None = None):
    experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
    return client.create_run(experiment_id).info.run_id


def _lineage(run_id: str, number: int) -> dict[str, str]:
    return {
        "training_run_id": run_id,
        "data_manifest_id": f"manifest-{number}",
        "git_sha": f"sha{number}",
        "config_hash": f"hash{number}",
    }


@pytest.fixture(scope="module")
def registry(server_uri, packages):
    """Versions 1 (loss 0.5, package 1), 2 (0.7, package 2); promotions recorded in order."""
    client = MlflowClient(server_uri)
    runs = [_training_run(client, "train-a"), _training_run(client, "train-b")]
    decisions = []
    versions = []
    for number, (run_id, package, loss) in enumerate(
        zip(runs, packages, (0.5, 0.7), strict=True), start=1
    ):
        versions.append(
            register_model(
                package_dir=package,
                tracking_uri=server_uri,
                model_name=MODEL,
                run_id=run_id,
                gate={"validation_loss": loss, "improvement": 0.2},
                tags=_lineage(run_id, number),
            )
        )
        decisions.append(promote(tracking_uri=server_uri, model_name=MODEL))
    return client, runs, versions, decisions


def test_versions_carry_lineage_gate_tags_and_the_candidate_alias(registry):
    client, runs, versions, _ = registry
    assert versions == ["1", "2"]
    for number, (run_id, version) in enumerate(zip(runs, versions, strict=True), start=1):
        model_version = client.get_model_version(MODEL, version)
        assert model_version.run_id == run_id
        assert model_version.tags == _lineage(run_id, number) | {
            "gate.validation_loss": ("0.5", "0.7")[number - 1],
            "gate.improvement": "0.2",
        }
        # Over REST a model version carries its logged model only in `source` (MLflow 3.17).
        assert model_version.source.startswith("models:/m-")
        logged = client.get_logged_model(model_version.source.removeprefix("models:/"))
        run = client.get_run(run_id)
        assert logged.source_run_id == run_id
        assert logged.experiment_id == run.info.experiment_id
        assert [output.model_id for output in run.outputs.model_outputs] == [logged.model_id]
    assert client.get_registered_model(MODEL).aliases["candidate"] == "2"
    assert mlflow.active_run() is None


def test_promotion_follows_the_gate(registry, server_uri, packages):
    client, runs, _, (first, worse) = registry
    assert first.promoted and first.champion_version is None and first.candidate_version == "1"
    assert not worse.promoted and (worse.candidate_value, worse.champion_value) == (0.7, 0.5)
    assert "does not beat" in worse.message
    again = promote(tracking_uri=server_uri, model_name=MODEL, version="1")
    assert not again.promoted and "already the champion" in again.message
    better = register_model(
        package_dir=packages[1],
        tracking_uri=server_uri,
        model_name=MODEL,
        run_id=runs[1],
        gate={"validation_loss": 0.3},
        tags=_lineage(runs[1], 2),
    )
    decision = promote(tracking_uri=server_uri, model_name=MODEL)
    assert decision.promoted and (decision.candidate_version, decision.champion_version) == (
        better,
        "1",
    )
    assert client.get_registered_model(MODEL).aliases["champion"] == better
    client.delete_model_version_tag(MODEL, better, "gate.validation_loss")
    with pytest.raises(RegistryError, match="gate.validation_loss"):
        promote(tracking_uri=server_uri, model_name=MODEL, version="2")
    # A candidate whose gate measured the champion on its own held-out rows (a newer dataset
    # version) is compared with that number, not with the champion's own tag.
    fairer = register_model(
        package_dir=packages[0],
        tracking_uri=server_uri,
        model_name=MODEL,
        run_id=runs[0],
        gate={"validation_loss": 0.4, "champion_validation_loss": 0.6},
        tags=_lineage(runs[0], 1) | {"gate.champion_version": better},
    )
    decision = promote(tracking_uri=server_uri, model_name=MODEL)
    assert decision.promoted and (decision.candidate_value, decision.champion_value) == (0.4, 0.6)
    assert client.get_registered_model(MODEL).aliases["champion"] == fairer


def _same_weights(parts, expected) -> None:
    for name in ("transformer", "tail", "connector"):
        loaded, wanted = getattr(parts, name).state_dict(), getattr(expected, name).state_dict()
        assert loaded.keys() == wanted.keys()
        assert all(torch.equal(loaded[key], wanted[key]) for key in wanted), name


def test_resolve_by_alias_and_version_and_load_parts(registry, server_uri, packages, tmp_path):
    cache = tmp_path / "cache"
    by_version, name, version = resolve_package(
        f"models:/{MODEL}/2", tracking_uri=server_uri, dst=cache
    )
    assert (by_version, name, version) == (cache / MODEL / "2", MODEL, "2")
    assert json.loads((by_version / "package.json").read_text()) == json.loads(
        (packages[1] / "package.json").read_text()
    )
    champion = registry[0].get_registered_model(MODEL).aliases["champion"]
    by_alias = resolve_package(f"models:/{MODEL}@champion", tracking_uri=server_uri, dst=cache)
    assert by_alias == (cache / MODEL / champion, MODEL, champion)
    stamp = (by_version / "connector.safetensors").stat().st_mtime_ns
    assert resolve_package(f"models:/{MODEL}/2", tracking_uri=server_uri, dst=cache)[0] == (
        by_version
    )
    assert (by_version / "connector.safetensors").stat().st_mtime_ns == stamp
    assert not [path.name for path in (cache / MODEL).iterdir() if ".partial-" in path.name]
    parts = load_parts(f"models:/{MODEL}/1", tracking_uri=server_uri, cache_dir=cache)
    assert (parts.name, parts.version) == (MODEL, "1")
    _same_weights(parts, load_package(packages[0]))


def test_unknown_model_alias_or_version_is_a_clear_error(registry, server_uri, tmp_path):
    with pytest.raises(RegistryError, match="no alias 'production' \\(aliases: candidate, champ"):
        resolve_package(f"models:/{MODEL}@production", tracking_uri=server_uri, dst=tmp_path)
    with pytest.raises(RegistryError, match="has no version 99"):
        resolve_package(f"models:/{MODEL}/99", tracking_uri=server_uri, dst=tmp_path)
    with pytest.raises(RegistryError, match="'nope' does not exist"):
        load_parts("models:/nope@champion", tracking_uri=server_uri, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="not models:/NAME@ALIAS"):
        resolve_package("runs:/abc/model", tracking_uri=server_uri, dst=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_pyfunc_flavour_serves_request_rows(registry, server_uri, tmp_path):
    client = registry[0]
    model_dir = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri(MODEL, "1"),
        dst_path=str(tmp_path),
        tracking_uri=server_uri,
    )
    model = mlflow.pyfunc.load_model(model_dir)
    # The batch-inference schema (components/inference/request_schema.py): the size is an
    # aspect ("WxH" or a ratio name), images are encoded bytes.
    requests = pd.DataFrame(
        [
            ["ok-1", "text", "a red cat", "32x48", 0, 1, 3.5, 0.8, None, None],
            ["bad-1", "variation", "", "32x32", 0, 1, float("nan"), 0.8, None, None],
        ],
        columns=["id", "mode", "prompt", "aspect", "seed", "steps", "guidance"]
        + ["strength", "image", "mask"],
    )
    results = model.predict(requests)
    assert list(results.columns) == list(PYFUNC_RESULT_COLUMNS)
    assert list(results.columns)[:4] == ["id", "status", "error_field", "error"]
    assert list(results.columns)[-1] == "png"
    ok, bad = results.to_dict("records")
    assert (ok["id"], ok["status"], ok["error"]) == ("ok-1", "ok", "")
    assert Image.open(io.BytesIO(ok["png"])).size == (32, 48)
    assert (bad["status"], bad["png"]) == ("error", None) and "image" in bad["error"]
    assert bad["error_field"] == "image" and bad["error"].startswith("image: ")


def test_plain_sqlite_registry_without_a_server(packages, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = _training_run(client, "train", (tmp_path / "artifacts").as_uri())
    version = register_model(
        package_dir=packages[0],
        tracking_uri=uri,
        model_name=MODEL,
        run_id=run_id,
        gate={"validation_loss": 0.4},
        tags={"training_run_id": run_id},
    )
    assert promote(tracking_uri=uri, model_name=MODEL).promoted
    package, _, resolved = resolve_package(
        f"models:/{MODEL}@champion", tracking_uri=uri, dst=tmp_path / "cache"
    )
    assert resolved == version == "1"
    assert (package / "connector.safetensors").read_bytes() == (
        packages[0] / "connector.safetensors"
    ).read_bytes()
