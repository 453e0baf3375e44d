"""Step plans: one bucket and one source per step, sources drawn by weight, buckets within a
source by size, single-source plans unchanged, resumable, clear manifest errors."""

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from components.data import shard_format
from components.training.loader import BucketIndex, LoaderConfig, LoaderError, plan_steps
from components.training.loop import hold_out

pytestmark = pytest.mark.unit

WEIGHTS = {"web": 1.0, "photos": 3.0, "scans": 0.5, "archive": 2.0}
"""archive is listed with a weight but holds no rows: it takes no share."""
SHARES = {"photos": 3.0 / 4.5, "scans": 0.5 / 4.5, "web": 1.0 / 4.5}
MIXED_SHARDS = (
    ("64x64", "web", 64),
    ("64x64", "photos", 16),
    ("64x64", "web", 64),
    ("64x64", "photos", 8),
    ("64x64", "web", 32),
    ("64x32", "web", 40),
    ("64x32", "scans", 6),
    ("64x32", "web", 40),
    ("32x64", "photos", 8),
    ("32x64", "scans", 2),
    ("32x64", "photos", 4),
)
"""(bucket, source, rows) per shard in chunk order: the sources interleave inside buckets.
Rows: web 160 + 80 (64x64, 64x32), photos 24 + 12 (64x64, 32x64), scans 6 + 2 (64x32, 32x64)."""
ONE_SOURCE_SHARDS = (
    ("64x64", "web", 4),
    ("64x64", "web", 4),
    ("64x64", "web", 2),
    ("64x32", "web", 4),
    ("64x32", "web", 3),
    ("32x64", "web", 1),
)
MIX_STEPS = 20000


def _row(bucket_id: str, source: str, number: int) -> dict:
    """A shard row the index never reads (it reads footers): every column present, tiny."""
    blank = {pa.string(): "", pa.bool_(): False}
    row = {name: blank.get(kind, 0) for name, kind in shard_format.SCALAR_COLUMNS}
    row |= {
        "sample_key": f"{source}-{bucket_id}-{number}",
        "bucket_id": bucket_id,
        "source": source,
    }
    return row | {name: torch.zeros(1, dtype=torch.int8) for name in shard_format.REQUIRED_TENSORS}


def _write_dataset(root: Path, shards, *, weights: dict[str, float]) -> Path:
    """One shard per (bucket, source, rows) triple, chunks numbered per bucket, + a manifest."""
    entries, counts, chunks = [], Counter(), Counter()
    for bucket_id, source, num_rows in shards:
        path = shard_format.shard_path(root, bucket_id, chunks[bucket_id])
        chunks[bucket_id] += 1
        rows = [_row(bucket_id, source, number) for number in range(num_rows)]
        written = shard_format.write_shard(rows, path, max_row_group_bytes=1 << 20)
        entries.append(
            {
                "path": str(path.relative_to(root)),
                "bucket_id": bucket_id,
                "num_rows": num_rows,
                "num_bytes": written.num_bytes,
                "source": source,
            }
        )
        counts[bucket_id] += num_rows
    manifest = {
        "dataset_id": "strata",
        "version": 1,
        "shards": entries,
        "buckets": {bucket_id: {"num_samples": count} for bucket_id, count in counts.items()},
        "sources": [{"name": name, "kind": "folder", "weight": w} for name, w in weights.items()],
    }
    shard_format.write_manifest(root, manifest)
    return root


def _row_sources(shards) -> dict[str, np.ndarray]:
    """Bucket -> the source of each bucket row, as written (shards in chunk order)."""
    names: dict[str, list[str]] = {}
    for bucket_id, source, num_rows in shards:
        names.setdefault(bucket_id, []).extend([source] * num_rows)
    return {bucket_id: np.array(sources) for bucket_id, sources in names.items()}


def _digest(plans) -> str:
    digest = hashlib.sha256()
    for plan in plans:
        digest.update(plan.bucket_id.encode())
        digest.update(np.ascontiguousarray(plan.rows, dtype=np.int64).tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> BucketIndex:
    root = tmp_path_factory.mktemp("mixed")
    return BucketIndex.from_dataset(_write_dataset(root, MIXED_SHARDS, weights=WEIGHTS))


@pytest.fixture(scope="module")
def mix_plans(mixed) -> list:
    return plan_steps(mixed, LoaderConfig(seed=5), num_steps=MIX_STEPS, num_workers=2)


# Plans of the bucket-only sampler (components/training/loader.py at commit 926b2a1, before
# sources), run on ONE_SOURCE_SHARDS: the first ten steps at micro_batch_size=2,
# accumulation_steps=2, seed=3 and 2 workers, flattened; then sha256 digests (_digest) of longer
# plans keyed by (rows held out, seed, micro_batch_size, accumulation_steps, workers, steps).
BUCKET_ONLY_BUCKETS = ["64x64", "64x64", "32x64"] + ["64x64"] * 5 + ["64x32", "64x64"]
BUCKET_ONLY_ROWS = [
    [8, 5, 2, 6, 7, 3, 1, 9],
    [4, 0, 2, 1, 6, 5, 0, 3],
    [0, 0, 0, 0, 0, 0, 0, 0],
    [7, 4, 8, 9, 3, 8, 2, 1],
    [6, 5, 0, 7, 4, 9, 6, 5],
    [4, 3, 0, 2, 9, 7, 1, 8],
    [8, 9, 6, 4, 5, 3, 1, 7],
    [2, 0, 7, 4, 3, 5, 2, 6],
    [2, 3, 4, 0, 5, 1, 6, 5],
    [1, 0, 9, 8, 2, 7, 3, 9],
]
BUCKET_ONLY_DIGESTS = {
    (0, 0, 1, 1, 1, 5000): "3259a690725347f41ff3e2858a4e56c2557c4d618d32f6a99ad54e32bfbffb78",
    (0, 7, 3, 2, 2, 1000): "c9d0c7ca48e0c69a1181c44733ddd029d342bab8b4e799d26a9d031412c5a3f4",
    (3, 0, 1, 1, 1, 5000): "df2730fbf368dffee4286227aec1289575ba7010a0d2eb0b5203b7f66065a9b2",
    (3, 7, 3, 2, 2, 1000): "288d78d6d256967dbc5cea33f1e85b609a7728c443a05a55d22aec66e3c5727d",
}


def test_one_source_plans_are_the_bucket_only_samplers(tmp_path):
    """Any weight of a single source, and listed sources without rows, change nothing."""
    weights = {"web": 2.5, "archive": 1.0}
    index = BucketIndex.from_dataset(_write_dataset(tmp_path, ONE_SOURCE_SHARDS, weights=weights))
    assert index.source_shares == {"web": 1.0}
    config = LoaderConfig(micro_batch_size=2, accumulation_steps=2, seed=3)
    plans = plan_steps(index, config, num_steps=10, num_workers=2)
    assert [plan.bucket_id for plan in plans] == BUCKET_ONLY_BUCKETS
    assert [plan.rows.ravel().tolist() for plan in plans] == BUCKET_ONLY_ROWS
    assert {plan.source for plan in plans} == {"web"}
    for (held, seed, micro, accumulation, workers, steps), digest in BUCKET_ONLY_DIGESTS.items():
        trained = hold_out(index, held)[0] if held else index
        config = LoaderConfig(micro_batch_size=micro, accumulation_steps=accumulation, seed=seed)
        assert _digest(plan_steps(trained, config, num_steps=steps, num_workers=workers)) == digest


def test_sources_take_their_weights_share_of_the_steps(mixed, mix_plans):
    assert mixed.source_shares == pytest.approx(SHARES)
    counts = Counter(plan.source for plan in mix_plans)
    measured = {source: counts[source] / MIX_STEPS for source in SHARES}
    # A share's binomial sd over n steps is sqrt(p(1-p)/n) <= sqrt(0.25/20000) ~ 0.0035, and
    # ~0.0033 for photos (p = 2/3): 0.015 is over 4 sigma for every source.
    assert measured == pytest.approx(SHARES, abs=0.015), measured
    row_sources = _row_sources(MIXED_SHARDS)
    for plan in mix_plans:
        assert plan.rows.shape == (2, 1, 1)
        assert (row_sources[plan.bucket_id][plan.rows] == plan.source).all(), plan
    for plan in mix_plans[:200]:
        refs = plan.micro_batch(0, 0) + plan.micro_batch(1, 0)
        assert {Path(ref.shard_path).parent.name for ref in refs} == {f"bucket={plan.bucket_id}"}
        assert {mixed.shard_sources[ref.shard_path] for ref in refs} == {plan.source}


def test_within_a_source_buckets_follow_its_row_counts(mix_plans):
    rows, steps = Counter(), Counter((plan.source, plan.bucket_id) for plan in mix_plans)
    for bucket_id, source, num_rows in MIXED_SHARDS:
        rows[source, bucket_id] += num_rows
    source_rows = Counter(source for source, _ in rows.elements())
    source_steps = Counter(source for source, _ in steps.elements())
    measured = {key: steps[key] / source_steps[key[0]] for key in rows}
    expected = {key: count / source_rows[key[0]] for key, count in rows.items()}
    # Fewest steps: scans, ~2200 (share 1/9), with q = 3/4 in 64x32: sd sqrt(q(1-q)/n) ~ 0.0092;
    # web (~4400 steps, q = 2/3) and photos (~13300) are tighter: 0.05 is over 5 sigma.
    assert measured == pytest.approx(expected, abs=0.05), measured


def test_rows_are_not_repeated_within_an_epoch_of_a_stratum(mix_plans):
    photos = [*range(64, 80), *range(144, 152)]
    order = [
        row
        for plan in mix_plans
        if (plan.source, plan.bucket_id) == ("photos", "64x64")
        for row in plan.rows.ravel().tolist()
    ]
    epochs = [order[start : start + 24] for start in range(0, len(order) - 23, 24)]
    assert len(epochs) >= 100
    assert all(sorted(epoch) == photos for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1, "each epoch gets its own permutation"


def test_mixed_plans_are_deterministic_and_resume_exactly(mixed, mix_plans):
    config = LoaderConfig(micro_batch_size=2, accumulation_steps=2, seed=3)
    full = plan_steps(mixed, config, num_steps=300, num_workers=2)
    assert full == plan_steps(mixed, config, num_steps=300, num_workers=2)
    assert len({plan.source for plan in full}) == 3 and len({plan.bucket_id for plan in full}) == 3
    for start in (1, 57, 299, 300):
        assert (
            plan_steps(mixed, config, num_steps=300, num_workers=2, start_step=start)
            == (full[start:])
        )
    assert plan_steps(mixed, config, num_steps=150, num_workers=2) == full[:150]
    tail = plan_steps(
        mixed, LoaderConfig(seed=5), num_steps=MIX_STEPS, num_workers=2, start_step=MIX_STEPS - 50
    )
    assert tail == mix_plans[-50:]
    other_seed = LoaderConfig(micro_batch_size=2, accumulation_steps=2, seed=4)
    assert plan_steps(mixed, other_seed, num_steps=300, num_workers=2) != full


def _set_weight(value):
    return lambda manifest: manifest["sources"][0].update(weight=value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda manifest: manifest["shards"][1].pop("source"), "shard entry '{shard}' has no"),
        (
            lambda manifest: manifest["shards"][1].update(source="nowhere"),
            "shard entry '{shard}' has source 'nowhere', which 'sources' does not list",
        ),
        (_set_weight(0), "source 'web' has weight 0, not a positive number"),
        (_set_weight(-1.5), "source 'web' has weight -1.5, not a positive number"),
        (_set_weight("3"), "source 'web' has weight '3', not a positive number"),
        (_set_weight(True), "source 'web' has weight True, not a positive number"),
        (_set_weight(float("nan")), "source 'web' has weight nan, not a positive number"),
        (lambda manifest: manifest["sources"][0].pop("weight"), "source 'web' has weight None"),
        (lambda manifest: manifest.pop("sources"), "no 'sources' list"),
    ],
    ids=[
        "no-source",
        "unknown-source",
        "zero",
        "negative",
        "string",
        "bool",
        "nan",
        "none",
        "list",
    ],
)
def test_bad_sources_are_named(tmp_path, edit, message):
    shards = (("64x64", "web", 2), ("64x32", "photos", 1))
    root = _write_dataset(tmp_path, shards, weights={"web": 1.0, "photos": 3.0}).resolve()
    manifest_path = root / shard_format.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))
    expected = f"{manifest_path}: " + message.format(shard=manifest["shards"][1]["path"])
    with pytest.raises(LoaderError, match=re.escape(expected)):
        BucketIndex.from_dataset(root)


def test_a_source_without_rows_takes_no_share(mixed, mix_plans, tmp_path):
    assert mixed.source_weights == WEIGHTS and "archive" not in mixed.source_shares
    assert sum(mixed.source_shares.values()) == pytest.approx(1.0)
    assert "archive" not in {plan.source for plan in mix_plans}
    # A source whose every row is held out for validation drops out as well.
    shards = (("64x64", "web", 8), ("64x64", "scans", 2), ("64x32", "web", 3))
    index = BucketIndex.from_dataset(
        _write_dataset(tmp_path, shards, weights={"web": 1.0, "scans": 5.0})
    )
    assert index.source_shares == pytest.approx({"scans": 5 / 6, "web": 1 / 6})
    trained, _ = hold_out(index, 2)
    assert trained.source_shares == {"web": 1.0}
    plans = plan_steps(trained, LoaderConfig(), num_steps=50, num_workers=1)
    assert {plan.source for plan in plans} == {"web"}


def test_held_out_rows_are_never_drawn(mixed):
    trained, validation = hold_out(mixed, 36)
    # 64x64 is the largest bucket (184 rows); its last 36 are the final 32-row web shard and the
    # last 4 rows of the 8-row photos shard before it (bucket rows 144..151).
    assert trained.bucket("64x64").num_rows == 148 and len(validation) == 36
    sizes = {(part.source, part.bucket.bucket_id): part.num_rows for part in trained.strata()}
    assert sizes[("photos", "64x64")] == 20 and sizes[("web", "64x64")] == 128
    plans = plan_steps(trained, LoaderConfig(micro_batch_size=4), num_steps=2000, num_workers=2)
    drawn = {
        ref
        for plan in plans
        if plan.bucket_id == "64x64"
        for worker in range(2)
        for ref in plan.micro_batch(worker, 0)
    }
    assert len(drawn) == 148 and not drawn & set(validation)
