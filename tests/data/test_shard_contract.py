"""The shard contract, checked on a dataset root: the tiny one built here, or a real one with
`pytest tests/data --dataset-root=/path/to/run/data`."""

from collections import Counter

import pyarrow.compute as pc
import pytest

from components.data import shard_format

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def tables(dataset_root):
    return {path: shard_format.read_shard(path) for path in shard_format.list_shards(dataset_root)}


def test_manifest_version_and_shard_list_match_the_files(dataset_root, tables):
    manifest = shard_format.read_manifest(dataset_root)
    listed = {entry["path"]: entry["num_rows"] for entry in manifest["shards"]}
    on_disk = {
        str(path.relative_to(dataset_root)): table.num_rows for path, table in tables.items()
    }
    assert listed == on_disk and sum(listed.values()) == manifest["counts"]["encoded"] > 0


def test_every_shard_has_the_schema_of_its_format_version(dataset_root, tables):
    has_t5 = shard_format.has_t5_caption(shard_format.read_manifest(dataset_root))
    for path, table in tables.items():
        has_scales = "image_prompt_hidden_scale" in table.column_names
        expected = shard_format.shard_schema(shard_format.tensor_names(has_scales, has_t5))
        assert table.schema.equals(expected, check_metadata=False), path


def test_keys_unique_and_buckets_match_partition_and_manifest(dataset_root, tables):
    manifest = shard_format.read_manifest(dataset_root)
    keys, per_bucket = Counter(), Counter()
    for path, table in tables.items():
        bucket = path.parent.name.removeprefix("bucket=")
        assert set(table["bucket_id"].to_pylist()) == {bucket}
        keys.update(table["sample_key"].to_pylist())
        per_bucket[bucket] += table.num_rows
    assert max(keys.values()) == 1
    assert {
        b: e["num_samples"] for b, e in manifest["buckets"].items() if e["num_samples"]
    } == dict(per_bucket)
    assert len(manifest["buckets"]) == 5


def test_no_duplicate_images_and_captions_present(tables):
    hashes = [h for table in tables.values() for h in table["image_sha256"].to_pylist()]
    assert len(hashes) == len(set(hashes))
    for table in tables.values():
        assert pc.all(pc.greater(pc.utf8_length(table["caption"]), 0)).as_py()


def test_tensor_shapes_agree_within_each_row(tables):
    for table in tables.values():
        for sample in shard_format.iter_samples(table):
            latent = sample["vae_latent"]
            assert latent.shape[1] * 8 == sample["height_px"]
            assert latent.shape[2] * 8 == sample["width_px"]
            length = sample["image_prompt_hidden"].shape[0]
            assert sample["image_prompt_position_ids"].shape == (3, length)
            assert sample["image_prompt_attention_mask"].shape == (length,)
            grid = sample["image_grid_thw"]
            merged_tokens = int(grid.prod()) // 4
            assert int(sample["image_prompt_image_mask"].sum()) == merged_tokens
            caption_length = sample["caption_prompt_hidden"].shape[0]
            assert sample["caption_prompt_position_ids"].shape == (3, caption_length)
            assert sample["clip_pooled"].ndim == 1


def test_t5_caption_states_are_there_exactly_when_declared(dataset_root, tables):
    """A dataset whose manifest declares encoders.t5_caption holds [max_tokens, d_model] T5
    states of the caption in the hidden dtype in every row; one that does not holds none."""
    manifest = shard_format.read_manifest(dataset_root)
    declared = manifest["encoders"].get("t5_caption")
    for path, table in tables.items():
        assert ("caption_t5_hidden" in table.column_names) == bool(declared), path
        if not declared:
            continue
        shapes = table["caption_t5_hidden_shape"].to_pylist()
        assert set(map(tuple, shapes)) == {(declared["max_tokens"], declared["d_model"])}, path
        assert set(table["caption_t5_hidden_dtype"].to_pylist()) == {
            manifest["encoders"]["hidden_dtype"]
        }, path


def test_manifest_says_how_the_tensors_were_made(dataset_root, tables):
    manifest = shard_format.read_manifest(dataset_root)
    encoders = manifest["encoders"]
    assert encoders["latent_mode"] in ("mean", "sample") and encoders["latent_is_raw"] is True
    assert {"vae_scaling_factor", "vae_shift_factor", "layer_cut", "qwen2vl_revision"} <= set(
        encoders
    )
    first = next(iter(tables.values()))
    stored = {name: first[f"{name}_dtype"][0].as_py() for name in shard_format.REQUIRED_TENSORS}
    assert {name: manifest["tensor_dtypes"][name] for name in stored} == stored
    assert stored["image_prompt_hidden"] == encoders["hidden_dtype"]
    assert len(manifest["config_hash"]) == 64
    assert manifest["version"] == 1 and manifest["counts"]["reused_rows"] == 0
    assert manifest["counts"]["source_rows"] == manifest["counts"]["new_rows"]
    assert {entry["added_in"] for entry in manifest["shards"]} == {1}
    assert set(manifest["bytes_per_sample"]["columns_uncompressed"]) >= set(
        shard_format.REQUIRED_TENSORS
    )


def test_sources_account_for_every_row_and_shard(dataset_root, tables):
    manifest = shard_format.read_manifest(dataset_root)
    sources = {source["name"]: source for source in manifest["sources"]}
    assert (
        sum(source["counts"]["source_rows"] for source in sources.values())
        == (manifest["counts"]["source_rows"])
    )
    for name, source in sources.items():
        counts = source["counts"]
        assert sum(item["rows"] for item in source["lists"]) == counts["source_rows"], name
        entries = [entry for entry in manifest["shards"] if entry["source"] == name]
        assert sum(entry["num_rows"] for entry in entries) == counts["encoded"], name
        assert sum(counts["per_bucket"].values()) == counts["encoded"] and source["weight"] > 0
    for entry in manifest["shards"]:
        table = tables[dataset_root / entry["path"]]
        assert set(table["source"].to_pylist()) == {entry["source"]}, entry["path"]
        origins = set(table["caption_origin"].to_pylist())
        assert origins <= set(shard_format.CAPTION_ORIGINS), entry["path"]
        given = pc.filter(table["caption_model"], pc.equal(table["caption_origin"], "given"))
        assert set(given.to_pylist()) <= {""}, entry["path"]
