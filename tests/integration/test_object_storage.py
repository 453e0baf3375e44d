"""Object storage: the tiny workflow (`qwenflux run all`) with Ray Train's checkpoints
(`train.storage_path`) and MLflow's artifacts (`tracking.artifact_location`) in an S3 bucket on a
real S3-compatible server on 127.0.0.1 (moto's standalone server, spoken to over HTTP by
pyarrow, Ray Train, boto3 and MLflow). Training writes its checkpoints there, registration
reads the final one back, the registered package is stored there and batch inference loads it
from there; the run directory keeps neither a checkpoint folder nor an artifact folder."""

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides
from mlflow.tracking import MlflowClient
from s3_server import s3_client, s3_server
from subprocess_runs import start_group

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.cluster]

BUCKET = "qwenflux-runs"


def test_checkpoints_and_artifacts_live_in_the_bucket(tmp_path, tiny_models_dir):
    requests = tmp_path / "requests.jsonl"
    row = {"id": "red", "mode": "text", "prompt": "a white circle on a red background", "seed": 1}
    requests.write_text(json.dumps(row) + "\n")
    root = tmp_path / "run"
    overrides = tiny_overrides(
        root,
        tiny_models_dir,
        "data.synthetic.count=40",
        "data.resources.chunk_size=16",
        f"train.storage_path=s3://{BUCKET}/train",
        f"tracking.artifact_location=s3://{BUCKET}/mlartifacts",
        f"infer.requests_file={requests}",
    )
    command = [sys.executable, "-m", "pipelines.cli", "run", "all", "--config", "tiny"]
    command += [argument for item in overrides for argument in ("--set", item)]
    with s3_server(tmp_path / "s3", bucket=BUCKET) as env:
        process = start_group(command, env=os.environ | env)
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, output[-4000:]
        client = s3_client(env)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        keys = [item["Key"] for page in pages for item in page.get("Contents", [])]

    (record_path,) = (root / "workflow" / "runs").glob("*.json")
    record = json.loads(record_path.read_text())
    assert record["state"] == "finished"
    training = record["steps"]["train"]["outputs"]["training"]
    states = [key for key in keys if key.startswith(f"train/{training}/checkpoint_")]
    assert any(key.endswith("/state.json") for key in states), keys[:20]
    assert record["steps"]["train"]["outputs"]["checkpoint"].startswith(
        f"s3://{BUCKET}/train/{training}/checkpoint_"
    )
    assert any(key.startswith("mlartifacts/") and "/checkpoints/stage" in key for key in keys)
    assert not (root / "train").exists() and not (root / "mlartifacts").exists()
    # Registration read the final checkpoint back from the bucket into the run directory.
    assert list((root / "train-cache" / training).glob("checkpoint_*/state.json"))

    version = record["steps"]["register"]["outputs"]["version"]
    mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    model_version = mlflow.get_model_version("qwen2vl-flux-tiny", version)
    logged = mlflow.get_logged_model(model_version.source.removeprefix("models:/"))
    # The registered package lies in the bucket, under the logged model's artifact location.
    assert logged.artifact_location.startswith(f"s3://{BUCKET}/mlartifacts/")
    prefix = logged.artifact_location.removeprefix(f"s3://{BUCKET}/")
    package_files = [key for key in keys if key.startswith(prefix)]
    assert any(key.endswith("/package.json") for key in package_files), package_files[:10]
    infer = record["steps"]["infer"]["outputs"]
    assert (infer["ok"], infer["failed"]) == (1, 0)
    assert (Path(infer["out_dir"]) / "images" / "red.png").is_file()
