"""`inspect_dataset` and `qwenflux data inspect`: one contact sheet per non-empty bucket of the
tiny data run and a counts chart, byte-identical on a rerun; a bucket whose fitted files were
cleaned up is drawn without them and counted; per-source counts come from the manifest's
sources or its shard entries; the PNGs go to an MLflow run."""

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.data import shard_format
from components.data.buckets import Bucket
from components.data.dataset_picture import contact_sheet
from pipelines.cli import _parser, main
from pipelines.data_inspect import inspect_dataset, log_inspection
from pipelines.data_layout import DataLayout, FittedImageWriter

pytestmark = pytest.mark.integration


def _copy_run(run_root: Path, into: Path) -> Path:
    """The tiny run's data folder (manifests, shards, fitted work files) in a folder of its
    own, so inspecting and deleting work files leaves the shared session run as it was."""
    shutil.copytree(
        run_root / "data", into / "data", ignore=shutil.ignore_patterns("corpus", "chunk-*.parquet")
    )
    return into


@pytest.fixture(scope="module")
def tiny_run(tiny_data_run, tmp_path_factory) -> Path:
    config, _ = tiny_data_run
    return _copy_run(Path(config.run.root), tmp_path_factory.mktemp("inspect_run"))


def _expected_size(num_tiles: int) -> tuple[int, int]:
    blank = Image.new("RGB", (16, 16))
    return contact_sheet([(blank, "")] * num_tiles, title="one line").size


def test_one_sheet_per_bucket_and_a_counts_chart(tiny_run):
    manifest = shard_format.read_manifest(tiny_run / "data")
    report = inspect_dataset(tiny_run, samples_per_bucket=16)
    non_empty = {
        bucket_id: entry["num_samples"]
        for bucket_id, entry in manifest["buckets"].items()
        if entry["num_samples"]
    }
    out_dir = tiny_run / "data" / "inspect" / f"v{manifest['version']:04d}"
    assert report.out_dir == out_dir
    assert sorted(path.name for path in out_dir.iterdir()) == sorted(
        [f"bucket={bucket_id}.png" for bucket_id in non_empty] + ["counts.png"]
    )
    assert report.tiles == {bucket_id: min(16, count) for bucket_id, count in non_empty.items()}
    assert report.buckets_missing_images == 0
    for sheet in report.sheets:
        with Image.open(sheet.path) as image:
            assert image.size == _expected_size(sheet.num_tiles)
    assert report.counts_path.is_file()
    assert report.counts["rejected by stage/reason"] == {
        f"{stage}/{reason}": count
        for stage, reasons in manifest["counts"]["rejected"].items()
        for reason, count in reasons.items()
    }
    per_bucket = report.counts["samples per bucket"]
    assert sum(per_bucket.values()) == manifest["counts"]["encoded"]
    assert set(per_bucket) == set(manifest["buckets"])
    if "samples per source" in report.counts:
        assert sum(report.counts["samples per source"].values()) == manifest["counts"]["encoded"]


def test_rerun_gives_identical_bytes(tiny_run):
    first = inspect_dataset(tiny_run)
    before = {path: path.read_bytes() for path in first.paths}
    second = inspect_dataset(tiny_run)
    assert second.paths == first.paths
    assert {path: path.read_bytes() for path in second.paths} == before
    assert not [path for path in first.out_dir.iterdir() if path.name.startswith(".")]


def test_cleaned_up_work_files_are_counted_not_fatal(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path)
    manifest = shard_format.read_manifest(run / "data")
    non_empty = [bucket for bucket, entry in manifest["buckets"].items() if entry["num_samples"]]
    gone, thinned = non_empty[:2]
    layout = DataLayout(run)
    for path in sorted((layout.work / "fitted").glob(f"chunk-*/bucket={gone}.parquet")):
        path.unlink()
    chunks = [
        shard_format.shard_chunk_index(Path(shard["path"]))
        for shard in manifest["shards"]
        if shard["bucket_id"] == thinned
    ]
    first_chunk = layout.fitted_images(min(chunks), thinned)
    first_chunk.unlink()
    report = inspect_dataset(run)
    sheets = {sheet.bucket_id: sheet for sheet in report.sheets}
    assert sheets[gone].num_tiles == 0
    assert sheets[gone].missing_fitted
    assert sheets[thinned].missing_fitted == (str(first_chunk.relative_to(layout.data)),)
    assert report.buckets_missing_images == 2
    with Image.open(sheets[gone].path) as image:
        assert image.size[1] < _expected_size(1)[1]


def test_cli_inspects_a_run_directory(tiny_run, capsys):
    assert main(["data", "inspect", str(tiny_run)]) == 0
    printed = capsys.readouterr().out
    assert "counts.png" in printed and "samples per bucket" in printed
    assert main(["data", "inspect", str(tiny_run), "--version", "999"]) == 2
    assert "no dataset version 999" in capsys.readouterr().err
    plain = _parser().parse_args(["data", "--config", "tiny"])
    assert (plain.action, plain.run_dir, plain.version) == (None, None, None)


def _hand_made_run(root: Path, *, sources: list, shard_sources: bool) -> Path:
    """A run directory of two sources in two chunks (bucket 32x16 only), written directly."""
    layout = DataLayout(root)
    bucket = Bucket("32x16", "2:1", 32, 16)
    shards = []
    for chunk, source in enumerate(("web", "folder")):
        keys = [f"{chunk:05d}{row:04d}" for row in range(3)]
        with FittedImageWriter(layout, chunk) as fitted:
            for row, key in enumerate(keys):
                fitted.add(key, bucket, Image.new("RGB", (32, 16), (40 * row, 100, 50 * chunk)))
        path = shard_format.shard_path(layout.data, bucket.bucket_id, chunk)
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = {"sample_key": keys, "caption": [f"{source} caption {key}" for key in keys]}
        pq.write_table(pa.table({**columns, "source": [source] * len(keys)}), path)
        entry = {"path": str(path.relative_to(layout.data)), "bucket_id": "32x16", "num_rows": 3}
        shards.append({**entry, "source": source} if shard_sources else entry)
    buckets = {
        "32x16": {"aspect": "2:1", "width_px": 32, "height_px": 16, "num_samples": 6},
        "16x32": {"aspect": "1:2", "width_px": 16, "height_px": 32, "num_samples": 0},
    }
    counts = {"encoded": 6, "source_rows": 7, "rejected": {"filter": {"too_small": 1}}}
    manifest = {"version": 1, "buckets": buckets, "shards": shards, "counts": counts}
    shard_format.write_manifest(layout.data, {**manifest, "sources": sources})
    return root


def test_samples_per_source_from_sources_then_shards(tmp_path):
    with_counts = [
        {"name": "web", "counts": {"encoded": 3, "source_rows": 4}},
        {"name": "folder", "counts": {"encoded": 3, "source_rows": 3}},
    ]
    run = _hand_made_run(tmp_path / "a", sources=with_counts, shard_sources=False)
    report = inspect_dataset(run, samples_per_bucket=4)
    assert report.counts["samples per source"] == {"web": 3, "folder": 3}
    assert report.tiles == {"32x16": 4}
    assert report.counts["samples per bucket"] == {"32x16": 6, "16x32": 0}

    plain = [{"name": "web"}, {"name": "folder"}]
    run = _hand_made_run(tmp_path / "b", sources=plain, shard_sources=True)
    assert inspect_dataset(run).counts["samples per source"] == {"folder": 3, "web": 3}

    run = _hand_made_run(tmp_path / "c", sources=plain, shard_sources=False)
    report = inspect_dataset(run, seed=1)
    assert "samples per source" not in report.counts
    assert report.tiles == {"32x16": 6}


def test_inspection_is_logged_to_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    run = _hand_made_run(tmp_path / "run", sources=[], shard_sources=True)
    report = inspect_dataset(run)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("inspect", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    log_inspection(report, run_id=run_id, tracking_uri=uri)
    logged = sorted(Path(item.path).name for item in client.list_artifacts(run_id, "data_inspect"))
    assert logged == ["bucket=32x16.png", "counts.png"]
