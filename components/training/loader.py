"""Cached shards -> deterministic, bucketed training micro-batches.

Input: a dataset root written by the data pipeline (manifest.json + shards/bucket=*/part-*.parquet,
see components/data/shard_format.py). The manifest lists every shard with its bucket and its
source, and every source with its sampling weight. Output: a BucketIndex (rows per bucket, the
source of each shard, the weights), per optimizer step a StepPlan (which rows each worker reads
for every accumulation step; plan_steps) and, per micro-batch, a dict of collated tensors
(load_micro_batch).

Sampling contract (components/training/step_plan.py draws the plans): every optimizer step reads
ALL its micro-batches from ONE bucket and ONE source; source x is drawn with its weight's share
(over the sources that have rows) and, within x, a bucket by its count of x's rows; rows are
visited in a seeded permutation per epoch of each (bucket, source); a plan is a pure function of
(index, config, num_workers, step), so resuming at step k gives the same steps k... Empty buckets
and sources without rows are never drawn; a dataset with no rows is an error.
Reads are row-group granular (Parquet's unit of random access) with a small LRU of row groups.
"""

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from components.data import shard_format
from components.data.encode import decode_hidden
from components.training import step_plan
from components.training.step_plan import BucketRows, RowRef, StepPlan, Stratum
from model.qwen2vl_tail import pad_prompt_batch

PROMPTS = ("image_prompt", "caption_prompt")


class LoaderError(ValueError):
    """A dataset the loader cannot plan or read from (names the file or bucket)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LoaderConfig:
    """How training batches are drawn from the shards."""

    micro_batch_size: int = 1
    """Samples per worker per forward/backward pass."""
    accumulation_steps: int = 1
    """Micro-batches per worker per optimizer step (gradient accumulation)."""
    seed: int = 0
    """Seed of the (bucket, source) draws and of the per-epoch row permutations."""
    max_cached_row_groups: int = 8
    """Decoded Parquet row groups a reader keeps (LRU); each holds many samples."""

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "accumulation_steps", "max_cached_row_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclass(frozen=True, slots=True)
class BucketIndex:
    """What a dataset holds per bucket and source, checked against the manifest and the shard
    footers."""

    root: Path
    dataset_id: str
    buckets: dict[str, BucketRows]
    """Non-empty buckets in sorted id order."""
    empty_buckets: tuple[str, ...]
    """Buckets the manifest lists with no rows (never drawn)."""
    source_weights: dict[str, float]
    """Every source the manifest lists -> its sampling weight (> 0), rows or not."""
    shard_sources: dict[str, str]
    """Shard path (as in BucketRows.shard_paths) -> the source its rows came from."""

    @classmethod
    def from_dataset(cls, root: Path, *, version: int | None = None) -> "BucketIndex":
        """Read manifest + shard metadata of the latest dataset version (or `version`); errors
        name the manifest or the shard file.

        Checks: manifest format version, every listed shard present, readable, of this format
        version and with the listed row count, no shard on disk that the latest version does
        not list, per-bucket counts, every shard's source listed with a positive weight.
        """
        root = Path(root).resolve()
        manifest = shard_format.read_manifest(root, version)
        manifest_path = (
            root / shard_format.MANIFEST_NAME
            if version is None
            else shard_format.version_path(root, version)
        )
        entries = manifest.get("shards")
        if not isinstance(entries, list):
            raise LoaderError(f"{manifest_path}: no 'shards' list")
        weights = _source_weights(manifest.get("sources"), manifest_path=manifest_path)
        paths_by_bucket: dict[str, list[tuple[str, int]]] = {}
        shard_sources: dict[str, str] = {}
        for entry in entries:
            path, bucket_id, num_rows = _checked_entry(root, entry, manifest_path=manifest_path)
            shard_sources[str(path)] = _entry_source(entry, weights, manifest_path=manifest_path)
            paths_by_bucket.setdefault(bucket_id, []).append((str(path), num_rows))
        listed = {path for items in paths_by_bucket.values() for path, _ in items}
        if version is not None:  # later versions' shards are on disk too
            latest = shard_format.read_manifest(root).get("shards", [])
            listed |= {str((root / entry["path"]).resolve()) for entry in latest}
        unlisted = [path for path in shard_format.list_shards(root) if str(path) not in listed]
        if unlisted:
            raise LoaderError(f"{manifest_path}: shard {unlisted[0]} on disk is not listed")
        buckets = {
            bucket_id: _bucket_rows(bucket_id, sorted(items))
            for bucket_id, items in sorted(paths_by_bucket.items())
        }
        _check_bucket_counts(manifest.get("buckets", {}), buckets, manifest_path=manifest_path)
        if not buckets:
            raise LoaderError(f"dataset {root} holds no samples ({manifest_path} lists no shards)")
        empty = sorted(set(manifest.get("buckets", {})) - set(buckets))
        dataset_id = str(manifest.get("dataset_id", ""))
        return cls(root, dataset_id, buckets, tuple(empty), weights, shard_sources)

    @property
    def num_rows(self) -> int:
        return sum(bucket.num_rows for bucket in self.buckets.values())

    @property
    def source_shares(self) -> dict[str, float]:
        """Source name -> its share of the steps (sorted by name): its weight normalised over
        the sources that have rows here; sources without rows are left out."""
        return step_plan.source_shares(self.strata(), self.source_weights)

    def strata(self) -> tuple[Stratum, ...]:
        """The non-empty (bucket, source) strata steps draw from, by (source, bucket id)."""
        return step_plan.bucket_strata(self.buckets, self.shard_sources)

    def bucket(self, bucket_id: str) -> BucketRows:
        """The rows of a bucket; an empty or unknown bucket is an error naming it."""
        if bucket_id in self.buckets:
            return self.buckets[bucket_id]
        state = "is empty" if bucket_id in self.empty_buckets else "does not exist"
        raise LoaderError(f"bucket {bucket_id!r} {state} in dataset {self.root}")


def _checked_entry(root: Path, entry: Any, *, manifest_path: Path) -> tuple[Path, str, int]:
    try:
        relative, bucket_id, num_rows = entry["path"], entry["bucket_id"], int(entry["num_rows"])
    except (TypeError, KeyError, ValueError):
        raise LoaderError(f"{manifest_path}: malformed shard entry {entry!r}") from None
    path = (root / relative).resolve()
    if root not in path.parents:
        raise LoaderError(f"{manifest_path}: shard path {relative!r} leaves the dataset root")
    if not path.is_file():
        raise LoaderError(f"{path}: shard listed in {manifest_path} is missing")
    metadata = _shard_metadata(path)
    if num_rows < 1:
        raise LoaderError(f"{path}: listed in {manifest_path} with {num_rows} rows (empty shard)")
    if metadata.num_rows != num_rows:
        raise LoaderError(
            f"{path}: holds {metadata.num_rows} rows, {manifest_path} lists {num_rows}"
        )
    if path.parent.name != f"bucket={bucket_id}":
        raise LoaderError(f"{path}: listed under bucket {bucket_id!r} in {manifest_path}")
    return path, bucket_id, num_rows


def _source_weights(listed: Any, *, manifest_path: Path) -> dict[str, float]:
    """The manifest's 'sources' list as name -> weight; errors name the manifest and entry."""
    if not isinstance(listed, list):
        raise LoaderError(f"{manifest_path}: no 'sources' list")
    weights: dict[str, float] = {}
    for entry in listed:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            raise LoaderError(f"{manifest_path}: malformed source entry {entry!r}")
        if name in weights:
            raise LoaderError(f"{manifest_path}: source {name!r} is listed twice")
        weight = entry.get("weight")
        is_number = isinstance(weight, int | float) and not isinstance(weight, bool)
        if not is_number or not math.isfinite(weight) or weight <= 0:
            raise LoaderError(
                f"{manifest_path}: source {name!r} has weight {weight!r}, not a positive number"
            )
        weights[name] = float(weight)
    return weights


def _entry_source(entry: dict[str, Any], weights: dict[str, float], *, manifest_path: Path) -> str:
    """The source a (well-formed) shard entry names, one that `weights` lists."""
    source = entry.get("source")
    if source is None:
        raise LoaderError(f"{manifest_path}: shard entry {entry['path']!r} has no 'source'")
    if not isinstance(source, str) or source not in weights:
        raise LoaderError(
            f"{manifest_path}: shard entry {entry['path']!r} has source {source!r}, which "
            f"'sources' does not list ({sorted(weights)})"
        )
    return source


def _shard_metadata(path: Path) -> pq.FileMetaData:
    """Footer of a shard, with its format version checked; errors name the file."""
    try:
        metadata = pq.read_metadata(path)
    except (OSError, pa.ArrowInvalid) as error:
        raise LoaderError(f"{path}: corrupt or unreadable Parquet shard: {error}") from None
    version = (metadata.metadata or {}).get(b"qwenflux_format_version", b"?").decode()
    if version not in {str(known) for known in shard_format.READ_FORMAT_VERSIONS}:
        readable = " and ".join(map(str, shard_format.READ_FORMAT_VERSIONS))
        raise LoaderError(f"{path}: shard format version {version}, this code reads {readable}")
    return metadata


def _bucket_rows(bucket_id: str, items: list[tuple[str, int]]) -> BucketRows:
    starts = np.concatenate([[0], np.cumsum([num_rows for _, num_rows in items])])
    return BucketRows(bucket_id, tuple(path for path, _ in items), tuple(starts.tolist()))


def _check_bucket_counts(
    listed: dict[str, Any], buckets: dict[str, BucketRows], *, manifest_path: Path
) -> None:
    for bucket_id, entry in listed.items():
        expected = int(entry.get("num_samples", 0)) if isinstance(entry, dict) else -1
        found = buckets[bucket_id].num_rows if bucket_id in buckets else 0
        if expected != found:
            raise LoaderError(
                f"{manifest_path}: bucket {bucket_id!r} lists {expected} samples, shards hold "
                f"{found}"
            )
    if listed and set(buckets) - set(listed):
        raise LoaderError(
            f"{manifest_path}: shards of unlisted buckets {set(buckets) - set(listed)}"
        )


def plan_steps(
    index: BucketIndex,
    config: LoaderConfig,
    *,
    num_steps: int,
    num_workers: int,
    start_step: int = 0,
) -> list[StepPlan]:
    """Plans of steps start_step .. num_steps-1 (the contract: components/training/step_plan.py).

    The plan of step s depends only on (index, config, num_workers, s): planning fewer or more
    steps, or starting later, never changes it.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if not 0 <= start_step <= num_steps:
        raise ValueError(f"start_step must be in [0, num_steps={num_steps}], got {start_step}")
    strata = index.strata()
    return step_plan.plan_strata(
        strata,
        step_plan.source_shares(strata, index.source_weights),
        seed=config.seed,
        shape=(num_workers, config.accumulation_steps, config.micro_batch_size),
        steps=range(start_step, num_steps),
    )


class ShardReader:
    """Reads shard rows by RowRef, one Parquet row group at a time, keeping an LRU of groups.

    Errors (missing, corrupt or wrong-version shard, row out of range) name the file.
    """

    def __init__(self, *, max_cached_row_groups: int = 8) -> None:
        self._max_cached = max_cached_row_groups
        self._footers: dict[str, tuple[pq.FileMetaData, np.ndarray]] = {}
        self._groups: OrderedDict[tuple[str, int], dict[str, list]] = OrderedDict()

    def read_samples(self, refs: Sequence[RowRef]) -> list[dict[str, Any]]:
        """Samples in the order of refs: scalars as Python values, tensors as torch tensors."""
        located: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for position, ref in enumerate(refs):
            group, row = self._locate(ref)
            located.setdefault((ref.shard_path, group), []).append((position, row))
        samples: list[dict[str, Any]] = [{} for _ in refs]
        for (path, group), wanted in located.items():
            columns = self._row_group(path, group)
            for position, row in wanted:
                samples[position] = _decode_row(columns, row)
        return samples

    def _footer(self, path: str) -> tuple[pq.FileMetaData, np.ndarray]:
        if path not in self._footers:
            if not Path(path).is_file():
                raise LoaderError(f"{path}: shard file is missing")
            metadata = _shard_metadata(Path(path))
            sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
            self._footers[path] = (metadata, np.concatenate([[0], np.cumsum(sizes)]))
        return self._footers[path]

    def _locate(self, ref: RowRef) -> tuple[int, int]:
        _, starts = self._footer(ref.shard_path)
        if not 0 <= ref.row_index < starts[-1]:
            raise LoaderError(f"{ref.shard_path}: row {ref.row_index} out of range ({starts[-1]})")
        group = int(np.searchsorted(starts, ref.row_index, side="right") - 1)
        return group, ref.row_index - int(starts[group])

    def _row_group(self, path: str, group: int) -> dict[str, list]:
        """Column name -> Python values of one row group (bytes for tensor cells)."""
        key = (path, group)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        metadata, _ = self._footer(path)
        try:
            table = pq.ParquetFile(path, metadata=metadata).read_row_group(group)
        except (OSError, pa.ArrowInvalid) as error:
            raise LoaderError(f"{path}: cannot read row group {group}: {error}") from None
        columns = table.to_pydict()
        self._groups[key] = columns
        while len(self._groups) > self._max_cached:
            self._groups.popitem(last=False)
        return columns


def _decode_row(columns: dict[str, list], row: int) -> dict[str, Any]:
    sample = {name: columns[name][row] for name, _ in shard_format.SCALAR_COLUMNS}
    for name in columns:
        if f"{name}_dtype" in columns:
            sample[name] = shard_format.cell_to_tensor(
                columns[name][row], columns[f"{name}_dtype"][row], columns[f"{name}_shape"][row]
            )
    return sample


def load_micro_batch(rows: Sequence[RowRef], *, reader: ShardReader) -> dict[str, Any]:
    """Read and collate one micro-batch (all rows from one bucket).

    Returns (B samples, L padded tokens, D hidden size):
      vae_latent float32 [B, 16, h, w] (raw, as stored); clip_pooled float32 [B, P];
      for p in image_prompt, caption_prompt: {p}_hidden float32 [B, L, D] (decoded from
      bf16/fp8), {p}_position_ids int64 [3, B, L], {p}_attention_mask int64 [B, L] (right
      padding, ready for replay_last_layer); image_prompt_image_mask bool [B, L];
      image_grid_thw int64 [B, 3]; sample_key, caption: list[str]; bucket_id: str; in a
      dataset with T5 caption states, caption_t5_hidden float32 [B, 256, d_model].
    """
    if not rows:
        raise LoaderError("load_micro_batch: no rows")
    return collate_samples(reader.read_samples(rows))


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate decoded samples of one bucket (see load_micro_batch for the keys)."""
    bucket_ids = {sample["bucket_id"] for sample in samples}
    latent_shapes = {tuple(sample["vae_latent"].shape) for sample in samples}
    if len(bucket_ids) != 1 or len(latent_shapes) != 1:
        raise LoaderError(
            f"micro-batch mixes buckets {sorted(bucket_ids)} / latent shapes {latent_shapes}"
        )
    batch: dict[str, Any] = {
        "bucket_id": bucket_ids.pop(),
        "sample_key": [sample["sample_key"] for sample in samples],
        "caption": [sample["caption"] for sample in samples],
        "vae_latent": torch.stack([sample["vae_latent"].float() for sample in samples]),
        "clip_pooled": torch.stack([sample["clip_pooled"].float() for sample in samples]),
        "image_grid_thw": torch.stack([sample["image_grid_thw"].long() for sample in samples]),
    }
    for prompt in PROMPTS:
        hidden, position_ids, attention_mask = pad_prompt_batch(
            [
                decode_hidden(s[f"{prompt}_hidden"], s.get(f"{prompt}_hidden_scale"))
                for s in samples
            ],
            [sample[f"{prompt}_position_ids"] for sample in samples],
            [sample[f"{prompt}_attention_mask"] for sample in samples],
        )
        batch[f"{prompt}_hidden"] = hidden
        batch[f"{prompt}_position_ids"] = position_ids
        batch[f"{prompt}_attention_mask"] = attention_mask
    has_t5 = {"caption_t5_hidden" in sample for sample in samples}
    if has_t5 == {True}:
        batch["caption_t5_hidden"] = torch.stack(
            [decode_hidden(s["caption_t5_hidden"], s.get(shard_format.T5_SCALE)) for s in samples]
        )
    elif len(has_t5) > 1:
        raise LoaderError("micro-batch mixes rows with and without T5 caption states")
    length = batch["image_prompt_attention_mask"].shape[1]
    batch["image_prompt_image_mask"] = torch.stack(
        [
            nn.functional.pad(mask.bool(), (0, length - mask.shape[0]))
            for mask in (sample["image_prompt_image_mask"] for sample in samples)
        ]
    )
    return batch
