"""`qwenflux import-release --register` and `qwenflux export --format release` through the real
CLI parser and MLflow (SQLite): the import becomes a registered version tagged as imported with
the source's file hashes and no alias; exporting that version writes the released layout."""

import json

import pytest
from mlflow.tracking import MlflowClient
from release_fixture import build_tiny_release

from pipelines.cli import main

pytestmark = [pytest.mark.integration]


def test_import_register_and_export_from_the_registry(tmp_path, tiny_models_dir, capsys):
    source = build_tiny_release(tmp_path / "release", tiny_models_dir)
    root = tmp_path / "run"
    config = ["--config", "tiny", "--set", f"run.root={root}"]
    package = tmp_path / "imported"
    assert (
        main(
            [
                "import-release",
                str(source),
                "--out",
                str(package),
                "--register",
                "released",
                *config,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "registered as models:/released/1" in printed and "infer.controlnet=" in printed
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    version = client.get_model_version("released", "1")
    manifest = json.loads((package / "package.json").read_text())
    assert version.tags["imported"] == "true"
    assert version.tags["imported_from"] == str(source.absolute())
    hashes = {
        key.removeprefix("import.sha256."): value
        for key, value in version.tags.items()
        if key.startswith("import.sha256.")
    }
    assert hashes == manifest["import"]["files"] and "qwen2-vl/connector.pt" in hashes
    assert client.get_registered_model("released").aliases == {}
    run = client.get_run(version.run_id)
    assert run.data.tags["qwenflux.kind"] == "import" and run.info.status == "FINISHED"

    out = tmp_path / "exported"
    assert (
        main(
            [
                "export",
                "--format",
                "release",
                "--model",
                "models:/released/1",
                "--out",
                str(out),
                *config,
            ]
        )
        == 0
    )
    assert (out / "qwen2-vl" / "connector.pt").is_file()
    assert (out / "qwen2-vl" / "t5_embedder.pt").is_file()
    assert (out / "flux" / "transformer" / "config.json").is_file()
    # The same command again refuses to overwrite what it wrote.
    assert (
        main(["export", "--format", "release", "--model", str(package), "--out", str(out), *config])
        == 2
    )
    assert "already exists" in capsys.readouterr().err
