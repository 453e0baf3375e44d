"""The dataset's url lists and how the dataset grows from them.

`data.source.url_lists` names url-list files (Parquet or JSONL) and folders of them. Every row
ever listed is registered once in `<root>/data/source.parquet` with a stable key, the chunk it
is processed in and the dataset version that added it. A run that finds a new list, or new rows
in a known list, registers only those rows, in new chunks, so only they are downloaded, filtered
and encoded; rows of earlier versions keep their outcome files and shards (reused, not redone).

Row identity is (list name, hash of url + caption + scores, occurrence of that hash in the
list): reordering a list or appending to it adds only the appended rows. A dataset only grows:
a registered list or row that is no longer listed is an error (dropping data is a new run.root),
so each version's shards are a subset of the next version's and earlier versions stay readable.
Keys are the registry's row numbers and chunks never span two lists.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from components.data import shard_format
from pipelines.config import DataConfig
from pipelines.config_loading import config_hash
from pipelines.data_layout import SCORE_COLUMNS, DataLayout, write_table_atomic

LIST_SUFFIXES = (".parquet", ".jsonl", ".json")

REGISTRY_SCHEMA = pa.schema(
    [
        ("sample_key", pa.string()),
        ("source_list", pa.string()),
        ("row_hash", pa.string()),
        ("occurrence", pa.int32()),
        ("chunk_index", pa.int32()),
        ("added_in", pa.int32()),
        ("url", pa.string()),
        ("caption", pa.string()),
        *((name, pa.float64()) for name in SCORE_COLUMNS),
    ]
)
"""One row per source row ever listed, in key order; `added_in` is the dataset version."""


class SourceListError(ValueError):
    """A url list that cannot be read, lacks required columns, or shrank."""


@dataclass(frozen=True, slots=True)
class UrlList:
    """One url-list file: `name` is its file name, or its path inside the listed folder."""

    name: str
    path: Path


@dataclass(frozen=True, slots=True)
class Registry:
    """Every registered source row (key order) and the version this run completes."""

    rows: list[dict[str, Any]]
    version: int
    """The version whose rows this run finishes: the last published one when nothing is new."""

    @property
    def num_chunks(self) -> int:
        return 1 + max((row["chunk_index"] for row in self.rows), default=-1)

    def chunks(self) -> list[list[dict[str, Any]]]:
        """Rows per chunk index; a url seen at a lower key is marked `duplicate_url`."""
        chunks: list[list[dict[str, Any]]] = [[] for _ in range(self.num_chunks)]
        seen: set[str] = set()
        for row in self.rows:
            chunks[row["chunk_index"]].append({**row, "duplicate_url": row["url"] in seen})
            seen.add(row["url"])
        return chunks

    def list_summaries(self) -> list[dict[str, Any]]:
        """Per list: name, rows, the version that first listed it, content hash of its rows."""
        by_list: dict[str, list[dict[str, Any]]] = {}
        for row in self.rows:
            by_list.setdefault(row["source_list"], []).append(row)
        return [
            {
                "name": name,
                "rows": len(rows),
                "added_in": min(row["added_in"] for row in rows),
                "rows_sha256": hashlib.sha256(
                    "".join(sorted(row["row_hash"] for row in rows)).encode()
                ).hexdigest(),
            }
            for name, rows in by_list.items()
        ]


def state_fingerprint(config: DataConfig) -> str:
    """What a resumed or growing run must share with the run that made its files: everything
    but the url lists (the dataset grows from them) and the encoder pool's size and placement."""
    resources = replace(
        config.resources, num_encoders=1, cpus_per_encoder=1.0, gpus_per_encoder=0.0
    )
    source = replace(config.source, url_lists=())
    return config_hash(replace(config, resources=resources, source=source))


def discover_lists(entries: Sequence[str]) -> list[UrlList]:
    """The url lists that `entries` (files or folders) name, folders expanded in name order."""
    lists: list[UrlList] = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            files = sorted(
                file
                for file in path.rglob("*")
                if file.is_file()
                and file.suffix in LIST_SUFFIXES
                and not any(part.startswith(".") for part in file.relative_to(path).parts)
            )
            if not files:
                raise SourceListError(f"{path}: folder holds no url list (*.parquet, *.jsonl)")
            lists += [UrlList(file.relative_to(path).as_posix(), file) for file in files]
        elif path.is_file():
            lists.append(UrlList(path.name, path))
        else:
            raise SourceListError(f"url list not found: {path}")
    repeated = [name for name, count in Counter(item.name for item in lists).items() if count > 1]
    if repeated:
        paths = [str(item.path) for item in lists if item.name == repeated[0]]
        raise SourceListError(f"two url lists are both named {repeated[0]!r}: {paths}")
    return lists


def lists_fingerprint(entries: Sequence[str]) -> dict[str, str]:
    """{list name: file sha256} of what `entries` name now (a workflow step's input)."""
    from components.checkpoints import hash_file

    return {item.name: hash_file(item.path) for item in discover_lists(entries)}


def read_list_rows(path: Path) -> list[dict[str, Any]]:
    """A Parquet or JSONL url list as rows of url, caption and the scores it has."""
    try:
        if path.suffix in (".jsonl", ".json"):
            lines = path.read_text().splitlines()
            table = pa.Table.from_pylist([json.loads(line) for line in lines if line.strip()])
        else:
            table = pq.read_table(path)
    except (OSError, ValueError, pa.ArrowException) as error:
        raise SourceListError(f"{path}: unreadable url list: {error}") from None
    if not table.num_rows:
        return []
    if "url" not in table.column_names:
        raise SourceListError(f"{path}: url list needs a 'url' column, has {table.column_names}")
    columns = {"url": table["url"].cast(pa.string())}
    columns["caption"] = (
        table["caption"].cast(pa.string())
        if "caption" in table.column_names
        else pa.nulls(table.num_rows, pa.string())
    )
    for name in SCORE_COLUMNS:
        if name in table.column_names:
            columns[name] = table[name].cast(pa.float64())
    return pa.table(columns).to_pylist()


def register_sources(layout: DataLayout, lists: Sequence[UrlList], *, chunk_size: int) -> Registry:
    """Append the rows of `lists` not registered yet (new keys, new chunks) and return them all.

    Raises SourceListError when a registered list or row is no longer listed.
    """
    existing = read_registry(layout)
    published = max(shard_format.list_versions(layout.data), default=0)
    version = published + 1
    known: dict[str, dict[tuple[str, str, int], dict]] = {}
    for row in existing:
        known.setdefault(row["source_list"], {})[_identity(row)] = row
    listed = {item.name for item in lists}
    gone = sorted(set(known) - listed)
    if gone:
        raise SourceListError(
            f"url list {gone[0]!r} is part of this dataset but no longer listed in "
            "data.source.url_lists; a dataset only grows: list it again, or start a new run.root"
        )
    added: list[dict[str, Any]] = []
    next_chunk = 1 + max((row["chunk_index"] for row in existing), default=-1)
    for item in lists:
        new_rows = _new_rows(item, known.get(item.name, {}))
        for start in range(0, len(new_rows), chunk_size):
            for row in new_rows[start : start + chunk_size]:
                key = f"{len(existing) + len(added):09d}"
                added.append(
                    {**row, "sample_key": key, "chunk_index": next_chunk, "added_in": version}
                )
            next_chunk += 1
    rows = existing + added
    if added:
        write_table_atomic(pa.Table.from_pylist(rows, schema=REGISTRY_SCHEMA), layout.source)
    pending = any(row["added_in"] > published for row in rows)
    return Registry(rows=rows, version=version if pending or not published else published)


def read_registry(layout: DataLayout) -> list[dict[str, Any]]:
    if not layout.source.exists():
        return []
    table = pq.read_table(layout.source)
    if table.schema.remove_metadata() != REGISTRY_SCHEMA:
        raise SourceListError(
            f"{layout.source}: source registry of another format (made by an older version); "
            "start a new run.root"
        )
    return table.to_pylist()


def _new_rows(item: UrlList, known: dict[tuple[str, str, int], dict]) -> list[dict[str, Any]]:
    """Rows of one list that are not registered (`known`: the list's registered rows by
    identity); every registered row must still be listed."""
    occurrences: Counter[str] = Counter()
    seen, new = set(), []
    for row in read_list_rows(item.path):
        row_hash = _row_hash(row)
        full = {
            **{name: row.get(name) for name in ("url", "caption", *SCORE_COLUMNS)},
            "source_list": item.name,
            "row_hash": row_hash,
            "occurrence": occurrences[row_hash],
        }
        occurrences[row_hash] += 1
        identity = _identity(full)
        seen.add(identity)
        if identity not in known:
            new.append(full)
    missing = [row for identity, row in known.items() if identity not in seen]
    if missing:
        raise SourceListError(
            f"{item.path}: {len(missing)} rows registered from this list are no longer in it "
            f"(first: key {missing[0]['sample_key']}, url {missing[0]['url']}); a dataset only "
            "grows: restore them, or start a new run.root"
        )
    return new


def _row_hash(row: dict[str, Any]) -> str:
    content = {name: row.get(name) for name in ("url", "caption", *SCORE_COLUMNS)}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]


def _identity(row: dict[str, Any]) -> tuple[str, str, int]:
    return row["source_list"], row["row_hash"], int(row["occurrence"])
