"""Cached shards -> deterministic, bucketed training micro-batches.

Input: a dataset root written by the data pipeline (manifest.json + shards/bucket=*/part-*.parquet,
see components/data/shard_format.py). Output: per optimizer step a StepPlan (which rows each worker
reads for every accumulation step) and, per micro-batch, a dict of collated tensors
(load_micro_batch).

Sampling contract:
- Every optimizer step draws ALL its micro-batches (every worker, every accumulation step) from
  ONE bucket, so all shapes in a step agree. Buckets are drawn with probability proportional to
  their row count; the draw for step s is the s-th value of one seeded stream, so a plan is a
  pure function of (index, seed, batch shape) and resuming at step k gives the same steps k...
- Within a bucket, rows are visited in a fresh seeded permutation per epoch of that bucket (no
  row repeats before the bucket is exhausted). A step that needs more rows than are left runs on
  into the next epoch; a bucket smaller than one step's need (micro_batch * workers * accumulation)
  wraps around several epochs inside one step: tiny buckets are used, never silently dropped.
- Buckets with no rows have weight 0 and are never drawn; a dataset with no rows is an error.
Reads are row-group granular (Parquet's unit of random access) with a small LRU of row groups.
"""

import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from components.data import shard_format
from components.data.encode import decode_hidden
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
    """Seed of the bucket draws and of the per-epoch row permutations."""
    max_cached_row_groups: int = 8
    """Decoded Parquet row groups a reader keeps (LRU); each holds many samples."""

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "accumulation_steps", "max_cached_row_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


class RowRef(NamedTuple):
    """One sample: a shard file and the row's index inside it."""

    shard_path: str
    row_index: int


@dataclass(frozen=True, slots=True)
class BucketRows:
    """The rows of one bucket: its shards in a stable order, addressed by a bucket row number."""

    bucket_id: str
    shard_paths: tuple[str, ...]
    row_starts: tuple[int, ...]
    """First bucket row number of each shard; a final entry holds num_rows."""

    @property
    def num_rows(self) -> int:
        return self.row_starts[-1]

    def locate(self, rows: Sequence[int]) -> tuple[RowRef, ...]:
        """Bucket row numbers -> (shard path, row in shard)."""
        starts = np.asarray(self.row_starts)
        shard_numbers = np.searchsorted(starts, rows, side="right") - 1
        return tuple(
            RowRef(self.shard_paths[shard], int(row) - self.row_starts[shard])
            for shard, row in zip(shard_numbers.tolist(), rows, strict=True)
        )


@dataclass(frozen=True, slots=True)
class BucketIndex:
    """What a dataset holds per bucket, checked against the manifest and the shard footers."""

    root: Path
    dataset_id: str
    buckets: dict[str, BucketRows]
    """Non-empty buckets in sorted id order."""
    empty_buckets: tuple[str, ...]
    """Buckets the manifest lists with no rows (never drawn)."""

    @classmethod
    def from_dataset(cls, root: Path, *, version: int | None = None) -> "BucketIndex":
        """Read manifest + shard metadata of the latest dataset version (or `version`); errors
        name the manifest or the shard file.

        Checks: manifest format version, every listed shard present, readable, of this format
        version and with the listed row count, no shard on disk that the latest version does
        not list, per-bucket counts.
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
        paths_by_bucket: dict[str, list[tuple[str, int]]] = {}
        for entry in entries:
            path, bucket_id, num_rows = _checked_entry(root, entry, manifest_path=manifest_path)
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
        return cls(root, str(manifest.get("dataset_id", "")), buckets, tuple(empty))

    @property
    def num_rows(self) -> int:
        return sum(bucket.num_rows for bucket in self.buckets.values())

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


def _shard_metadata(path: Path) -> pq.FileMetaData:
    """Footer of a shard, with its format version checked; errors name the file."""
    try:
        metadata = pq.read_metadata(path)
    except (OSError, pa.ArrowInvalid) as error:
        raise LoaderError(f"{path}: corrupt or unreadable Parquet shard: {error}") from None
    version = (metadata.metadata or {}).get(b"qwenflux_format_version", b"?").decode()
    if version != str(shard_format.FORMAT_VERSION):
        raise LoaderError(
            f"{path}: shard format version {version}, this code reads {shard_format.FORMAT_VERSION}"
        )
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


@dataclass(frozen=True, slots=True, eq=False)
class StepPlan:
    """The rows of one optimizer step: one bucket for every worker and accumulation step."""

    step: int
    bucket: BucketRows
    rows: np.ndarray
    """Bucket row numbers, int64 [num_workers, accumulation_steps, micro_batch_size]."""

    @property
    def bucket_id(self) -> str:
        return self.bucket.bucket_id

    def micro_batch(self, worker_rank: int, accumulation_index: int) -> tuple[RowRef, ...]:
        """The rows worker `worker_rank` reads for its `accumulation_index`-th micro-batch."""
        return self.bucket.locate(self.rows[worker_rank, accumulation_index].tolist())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StepPlan):
            return NotImplemented
        return (
            self.step == other.step
            and self.bucket == other.bucket
            and np.array_equal(self.rows, other.rows)
        )


def plan_steps(
    index: BucketIndex,
    config: LoaderConfig,
    *,
    num_steps: int,
    num_workers: int,
    start_step: int = 0,
) -> list[StepPlan]:
    """Plans of steps start_step .. num_steps-1 (see the module docstring for the contract).

    The plan of step s depends only on (index, config, num_workers, s): planning fewer or more
    steps, or starting later, never changes it.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if not 0 <= start_step <= num_steps:
        raise ValueError(f"start_step must be in [0, num_steps={num_steps}], got {start_step}")
    bucket_ids = list(index.buckets)
    sizes = np.array([index.buckets[bucket_id].num_rows for bucket_id in bucket_ids])
    choices = _bucket_choices(sizes, seed=config.seed, num_steps=num_steps)
    need = num_workers * config.accumulation_steps * config.micro_batch_size
    # Rows of each bucket consumed by the steps before start_step.
    consumed = np.bincount(choices[:start_step], minlength=len(bucket_ids)) * need
    permutations = _PermutationCache(config.seed)
    shape = (num_workers, config.accumulation_steps, config.micro_batch_size)
    plans = []
    for step in range(start_step, num_steps):
        choice = int(choices[step])
        bucket = index.buckets[bucket_ids[choice]]
        positions = np.arange(consumed[choice], consumed[choice] + need)
        consumed[choice] += need
        rows = permutations.rows(bucket, positions).reshape(shape)
        plans.append(StepPlan(step, bucket, rows))
    return plans


def _bucket_choices(sizes: np.ndarray, *, seed: int, num_steps: int) -> np.ndarray:
    """Bucket number per step, drawn proportionally to sizes; value s depends on (seed, s) only."""
    # One stream of doubles: the first k draws are the same whatever num_steps is.
    draws = np.random.Generator(np.random.PCG64([seed, 0x6275636B])).random(num_steps)
    cumulative = np.cumsum(sizes) / sizes.sum()
    return np.minimum(np.searchsorted(cumulative, draws, side="right"), len(sizes) - 1)


class _PermutationCache:
    """Seeded per-(bucket, epoch) permutations; position p of a bucket's infinite visit order is
    row perm[epoch = p // n][p % n]."""

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    def rows(self, bucket: BucketRows, positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(positions, bucket.num_rows)
        first, last = int(epochs[0]), int(epochs[-1])
        if first == last:
            return self._permutation(bucket, first)[offsets]
        rows = np.empty_like(positions)
        for epoch in range(first, last + 1):
            selected = epochs == epoch
            rows[selected] = self._permutation(bucket, epoch)[offsets[selected]]
        return rows

    def _permutation(self, bucket: BucketRows, epoch: int) -> np.ndarray:
        key = (bucket.bucket_id, epoch)
        if key not in self._cache:
            # Plans walk each bucket forward, so older epochs of this bucket are never needed.
            stale = [old for old in self._cache if old[0] == key[0] and old[1] < epoch]
            for old in stale:
                del self._cache[old]
            bucket_key = zlib.crc32(bucket.bucket_id.encode())
            generator = np.random.Generator(np.random.PCG64([self._seed, bucket_key, epoch]))
            self._cache[key] = generator.permutation(bucket.num_rows)
        return self._cache[key]


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
      image_grid_thw int64 [B, 3]; sample_key, caption: list[str]; bucket_id: str.
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
    length = batch["image_prompt_attention_mask"].shape[1]
    batch["image_prompt_image_mask"] = torch.stack(
        [
            nn.functional.pad(mask.bool(), (0, length - mask.shape[0]))
            for mask in (sample["image_prompt_image_mask"] for sample in samples)
        ]
    )
    return batch
