"""The dataset's sources and how the dataset grows from them.

`[[data.sources]]` names the sources (pipelines/source_config.py); each has one or more lists:
url-list files (Parquet or JSONL, or folders of them), a folder root, tar shards, Parquet files.
Every row ever listed is registered once in `<root>/data/source.parquet` with a stable key, its
source and list, the chunk it is processed in and the dataset version that added it. A run that
finds a new list, or new rows in a known list, registers only those rows, in new chunks, so only
they are downloaded (or read), filtered and encoded; rows of earlier versions keep their outcome
files and shards (reused, not redone).

Row identity is (source, list, row hash, occurrence of that hash in the list). A url row's hash
covers url + caption + scores; a local row's covers its locator only (a relpath, `tar::key`,
`file::row`), so a caption edited after registration does not make a new row. Reordering or
appending adds only the appended rows. A dataset only grows: a registered source, list or
readable row that is no longer listed is an error (dropping data is a new run.root), so each
version's shards are a subset of the next version's. A row refused while listing (a symlink out
of the root, a truncated tar) may disappear later. Keys are the registry's row numbers and
chunks never span two lists.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from components.data import shard_format
from pipelines.config import DataConfig
from pipelines.config_loading import to_plain
from pipelines.data_layout import SCORE_COLUMNS, DataLayout, write_table_atomic
from pipelines.source_config import DataSourceConfig

LIST_SUFFIXES = (".parquet", ".jsonl", ".json")

REGISTRY_SCHEMA = pa.schema(
    [
        ("sample_key", pa.string()),
        ("source", pa.string()),
        ("source_list", pa.string()),
        ("row_hash", pa.string()),
        ("occurrence", pa.int32()),
        ("chunk_index", pa.int32()),
        ("added_in", pa.int32()),
        ("url", pa.string()),
        ("caption", pa.string()),
        *((name, pa.float64()) for name in SCORE_COLUMNS),
        ("listing_rejection", pa.string()),
        ("listing_detail", pa.string()),
        ("read_hint", pa.string()),
    ]
)
"""One row per source row ever listed, in key order; `added_in` is the dataset version. `url` is
the url, or `<source>:<locator>` for a local row (read back through `read_hint`)."""


class SourceListError(ValueError):
    """A source list that cannot be read, lacks required columns, or shrank."""


@dataclass(frozen=True, slots=True)
class SourceList:
    """One list of a source: a url-list file (`name`: its file name, or its path inside the
    listed folder), a folder root ("."), a tar shard or a Parquet file (file name)."""

    source: str
    kind: str
    name: str
    path: str


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

    def chunk_lists(self) -> dict[int, tuple[str, str]]:
        """(source, list) of each chunk (a chunk never spans two lists)."""
        return {row["chunk_index"]: (row["source"], row["source_list"]) for row in self.rows}

    def list_summaries(self, source: str) -> list[dict[str, Any]]:
        """Per list of `source`: name, rows, the version that first listed it, content hash."""
        by_list: dict[str, list[dict[str, Any]]] = {}
        for row in self.rows:
            if row["source"] == source:
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
    but the sources (the dataset grows from them; weights only steer training) and the encoder
    pool's size and placement."""
    plain = to_plain(config)
    plain.pop("sources")
    plain["resources"].update(num_encoders=1, cpus_per_encoder=1.0, gpus_per_encoder=0.0)
    if not plain["encode"]["t5_caption"]:
        # Added (off by default) with shard format 4: runs made before keep their fingerprint.
        del plain["encode"]["t5_caption"]
    canonical = json.dumps(plain, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def discover_lists(config: DataConfig, *, synthetic_list: Path | None = None) -> list[SourceList]:
    """Every list of every source, in config order (a synthetic source's list is the corpus
    url list written for the run)."""
    return [item for source in config.sources for item in source_lists(source, synthetic_list)]


def source_lists(source: DataSourceConfig, synthetic_list: Path | None) -> list[SourceList]:
    """The lists of one source (see SourceList)."""
    from components.data.local_sources import list_lists

    if source.kind == "synthetic":
        if synthetic_list is None:
            raise SourceListError(f"source {source.name!r}: synthetic corpus not written")
        found = [(synthetic_list.name, str(synthetic_list))]
    elif source.kind == "url_list":
        found = discover_url_lists(source.paths)
    else:
        try:
            found = list_lists(source.kind, source.reader_config())
        except ValueError as error:
            raise SourceListError(f"source {source.name!r}: {error}") from None
    return [SourceList(source.name, source.kind, name, path) for name, path in found]


def discover_url_lists(entries: Sequence[str]) -> list[tuple[str, str]]:
    """(name, path) of the url lists `entries` (files or folders) name, folders expanded in
    name order."""
    lists: list[tuple[str, str]] = []
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
            lists += [(file.relative_to(path).as_posix(), str(file)) for file in files]
        elif path.is_file():
            lists.append((path.name, str(path)))
        else:
            raise SourceListError(f"url list not found: {path}")
    repeated = [name for name, count in Counter(name for name, _ in lists).items() if count > 1]
    if repeated:
        paths = [path for name, path in lists if name == repeated[0]]
        raise SourceListError(f"two url lists are both named {repeated[0]!r}: {paths}")
    return lists


def lists_fingerprint(config: DataConfig) -> dict[str, str]:
    """{source/list: content fingerprint} of what the sources hold now (a workflow step's
    input): url lists by file hash, local lists by the names, sizes and times of their files,
    files on object storage by their size and modification time there."""
    from components.checkpoints import hash_file
    from pipelines.storage import is_remote, remote_file_stamp

    fingerprint = {}
    for source in config.sources:
        if source.kind == "synthetic":  # written from the seed and data.synthetic
            continue
        for item in source_lists(source, None):
            key = f"{item.source}/{item.name}"
            if item.kind == "url_list":
                fingerprint[key] = hash_file(Path(item.path))
            elif is_remote(item.path):
                fingerprint[key] = remote_file_stamp(item.path)
            else:
                fingerprint[key] = _stat_fingerprint(Path(item.path))
    return fingerprint


def _stat_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    for file in files:
        try:
            status = file.lstat()
        except OSError:
            continue
        digest.update(f"{file}:{status.st_size}:{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()


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


def register_sources(
    layout: DataLayout, lists: Sequence[SourceList], *, config: DataConfig
) -> Registry:
    """Append the rows of `lists` not registered yet (new keys, new chunks) and return them all.

    Raises SourceListError when a registered source, list or readable row is no longer listed.
    """
    existing = read_registry(layout)
    published = max(shard_format.list_versions(layout.data), default=0)
    version = published + 1
    known: dict[tuple[str, str], dict[tuple[str, str, int], dict]] = {}
    for row in existing:
        known.setdefault((row["source"], row["source_list"]), {})[_identity(row)] = row
    _check_nothing_gone(set(known), lists)
    added: list[dict[str, Any]] = []
    next_chunk = 1 + max((row["chunk_index"] for row in existing), default=-1)
    chunk_size = config.resources.chunk_size
    for item in lists:
        rows = _listed_rows(item, config.source(item.source))
        new_rows = _new_rows(item, rows, known.get((item.source, item.name), {}))
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


def _check_nothing_gone(known: set[tuple[str, str]], lists: Sequence[SourceList]) -> None:
    listed = {(item.source, item.name) for item in lists}
    sources = {item.source for item in lists}
    for source, name in sorted(known - listed):
        what = f"source {source!r}" if source not in sources else f"list {name!r} of {source!r}"
        raise SourceListError(
            f"{what} is part of this dataset but no longer listed in [[data.sources]]; a "
            "dataset only grows: list it again, or start a new run.root"
        )


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


def _listed_rows(item: SourceList, source: DataSourceConfig) -> list[dict[str, Any]]:
    """The list's rows with their hash (identity before the occurrence count)."""
    if not source.is_local:
        return [{**row, "row_hash": _row_hash(row)} for row in read_list_rows(Path(item.path))]
    from components.data.local_sources import list_local_rows

    rows = []
    for local in list_local_rows(item.kind, source.reader_config(), item.path):
        url = f"{item.source}:{local.locator}"
        rows.append(
            {
                "url": url,
                "caption": local.caption,
                "row_hash": hashlib.sha256(url.encode()).hexdigest()[:32],
                "listing_rejection": local.rejection,
                "listing_detail": local.detail or None,
                "read_hint": local.read_hint or None,
            }
        )
    return rows


def _new_rows(
    item: SourceList, rows: list[dict[str, Any]], known: dict[tuple[str, str, int], dict]
) -> list[dict[str, Any]]:
    """Rows of one list that are not registered (`known`: the list's registered rows by
    identity); every registered readable row must still be listed."""
    occurrences: Counter[str] = Counter()
    seen, new = set(), []
    for row in rows:
        full = {
            **{name: row.get(name) for name in REGISTRY_SCHEMA.names},
            "source": item.source,
            "source_list": item.name,
            "occurrence": occurrences[row["row_hash"]],
        }
        occurrences[row["row_hash"]] += 1
        identity = _identity(full)
        seen.add(identity)
        if identity not in known:
            new.append(full)
    missing = [
        row
        for identity, row in known.items()
        if identity not in seen and row["listing_rejection"] is None
    ]
    if missing:
        raise SourceListError(
            f"{item.path}: {len(missing)} rows registered from this list are no longer in it "
            f"(first: key {missing[0]['sample_key']}, {missing[0]['url']}); a dataset only "
            "grows: restore them, or start a new run.root"
        )
    return new


def _row_hash(row: dict[str, Any]) -> str:
    content = {name: row.get(name) for name in ("url", "caption", *SCORE_COLUMNS)}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]


def _identity(row: dict[str, Any]) -> tuple[str, str, int]:
    return row["source_list"], row["row_hash"], int(row["occurrence"])
