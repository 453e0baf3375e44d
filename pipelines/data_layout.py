"""Files of one data run, and the source list they start from.

    <root>/data/source.parquet                   the url list with stable keys (written once)
    <root>/data/state.json                       config + source hashes the run was started with
    <root>/data/work/chunk-NNNNN/                img2dataset output of one chunk
    <root>/data/work/chunk-NNNNN.parquet         one row per source row of the chunk: outcome
    <root>/data/work/duplicates.parquet          exact / near duplicates across chunks
    <root>/data/shards/bucket=<id>/part-NNNNN.parquet, <root>/data/manifest.json

Every file is written through a temp name and a rename, so a killed run leaves either a whole
file or none, and a rerun redoes exactly the pieces that have no file yet.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

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


class SourceListError(ValueError):
    """A url list that cannot be read or lacks required columns."""


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

    @property
    def duplicates(self) -> Path:
        return self.work / "duplicates.parquet"


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Write a Parquet table through a temp file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, temp)
    os.replace(temp, path)


def read_url_list(path: Path) -> pa.Table:
    """Read a Parquet or JSONL url list into (sample_key, url, caption, scores...).

    Keys are the zero-padded row index, so they are stable for the same list.
    """
    if not path.exists():
        raise SourceListError(f"url list not found: {path}")
    if path.suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        table = pa.Table.from_pylist(rows)
    else:
        table = pq.read_table(path)
    if "url" not in table.column_names:
        raise SourceListError(f"{path}: url list needs a 'url' column, has {table.column_names}")
    columns: dict[str, Any] = {
        "sample_key": [f"{index:09d}" for index in range(table.num_rows)],
        "url": table["url"].cast(pa.string()),
        "caption": (
            table["caption"].cast(pa.string())
            if "caption" in table.column_names
            else pa.nulls(table.num_rows, pa.string())
        ),
    }
    for name in SCORE_COLUMNS:
        if name in table.column_names:
            columns[name] = table[name].cast(pa.float64())
    return pa.table(columns)


def table_sha256(table: pa.Table) -> str:
    """Content hash of a url list (urls, captions, scores), independent of file encoding."""
    digest = hashlib.sha256()
    for row in table.to_pylist():
        digest.update(json.dumps(row, sort_keys=True).encode())
    return digest.hexdigest()
