"""Rows per (bucket, source) -> per-step row plans: which rows each worker reads, step by step.

Pure NumPy, no I/O: components/training/loader.py builds the BucketIndex these plans draw from
(from the manifest and the shard footers) and reads the planned rows. Inputs: per bucket its
shards in a stable order (BucketRows), the source each shard's rows came from and per source its
sampling share. Output: per optimizer step a StepPlan whose rows are bucket row numbers, int64
[num_workers, accumulation_steps, micro_batch_size].

Sampling contract:
- Every optimizer step draws ALL its micro-batches (every worker, every accumulation step) from
  ONE stratum: one bucket, so all shapes in a step agree, and one source. Step s draws stratum
  (bucket b, source x) with probability share(x) * rows(x, b) / rows(x), where share(x) is x's
  weight over the summed weights of the sources that have rows: over many steps each source
  takes its weight's share of the steps, and within a source buckets are drawn by size. The
  draw for step s is the s-th value of one seeded stream, so a plan is a pure function of
  (strata, shares, seed, batch shape) and resuming at step k gives the same steps k...
- Within a stratum, rows are visited in a fresh seeded permutation per epoch of that stratum (no
  row repeats before the stratum is exhausted). A step that needs more rows than are left runs
  on into the next epoch; a stratum smaller than one step's need (micro_batch * workers *
  accumulation) wraps around several epochs inside one step: tiny strata are used, never
  silently dropped.
- Buckets with no rows, and sources with a weight but no rows, are never drawn and take no share.
- A bucket whose shards all come from one source is one stratum and keeps the draw bounds and
  the permutation stream of the bucket-only sampler that came before sources, so plans of a
  one-source dataset are bit-identical to that sampler's (the golden losses rest on it).
"""

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

_DRAW_STREAM = 0x6275636B


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
class Stratum:
    """The rows one source holds in one bucket: some of the bucket's shards, or all of them."""

    bucket: BucketRows
    source: str
    shards: tuple[int, ...] | None = None
    """Numbers of the bucket's shards that hold this source's rows; None = the whole bucket."""

    @property
    def num_rows(self) -> int:
        if self.shards is None:
            return self.bucket.num_rows
        starts = self.bucket.row_starts
        return sum(starts[shard + 1] - starts[shard] for shard in self.shards)

    def bucket_row_numbers(self) -> np.ndarray:
        """Bucket row number of each stratum row, in bucket order, int64 [num_rows]."""
        starts = self.bucket.row_starts
        shards = range(len(self.bucket.shard_paths)) if self.shards is None else self.shards
        return np.concatenate(
            [np.arange(starts[shard], starts[shard + 1], dtype=np.int64) for shard in shards]
        )


def bucket_strata(
    buckets: Mapping[str, BucketRows], shard_sources: Mapping[str, str]
) -> tuple[Stratum, ...]:
    """The non-empty (bucket, source) strata, ordered by (source, bucket id)."""
    strata = []
    for bucket in buckets.values():
        sources = [shard_sources[path] for path in bucket.shard_paths]
        if len(set(sources)) == 1:
            strata.append(Stratum(bucket, sources[0]))
            continue
        for source in sorted(set(sources)):
            shards = tuple(number for number, name in enumerate(sources) if name == source)
            strata.append(Stratum(bucket, source, shards))
    return tuple(sorted(strata, key=lambda stratum: (stratum.source, stratum.bucket.bucket_id)))


def source_shares(strata: Sequence[Stratum], weights: Mapping[str, float]) -> dict[str, float]:
    """Source name -> its share of the steps, by name: its weight over the summed weights of the
    sources that have rows in `strata` (the others are left out)."""
    drawn = sorted({stratum.source for stratum in strata})
    total = sum(weights[name] for name in drawn)
    return {name: weights[name] / total for name in drawn}


@dataclass(frozen=True, slots=True, eq=False)
class StepPlan:
    """The rows of one optimizer step: one bucket and one source for every worker and
    accumulation step."""

    step: int
    bucket: BucketRows
    source: str
    """The source every row of the step came from."""
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
            and self.source == other.source
            and np.array_equal(self.rows, other.rows)
        )


def plan_strata(
    strata: Sequence[Stratum],
    shares: Mapping[str, float],
    *,
    seed: int,
    shape: tuple[int, int, int],
    steps: range,
) -> list[StepPlan]:
    """Plans of `steps` (a range from step start to stop-1; see the module docstring).

    `strata` are ordered by (source, bucket id) and `shares` by source name (bucket_strata and
    source_shares give them so); `shape` is (num_workers, accumulation_steps, micro_batch_size).
    The plan of step s depends only on (strata, shares, seed, shape, s).
    """
    choices = _stratum_choices(strata, shares, seed=seed, num_steps=steps.stop)
    need = int(np.prod(shape))
    planned = choices[steps.start :]
    # Rows of each stratum consumed by the steps before the range.
    consumed = np.bincount(choices[: steps.start], minlength=len(strata)) * need
    rows = np.empty((len(planned), need), dtype=np.int64)
    for number, stratum in enumerate(strata):
        chosen = np.flatnonzero(planned == number)
        if chosen.size:
            visited = _visit_order(
                stratum, seed=seed, start=int(consumed[number]), length=chosen.size * need
            )
            rows[chosen] = visited.reshape(chosen.size, need)
    return [
        StepPlan(step, strata[choice].bucket, strata[choice].source, rows[offset].reshape(shape))
        for offset, (step, choice) in enumerate(zip(steps, planned.tolist(), strict=True))
    ]


def _stratum_choices(
    strata: Sequence[Stratum], shares: Mapping[str, float], *, seed: int, num_steps: int
) -> np.ndarray:
    """Stratum number per step; value s depends on (seed, s) only."""
    # One stream of doubles: the first k draws are the same whatever num_steps is.
    draws = np.random.Generator(np.random.PCG64([seed, _DRAW_STREAM])).random(num_steps)
    bounds, offset = [], 0.0
    for source, share in shares.items():
        sizes = np.array([stratum.num_rows for stratum in strata if stratum.source == source])
        # One source has share 1.0 and offset 0.0, both exact: its bounds are cumsum / sum.
        bounds.append(offset + share * (np.cumsum(sizes) / sizes.sum()))
        offset += share
    cumulative = np.concatenate(bounds)
    return np.minimum(np.searchsorted(cumulative, draws, side="right"), len(strata) - 1)


def _visit_order(stratum: Stratum, *, seed: int, start: int, length: int) -> np.ndarray:
    """Bucket row numbers at positions start .. start+length-1 of a stratum's endless visit
    order: position p is stratum row perm[epoch = p // n][p % n], one permutation per epoch."""
    size = stratum.num_rows
    order = np.zeros(length, dtype=np.int64)
    if size > 1:  # the permutation of one row is [0], whatever the seed
        stop = start + length
        for epoch in range(start // size, (stop - 1) // size + 1):
            epoch_start = epoch * size
            low, high = max(start, epoch_start), min(stop, epoch_start + size)
            permutation = _permutation(stratum, seed=seed, epoch=epoch)
            order[low - start : high - start] = permutation[low - epoch_start : high - epoch_start]
    return order if stratum.shards is None else stratum.bucket_row_numbers()[order]


def _permutation(stratum: Stratum, *, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation of a stratum's rows for one epoch; a whole-bucket stratum keeps
    the bucket's stream."""
    key = [seed, zlib.crc32(stratum.bucket.bucket_id.encode()), epoch]
    if stratum.shards is not None:
        key.append(zlib.crc32(stratum.source.encode()))
    return np.random.Generator(np.random.PCG64(key)).permutation(stratum.num_rows)
