"""Local sources end to end: a folder (every caption form, plus hostile entries), WebDataset
tars in img2dataset's layout (one truncated, members that are not images) and Parquet files in
Hugging Face's image struct (a row without bytes, a corrupt file), in one data run beside a url
list; kept rows are encoded with their source, every bad row is counted by reason per source."""

import os
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import sources_override
from source_fixtures import write_parquet_images, write_webdataset_shards

from components.data import shard_format
from components.data.demo_corpus import write_folder_corpus, write_synthetic_corpus
from pipelines.data import run_data
from pipelines.data_layout import DataLayout

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UTF16_CAPTION = "a red circle in the center on a caf\u00e9 blue background"
CAPTIONS: dict[str, str] = {}
"""The folder corpus' captions by relpath (filled by the fixture)."""


def _hostile_folder(root: Path, outside: Path) -> dict[str, str]:
    """The folder corpus plus one of each hostile thing; {relpath: expected reason}."""
    items = write_folder_corpus(root, count=16, seed=1, max_side_px=160)
    expected = {item.relpath: item.expected_reason for item in items}
    CAPTIONS.update({item.relpath: item.caption for item in items if item.caption})
    outside.mkdir()
    (outside / "secret.jpg").write_bytes((root / items[0].relpath).read_bytes())
    (root / "escape.jpg").symlink_to(outside / "secret.jpg")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    (root / "empty.png").write_bytes(b"")
    (root / "folder.jpg").mkdir()
    # Images of their own (copies would be dropped as duplicates of the corpus' ones).
    extra = write_synthetic_corpus(outside / "extra", count=4, seed=77, max_side_px=160)
    inner, utf16, locked_item = [item for item in extra if item.expected_reason == "kept"][:3]
    # Inside the folder named like an image: an image that must still be listed.
    (root / "folder.jpg" / "inner.jpg").write_bytes(
        (outside / "extra" / inner.relpath).read_bytes()
    )
    (root / "folder.jpg" / "inner.txt").write_text(inner.caption)
    (root / "utf16.jpg").write_bytes((outside / "extra" / utf16.relpath).read_bytes())
    (root / "utf16.txt").write_bytes(UTF16_CAPTION.encode("utf-16"))
    (root / "locked.jpg").write_bytes((outside / "extra" / locked_item.relpath).read_bytes())
    (root / "locked.txt").write_text(locked_item.caption)
    os.chmod(root / "locked.jpg", 0)
    # Root reads a mode-000 file anyway; the unit tests cover "unreadable" there.
    locked = "unreadable" if os.geteuid() != 0 else "kept"
    expected |= {
        "escape.jpg": "symlink_outside_root",
        "loop.jpg": "symlink_loop",
        "empty.png": "empty_file",
        "folder.jpg": "not_a_file",
        "folder.jpg/inner.jpg": "kept",
        "utf16.jpg": "kept",
        "locked.jpg": locked,
    }
    return expected


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_models_dir, ray_local, make_tiny_config):
    base = tmp_path_factory.mktemp("local_sources")
    expected = {
        "photos": _hostile_folder(base / "photos", base / "outside"),
        "shards": write_webdataset_shards(base / "shards", base / "wds_images"),
        "hf": write_parquet_images(base / "hf", base / "hf_images"),
    }
    sources = sources_override(
        {
            "name": "photos",
            "kind": "folder",
            "paths": [base / "photos"],
            "metadata_file": "metadata.jsonl",
            "weight": 2.0,
        },
        {"name": "shards", "kind": "webdataset", "paths": [base / "shards"]},
        {"name": "hf", "kind": "parquet_images", "paths": [base / "hf"]},
    )
    config = make_tiny_config(
        base / "run", tiny_models_dir, sources, "data.resources.chunk_size=10"
    )
    summary = run_data(config, show_progress=False)
    return config, summary, expected


def _outcomes(config) -> dict[str, dict[str, str]]:
    """{source: {locator: reason}} over every outcome and duplicate of the run."""
    layout = DataLayout(Path(config.run.root))
    dedup = {
        row["sample_key"]: row["reason"] for row in pq.read_table(layout.duplicates).to_pylist()
    }
    found: dict[str, dict[str, str]] = {}
    for path in sorted(layout.work.glob("chunk-*.parquet")):
        for row in pq.read_table(path).to_pylist():
            source, locator = row["url"].split(":", 1)
            found.setdefault(source, {})[locator] = dedup.get(row["sample_key"], row["reason"])
    return found


def _check_source(local_run, name: str) -> None:
    config, summary, expected = local_run
    found = _outcomes(config)[name]
    missing = set(expected[name]) - set(found)
    assert not missing, f"{name}: rows without an outcome: {sorted(missing)}"
    unexpected = {
        locator: reason for locator, reason in found.items() if locator not in expected[name]
    }
    assert set(unexpected.values()) <= {"truncated_tar"}, unexpected
    for locator, reason in expected[name].items():
        assert found[locator] == reason, (name, locator, found[locator])
    root = Path(config.run.root) / "data"
    manifest = shard_format.read_manifest(root)
    (source,) = [item for item in manifest["sources"] if item["name"] == name]
    kept = Counter(found.values())["kept"]
    assert source["counts"]["encoded"] == kept > 0
    keys = []
    for entry in manifest["shards"]:
        if entry["source"] == name:
            table = shard_format.read_shard(root / entry["path"])
            assert set(table["source"].to_pylist()) == {name}
            keys += table["url"].to_pylist()
    assert len(keys) == kept and all(key.startswith(f"{name}:") for key in keys)
    rejected = sum(sum(reasons.values()) for reasons in source["counts"]["rejected"].values())
    assert rejected + kept == source["counts"]["source_rows"] == len(found)


def test_folder_source_reads_every_caption_form_and_counts_hostile_entries(local_run):
    _check_source(local_run, "photos")
    config, _, _ = local_run
    root = Path(config.run.root) / "data"
    captions = {}
    for path in shard_format.list_shards(root):
        table = shard_format.read_shard(path)
        captions |= dict(zip(table["url"].to_pylist(), table["caption"].to_pylist(), strict=True))
    assert captions["photos:utf16.jpg"] == UTF16_CAPTION
    # Every kept image carries its caption, whichever form (txt, json, metadata) gave it.
    kept = [relpath for relpath, reason in local_run[2]["photos"].items() if reason == "kept"]
    for relpath in kept:
        if relpath in CAPTIONS:
            assert captions[f"photos:{relpath}"] == CAPTIONS[relpath], relpath


def test_webdataset_source_keeps_complete_samples_and_counts_bad_members(local_run):
    _check_source(local_run, "shards")
    config, _, _ = local_run
    found = _outcomes(config)["shards"]
    damaged = [locator for locator, reason in found.items() if reason == "truncated_tar"]
    assert len(damaged) == 1 and damaged[0].startswith("00001.tar::")
    assert found["00001.tar::000010002"] == "kept"


def test_parquet_image_source_reads_the_hugging_face_struct(local_run):
    _check_source(local_run, "hf")


def test_manifest_records_per_source_weights_and_counts(local_run):
    config, summary, _ = local_run
    manifest = shard_format.read_manifest(Path(config.run.root) / "data")
    weights = {source["name"]: source["weight"] for source in manifest["sources"]}
    assert weights == {"photos": 2.0, "shards": 1.0, "hf": 1.0}
    assert summary.source_rows == sum(s["counts"]["source_rows"] for s in manifest["sources"])
