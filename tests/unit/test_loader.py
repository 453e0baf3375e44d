"""Loader: deterministic one-bucket-per-step plans, epoch permutations, collation, clear errors.

Sources and their weights: tests/unit/test_step_plan.py."""

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from components.data import shard_format
from components.data.encode import decode_hidden, encode_hidden
from components.training.encoder_tail import load_qwen2vl_tail
from components.training.loader import (
    BucketIndex,
    LoaderConfig,
    LoaderError,
    RowRef,
    ShardReader,
    collate_samples,
    load_micro_batch,
    plan_steps,
)

pytestmark = pytest.mark.unit

HIDDEN_SIZE = 8
POOLED_SIZE = 6
SOURCE = {"name": "web", "kind": "url_list", "weight": 1.0}


def _sample(bucket_id: str, number: int, *, hidden_dtype: str) -> dict:
    """A synthetic shard row: prompt lengths vary per sample, latent size per bucket."""
    width, height = (int(side) for side in bucket_id.split("x"))
    generator = torch.Generator().manual_seed(number)
    row = {
        "sample_key": f"{bucket_id}-{number:05d}",
        "source": SOURCE["name"],
        "url": f"http://127.0.0.1/{number}.png",
        "caption": f"caption {number}",
        "caption_origin": "given",
        "caption_truncated": False,
        "caption_model": "",
        "bucket_id": bucket_id,
        "width_px": width,
        "height_px": height,
        "source_width_px": width,
        "source_height_px": height,
        "image_sha256": f"{number:064x}",
        "vae_latent": torch.randn(16, height // 8, width // 8, generator=generator),
        "image_grid_thw": torch.tensor([1, 2, 2], dtype=torch.int32),
        "clip_pooled": torch.randn(POOLED_SIZE, generator=generator),
    }
    for prompt, length in (("image_prompt", 5 + number % 3), ("caption_prompt", 3 + number % 4)):
        stored = encode_hidden(torch.randn(length, HIDDEN_SIZE, generator=generator), hidden_dtype)
        row[f"{prompt}_hidden"] = stored["hidden"]
        if "scale" in stored:
            row[f"{prompt}_hidden_scale"] = stored["scale"]
        row[f"{prompt}_position_ids"] = torch.arange(length, dtype=torch.int32).expand(3, -1)
        row[f"{prompt}_attention_mask"] = torch.ones(length, dtype=torch.int8)
    row["image_prompt_image_mask"] = (torch.arange(row["image_prompt_hidden"].shape[0]) % 2).to(
        torch.int8
    )
    return row


def _write_dataset(
    root: Path, sizes: dict[str, int], *, rows_per_shard: int = 4, hidden_dtype: str = "float32"
) -> Path:
    """Shards of at most rows_per_shard rows (row groups of 2) + a manifest; 0 = empty bucket.
    One source, SOURCE, holds every shard."""
    entries = []
    for bucket_id, size in sizes.items():
        rows = [_sample(bucket_id, number, hidden_dtype=hidden_dtype) for number in range(size)]
        for chunk, start in enumerate(range(0, size, rows_per_shard)):
            part = rows[start : start + rows_per_shard]
            path = shard_format.shard_path(root, bucket_id, chunk)
            row_group_bytes = 2 * max(
                1, sum(t.nbytes for t in part[0].values() if hasattr(t, "nbytes"))
            )
            written = shard_format.write_shard(part, path, max_row_group_bytes=row_group_bytes)
            entries.append(
                {
                    "path": str(path.relative_to(root)),
                    "bucket_id": bucket_id,
                    "num_rows": written.num_rows,
                    "num_bytes": written.num_bytes,
                    "source": SOURCE["name"],
                }
            )
    buckets = {bucket_id: {"num_samples": size} for bucket_id, size in sizes.items()}
    manifest = {"dataset_id": "synthetic", "version": 1, "shards": entries, "buckets": buckets}
    shard_format.write_manifest(root, manifest | {"sources": [SOURCE]})
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _write_dataset(
        tmp_path_factory.mktemp("loader"), {"64x64": 10, "64x32": 7, "32x64": 1, "16x16": 0}
    )


def _visit_order(plans, bucket_id: str) -> list[int]:
    return [row for plan in plans if plan.bucket_id == bucket_id for row in plan.rows.ravel()]


def test_index_knows_rows_per_bucket(dataset):
    index = BucketIndex.from_dataset(dataset)
    assert {bucket_id: rows.num_rows for bucket_id, rows in index.buckets.items()} == {
        "32x64": 1,
        "64x32": 7,
        "64x64": 10,
    }
    assert index.empty_buckets == ("16x16",) and index.num_rows == 18
    assert index.dataset_id == "synthetic"
    assert index.source_weights == {"web": 1.0} and index.source_shares == {"web": 1.0}
    refs = index.bucket("64x64").locate([0, 3, 4, 9])
    assert [(Path(ref.shard_path).name, ref.row_index) for ref in refs] == [
        ("part-00000.parquet", 0),
        ("part-00000.parquet", 3),
        ("part-00001.parquet", 0),
        ("part-00002.parquet", 1),
    ]
    with pytest.raises(LoaderError, match="'16x16' is empty"):
        index.bucket("16x16")
    with pytest.raises(LoaderError, match="'99x99' does not exist"):
        index.bucket("99x99")


def test_plan_is_deterministic_and_resumes_exactly(dataset):
    index = BucketIndex.from_dataset(dataset)
    config = LoaderConfig(micro_batch_size=2, accumulation_steps=2, seed=3)
    full = plan_steps(index, config, num_steps=40, num_workers=2)
    assert full == plan_steps(index, config, num_steps=40, num_workers=2)
    assert [plan.step for plan in full] == list(range(40))
    for start in (1, 17, 39, 40):
        assert (
            plan_steps(index, config, num_steps=40, num_workers=2, start_step=start) == full[start:]
        )
    assert plan_steps(index, config, num_steps=25, num_workers=2) == full[:25]
    other_seed = plan_steps(
        index,
        LoaderConfig(micro_batch_size=2, accumulation_steps=2, seed=4),
        num_steps=40,
        num_workers=2,
    )
    assert other_seed != full


def test_every_micro_batch_of_a_step_comes_from_its_bucket(dataset):
    index = BucketIndex.from_dataset(dataset)
    config = LoaderConfig(micro_batch_size=3, accumulation_steps=2)
    plans = plan_steps(index, config, num_steps=30, num_workers=4)
    assert len({plan.bucket_id for plan in plans}) == 3
    for plan in plans:
        assert plan.rows.shape == (4, 2, 3)
        for worker in range(4):
            for accumulation in range(2):
                refs = plan.micro_batch(worker, accumulation)
                assert len(refs) == 3
                assert {Path(ref.shard_path).parent.name for ref in refs} == {
                    f"bucket={plan.bucket_id}"
                }
        assert plan.source == "web"


def test_bucket_frequencies_follow_bucket_sizes(dataset):
    index = BucketIndex.from_dataset(dataset)
    plans = plan_steps(index, LoaderConfig(seed=1), num_steps=6000, num_workers=1)
    counts = Counter(plan.bucket_id for plan in plans)
    for bucket_id, rows in index.buckets.items():
        assert abs(counts[bucket_id] / 6000 - rows.num_rows / 18) < 0.02, counts


def test_rows_are_not_repeated_within_an_epoch_of_a_bucket(dataset):
    index = BucketIndex.from_dataset(dataset)
    plans = plan_steps(index, LoaderConfig(micro_batch_size=3), num_steps=200, num_workers=1)
    for bucket_id in ("64x64", "64x32"):
        size = index.bucket(bucket_id).num_rows
        order = _visit_order(plans, bucket_id)
        epochs = [order[start : start + size] for start in range(0, len(order) - size + 1, size)]
        assert len(epochs) >= 5
        assert all(sorted(epoch) == list(range(size)) for epoch in epochs)
        assert len({tuple(epoch) for epoch in epochs}) > 1, "each epoch gets its own permutation"


def test_bucket_smaller_than_a_step_is_still_used(dataset):
    index = BucketIndex.from_dataset(dataset)
    config = LoaderConfig(micro_batch_size=4, accumulation_steps=2)
    plans = plan_steps(index, config, num_steps=300, num_workers=2)
    tiny_steps = [plan for plan in plans if plan.bucket_id == "32x64"]
    assert tiny_steps, "the 1-row bucket must be drawn (probability 1/18 per step)"
    for plan in tiny_steps:
        assert plan.rows.shape == (2, 2, 4) and set(plan.rows.ravel().tolist()) == {0}
    # 7 rows, 16 per step: wraps over epochs inside one step, still a permutation per epoch.
    order = _visit_order(plans, "64x32")
    assert sorted(order[:7]) == list(range(7)) and sorted(order[7:14]) == list(range(7))


def test_load_micro_batch_collates_one_bucket(dataset):
    index = BucketIndex.from_dataset(dataset)
    refs = index.bucket("64x32").locate([6, 0, 3])
    reader = ShardReader(max_cached_row_groups=1)
    batch = load_micro_batch(refs, reader=reader)
    expected = [_sample("64x32", number, hidden_dtype="float32") for number in (6, 0, 3)]
    assert batch["bucket_id"] == "64x32"
    assert batch["sample_key"] == [sample["sample_key"] for sample in expected]
    assert batch["vae_latent"].shape == (3, 16, 4, 8)
    assert torch.equal(batch["vae_latent"][1], expected[1]["vae_latent"])
    assert batch["clip_pooled"].shape == (3, POOLED_SIZE)
    assert batch["image_grid_thw"].dtype == torch.int64
    lengths = {"image_prompt": [5, 5, 5], "caption_prompt": [5, 3, 6]}
    for prompt, prompt_lengths in lengths.items():
        length = max(prompt_lengths)
        assert batch[f"{prompt}_hidden"].shape == (3, length, HIDDEN_SIZE)
        assert batch[f"{prompt}_position_ids"].shape == (3, 3, length)
        assert batch[f"{prompt}_attention_mask"].sum(dim=1).tolist() == prompt_lengths
        for position, sample in enumerate(expected):
            real = prompt_lengths[position]
            assert torch.equal(
                batch[f"{prompt}_hidden"][position, :real], sample[f"{prompt}_hidden"]
            )
            assert not batch[f"{prompt}_hidden"][position, real:].any()
    assert batch["image_prompt_image_mask"].dtype == torch.bool
    assert batch["image_prompt_image_mask"][0].tolist() == [False, True, False, True, False]


@pytest.mark.parametrize("hidden_dtype", ["bfloat16", "float8_e4m3fn"])
def test_low_precision_hidden_states_are_decoded(tmp_path, hidden_dtype):
    root = _write_dataset(tmp_path, {"64x64": 3}, hidden_dtype=hidden_dtype)
    index = BucketIndex.from_dataset(root)
    batch = load_micro_batch(index.bucket("64x64").locate([0, 1, 2]), reader=ShardReader())
    for number in range(3):
        stored = _sample("64x64", number, hidden_dtype=hidden_dtype)
        decoded = decode_hidden(
            stored["caption_prompt_hidden"], stored.get("caption_prompt_hidden_scale")
        )
        assert batch["caption_prompt_hidden"].dtype == torch.float32
        assert torch.equal(batch["caption_prompt_hidden"][number, : decoded.shape[0]], decoded)


def test_mixed_buckets_in_one_micro_batch_are_refused(dataset):
    reader = ShardReader()
    index = BucketIndex.from_dataset(dataset)
    samples = reader.read_samples(
        index.bucket("64x64").locate([0]) + index.bucket("64x32").locate([0])
    )
    with pytest.raises(LoaderError, match="mixes buckets"):
        collate_samples(samples)
    with pytest.raises(LoaderError, match="no rows"):
        load_micro_batch([], reader=reader)


@pytest.fixture
def dataset_copy(dataset, tmp_path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(dataset, copy)
    return copy


def test_missing_shard_is_named(dataset_copy):
    missing = dataset_copy / "shards/bucket=64x32/part-00001.parquet"
    missing.unlink()
    with pytest.raises(
        LoaderError, match=rf"{re.escape(str(missing))}: shard listed in .* is missing"
    ):
        BucketIndex.from_dataset(dataset_copy)


def test_shard_removed_after_indexing_is_named_when_read(dataset_copy):
    index = BucketIndex.from_dataset(dataset_copy)
    refs = index.bucket("64x64").locate([9])
    Path(refs[0].shard_path).unlink()
    with pytest.raises(LoaderError, match=refs[0].shard_path):
        load_micro_batch(refs, reader=ShardReader())


def test_corrupt_shard_is_named(dataset_copy):
    corrupt = dataset_copy / "shards/bucket=64x64/part-00002.parquet"
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    with pytest.raises(LoaderError, match=rf"{corrupt}: corrupt"):
        BucketIndex.from_dataset(dataset_copy)


def test_row_count_mismatch_and_unlisted_shard_are_named(dataset_copy):
    manifest = json.loads((dataset_copy / "manifest.json").read_text())
    manifest["shards"][0]["num_rows"] += 1
    (dataset_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoaderError, match=manifest["shards"][0]["path"]):
        BucketIndex.from_dataset(dataset_copy)
    removed = manifest["shards"].pop(0)
    (dataset_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoaderError, match=rf"{removed['path']} on disk is not listed"):
        BucketIndex.from_dataset(dataset_copy)


def test_manifest_version_mismatch_is_named(dataset_copy):
    manifest = json.loads((dataset_copy / "manifest.json").read_text())
    (dataset_copy / "manifest.json").write_text(json.dumps(manifest | {"format_version": 99}))
    with pytest.raises(shard_format.ShardFormatError, match="manifest.json: format version 99"):
        BucketIndex.from_dataset(dataset_copy)


def test_empty_dataset_is_an_error(tmp_path):
    shard_format.write_manifest(
        tmp_path,
        {
            "version": 1,
            "shards": [],
            "buckets": {"64x64": {"num_samples": 0}},
            "sources": [SOURCE],
        },
    )
    with pytest.raises(LoaderError, match="holds no samples"):
        BucketIndex.from_dataset(tmp_path)


def test_config_and_arguments_are_validated(dataset):
    with pytest.raises(ValueError, match="micro_batch_size"):
        LoaderConfig(micro_batch_size=0)
    with pytest.raises(ValueError, match="seed"):
        LoaderConfig(seed=-1)
    index = BucketIndex.from_dataset(dataset)
    with pytest.raises(ValueError, match="num_workers"):
        plan_steps(index, LoaderConfig(), num_steps=3, num_workers=0)
    with pytest.raises(ValueError, match="start_step"):
        plan_steps(index, LoaderConfig(), num_steps=3, num_workers=1, start_step=4)
    with pytest.raises(LoaderError, match="out of range"):
        ShardReader().read_samples([RowRef(index.bucket("32x64").shard_paths[0], 1)])


@pytest.mark.integration
def test_tiny_dataset_replays_padded_batches_like_single_samples(dataset_root):
    """Padded replay of a loaded micro-batch equals replaying each sample alone."""
    index = BucketIndex.from_dataset(dataset_root)
    manifest = shard_format.read_manifest(dataset_root)
    assert index.num_rows == manifest["counts"]["encoded"]
    tail = load_qwen2vl_tail(manifest["encoders"]["qwen2vl"]).eval()
    config = LoaderConfig(micro_batch_size=4, accumulation_steps=2)
    reader = ShardReader()
    for plan in plan_steps(index, config, num_steps=3, num_workers=2):
        batch = load_micro_batch(plan.micro_batch(1, 1), reader=reader)
        assert batch["bucket_id"] == plan.bucket_id and batch["vae_latent"].shape[0] == 4
        for prompt in ("image_prompt", "caption_prompt"):
            _assert_padded_replay_matches(tail, batch, prompt)


def _assert_padded_replay_matches(tail, batch: dict, prompt: str) -> None:
    hidden, positions, mask = (
        batch[f"{prompt}_{name}"] for name in ("hidden", "position_ids", "attention_mask")
    )
    with torch.no_grad():
        padded = tail(hidden, positions, mask)
        for position, length in enumerate(mask.sum(dim=1).tolist()):
            alone = tail(
                hidden[position : position + 1, :length],
                positions[:, position : position + 1, :length],
                mask[position : position + 1, :length],
            )
            torch.testing.assert_close(padded[position, :length], alone[0], rtol=1e-5, atol=1e-5)
