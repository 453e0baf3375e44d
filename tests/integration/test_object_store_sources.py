"""WebDataset tars and Parquet image files read from an S3 bucket on a real S3-compatible server
on 127.0.0.1 (moto's standalone server over HTTP, read through pyarrow's S3 filesystem in the
chunk tasks): `qwenflux data` with a brace pattern naming the bucket's shards (one of them
absent), kept rows encoded with their source, bad members and the absent shard counted by
reason; a re-uploaded shard changes the workflow's input fingerprint."""

import os
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import sources_override, tiny_overrides
from s3_server import s3_client, s3_server
from source_fixtures import write_parquet_images, write_webdataset_shards
from subprocess_runs import start_group

from components.data import shard_format
from pipelines.config import load_config
from pipelines.data_layout import DataLayout
from pipelines.data_sources import lists_fingerprint

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.cluster]

BUCKET = "datasets"


def _upload(client, folder: Path, prefix: str) -> None:
    for path in sorted(folder.iterdir()):
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")


def _outcomes(root: Path) -> dict[str, dict[str, str]]:
    """{source: {locator: reason}} over every chunk outcome of the run."""
    found: dict[str, dict[str, str]] = {}
    for path in sorted(DataLayout(root).work.glob("chunk-*.parquet")):
        for row in pq.read_table(path).to_pylist():
            source, locator = row["url"].split(":", 1)
            found.setdefault(source, {})[locator] = row["reason"]
    return found


def test_tars_and_parquet_images_in_a_bucket(tmp_path, tiny_models_dir, monkeypatch):
    expected = {
        "shards": write_webdataset_shards(tmp_path / "shards", tmp_path / "wds_images"),
        "hf": write_parquet_images(tmp_path / "hf", tmp_path / "hf_images"),
    }
    # The pattern names three shards; the bucket holds two.
    expected["shards"]["00002.tar::"] = "unreadable"
    root = tmp_path / "run"
    overrides = tiny_overrides(
        root,
        tiny_models_dir,
        sources_override(
            {
                "name": "shards",
                "kind": "webdataset",
                "paths": [f"s3://{BUCKET}/wds/{{00000..00002}}.tar"],
            },
            {"name": "hf", "kind": "parquet_images", "paths": [f"s3://{BUCKET}/hf/"]},
        ),
        "data.resources.chunk_size=8",
    )
    command = [sys.executable, "-m", "pipelines.cli", "data", "--config", "tiny"]
    command += [argument for item in overrides for argument in ("--set", item)]
    with s3_server(tmp_path / "s3", bucket=BUCKET) as env:
        client = s3_client(env)
        _upload(client, tmp_path / "shards", "wds")
        _upload(client, tmp_path / "hf", "hf")
        process = start_group(command, env=os.environ | env)
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-4000:]

        for key, value in env.items():
            monkeypatch.setenv(key, value)
        config = load_config("tiny", overrides)
        before = lists_fingerprint(config.data)
        # Same name, other bytes: the first shard without its last sample.
        shard = tmp_path / "shards" / "00000.tar"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        client.upload_file(str(shard), BUCKET, "wds/00000.tar")
        after = lists_fingerprint(config.data)

    found = _outcomes(root)
    for name in ("shards", "hf"):
        for locator, reason in expected[name].items():
            assert found[name].get(locator) == reason, (name, locator, found[name].get(locator))
        unexpected = {key: value for key, value in found[name].items() if key not in expected[name]}
        assert set(unexpected.values()) <= {"truncated_tar"}, unexpected
    manifest = shard_format.read_manifest(root / "data")
    encoded = {entry["name"]: entry["counts"]["encoded"] for entry in manifest["sources"]}
    kept = {name: Counter(found[name].values())["kept"] for name in found}
    assert encoded == kept and min(kept.values()) > 0
    assert (
        set(before)
        == set(after)
        == {
            "shards/00000.tar",
            "shards/00001.tar",
            "shards/00002.tar",
            "hf/train-00000.parquet",
            "hf/train-00001.parquet",
        }
    )
    changed = {key for key in before if before[key] != after[key]}
    assert changed == {"shards/00000.tar"}
