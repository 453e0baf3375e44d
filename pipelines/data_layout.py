"""Files of one data run.

    <root>/data/source.parquet                   every listed row with its key, chunk and version
                                                 (pipelines/data_sources.py; append-only)
    <root>/data/state.json                       the config hash the run was started with
    <root>/data/work/chunk-NNNNN/                img2dataset output of one chunk
    <root>/data/work/chunk-NNNNN.parquet         one row per source row of the chunk: outcome
    <root>/data/work/fitted/chunk-NNNNN/bucket=<id>.parquet
                                                 the chunk's kept images fitted to that bucket
    <root>/data/work/duplicates.parquet          exact / near duplicates across chunks
    <root>/data/shards/bucket=<id>/part-NNNNN.parquet, <root>/data/versions/vNNNN.json,
    <root>/data/manifest.json                    (components/data/shard_format.py)

Every file is written through a temp name and a rename, so a killed run leaves either a whole
file or none, and a rerun redoes exactly the pieces that have no file yet. A chunk's fitted
files are in place before its outcome file, so an outcome file vouches for them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from components.data.buckets import Bucket, pack_fitted_image, unpack_fitted_image

SCORE_COLUMNS = ("aesthetic_score", "watermark_score", "nsfw_score")
"""Optional per-row scores a source may carry; the filters threshold them."""

OUTCOME_SCHEMA = pa.schema(
    [
        ("sample_key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("bucket_id", pa.string()),
        ("source_width_px", pa.int32()),
        ("source_height_px", pa.int32()),
        ("image_sha256", pa.string()),
        ("phash", pa.uint64()),
    ]
)
"""One row per source row of a chunk. `reason` is "kept" or why the row was rejected;
`stage` is policy | download | filter."""

FITTED_SCHEMA = pa.schema([("sample_key", pa.string()), ("rgb_pixels", pa.binary())])
"""One row per kept sample of a (chunk, bucket), in sample_key order: the image fitted to the
bucket as raw RGB bytes (`pack_fitted_image`); the bucket gives its width and height."""

# lz4, measured per 1024-px photo: 27% smaller than raw (1.35 MB) for 3.4 ms a write and
# 1.2 ms a read (decoding the JPEG again cost 8 ms); zstd-1 is 10% smaller still but costs 6 and
# 2.7 ms, and the read is on the encoder actor's path.
FITTED_COMPRESSION = "lz4"
FITTED_ROW_GROUP_BYTES = 4 * 2**20
"""Pixel bytes buffered per bucket before a row group is written (bounds chunk task memory).
Small on purpose: the buffers are then reused instead of growing the process. Measured on 334
fitted 512-px images in a fresh process: 0.79 s to write at 4 MiB, 0.96 s at 8, 1.41 s at 32
(0.5-0.7 s each once the process is warm)."""


@dataclass(frozen=True, slots=True)
class DataLayout:
    """Paths of a data run under its root."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def source(self) -> Path:
        return self.data / "source.parquet"

    @property
    def state(self) -> Path:
        return self.data / "state.json"

    @property
    def work(self) -> Path:
        return self.data / "work"

    def chunk_dir(self, index: int) -> Path:
        return self.work / f"chunk-{index:05d}"

    def chunk_outcome(self, index: int) -> Path:
        return self.work / f"chunk-{index:05d}.parquet"

    def chunk_fitted_dir(self, index: int) -> Path:
        return self.work / "fitted" / f"chunk-{index:05d}"

    def fitted_images(self, index: int, bucket_id: str) -> Path:
        return self.chunk_fitted_dir(index) / f"bucket={bucket_id}.parquet"

    @property
    def duplicates(self) -> Path:
        return self.work / "duplicates.parquet"


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write a Parquet table through a temp file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, temp)
    os.replace(temp, path)


def read_outcomes(layout: DataLayout, num_chunks: int) -> pa.Table:
    """All chunk outcome files as one table, in key order."""
    tables = [pq.read_table(layout.chunk_outcome(index)) for index in range(num_chunks)]
    return pa.concat_tables(tables) if tables else OUTCOME_SCHEMA.empty_table()


class FittedImageWriter:
    """Streams one chunk's fitted images into one file per bucket, renamed into place on close.

    Use as a context manager: files are moved into place on a clean exit and dropped on an
    exception. Opening removes whatever an earlier, unfinished attempt at the chunk left.
    Images must arrive in sample_key order: `read_fitted_slices` checks it.
    """

    def __init__(self, layout: DataLayout, index: int) -> None:
        self._layout = layout
        self._index = index
        shutil.rmtree(layout.chunk_fitted_dir(index), ignore_errors=True)
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._pending: dict[str, list[tuple[str, bytes]]] = {}
        self._pending_bytes: dict[str, int] = {}

    def add(self, sample_key: str, bucket: Bucket, image: Image.Image) -> None:
        """Queue one kept sample's image, already fitted to `bucket`."""
        pixels = pack_fitted_image(image, bucket)
        self._pending.setdefault(bucket.bucket_id, []).append((sample_key, pixels))
        buffered = self._pending_bytes.get(bucket.bucket_id, 0) + len(pixels)
        self._pending_bytes[bucket.bucket_id] = buffered
        if buffered >= FITTED_ROW_GROUP_BYTES:
            self._flush(bucket.bucket_id)

    def _temp(self, bucket_id: str) -> Path:
        path = self._layout.fitted_images(self._index, bucket_id)
        return path.with_name(f".{path.name}.tmp-{os.getpid()}")

    def _flush(self, bucket_id: str) -> None:
        rows = self._pending.pop(bucket_id, [])
        self._pending_bytes.pop(bucket_id, None)
        if not rows:
            return
        if bucket_id not in self._writers:
            temp = self._temp(bucket_id)
            temp.parent.mkdir(parents=True, exist_ok=True)
            self._writers[bucket_id] = pq.ParquetWriter(
                temp, FITTED_SCHEMA, compression=FITTED_COMPRESSION
            )
        table = pa.table(
            {"sample_key": [key for key, _ in rows], "rgb_pixels": [data for _, data in rows]},
            schema=FITTED_SCHEMA,
        )
        self._writers[bucket_id].write_table(table)

    def close(self) -> None:
        for bucket_id in list(self._pending):
            self._flush(bucket_id)
        for bucket_id, writer in self._writers.items():
            writer.close()
            os.replace(self._temp(bucket_id), self._layout.fitted_images(self._index, bucket_id))
        self._writers = {}

    def abort(self) -> None:
        for bucket_id, writer in self._writers.items():
            writer.close()
            self._temp(bucket_id).unlink(missing_ok=True)
        self._writers, self._pending = {}, {}

    def __enter__(self) -> FittedImageWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_fitted_slices(
    path: Path, keys: list[str], bucket: Bucket, *, slice_rows: int
) -> Iterator[tuple[list[str], list[Image.Image]]]:
    """The fitted images of `keys` from one (chunk, bucket) file, `slice_rows` at a time.

    keys are in sample_key order and a subset of the file's (rows of later-found duplicates
    are skipped); the yielded slice keys, joined, are exactly `keys`. Raises ValueError on a
    row out of order and FileNotFoundError when the file lacks one of `keys`.
    """
    if not path.exists():
        # The chunk's outcome file vouches for this file, so it was removed or predates it.
        raise FileNotFoundError(
            f"{path}: no fitted images for this chunk and bucket; delete the chunk's outcome "
            "file (work/chunk-NNNNN.parquet) so that a rerun redoes the chunk"
        )
    wanted = set(keys)
    found = 0
    slice_keys: list[str] = []
    images: list[Image.Image] = []
    for key, pixels in _fitted_rows(path, batch_rows=slice_rows):
        if key not in wanted:
            continue
        if found == len(keys) or key != keys[found]:
            raise ValueError(f"{path}: sample {key} out of order or repeated")
        found += 1
        slice_keys.append(key)
        # A view of Arrow's buffer: as_py() would first copy the pixels into a bytes object.
        images.append(unpack_fitted_image(memoryview(pixels.as_buffer()), bucket))
        if len(slice_keys) == slice_rows:
            yield slice_keys, images
            slice_keys, images = [], []
    if found != len(keys):
        raise FileNotFoundError(f"{path}: fitted images missing for {keys[found : found + 5]}")
    if slice_keys:
        yield slice_keys, images


def _fitted_rows(path: Path, *, batch_rows: int) -> Iterator[tuple[str, pa.BinaryScalar]]:
    with pq.ParquetFile(path) as parquet:
        for batch in parquet.iter_batches(batch_size=batch_rows):
            yield from zip(batch["sample_key"].to_pylist(), batch["rgb_pixels"], strict=True)
