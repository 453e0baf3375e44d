"""One interface over the local source readers (folder, WebDataset tars, Parquet with image bytes).

The data pipeline lists a source's rows once, on the driver (`list_local_rows`: identities and
captions, never image bytes) and reads a chunk's image bytes later, in a worker task
(`read_local_images`). A `LocalRow` is what the source registry keeps between the two: the row's
locator (its stable identity inside the list), its caption, a refusal found while listing, and a
`read_hint` that lets the reader find the bytes again without listing the list a second time.

Lists: a folder source is one list (its root); a WebDataset source has one list per tar file
and a parquet_images source one per Parquet file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_IMAGE_BYTES = 64 * 2**20
"""Largest image file a folder source reads (the other readers carry their own limit)."""


@dataclass(frozen=True, slots=True)
class LocalRow:
    """One row of a local list, as listed (and registered)."""

    locator: str
    """Identity inside its list: a relpath, `<tar>::<key>` or `<file>::<row>`."""
    caption: str | None
    rejection: str | None = None
    """A reason found while listing (the row is counted, never read)."""
    detail: str = ""
    read_hint: str = ""
    """What the reader needs to find the bytes again (JSON or a path; reader-specific)."""


ReadResult = tuple[bytes | None, str | None, str]
"""(bytes, None, "") or (None, reason, detail)."""


def list_lists(kind: str, reader_config: Any) -> list[tuple[str, str]]:
    """(list name, path) of every list of a local source, names unique within the source."""
    if kind == "folder":
        return [(".", reader_config.root)]
    if kind == "webdataset":
        from components.data.webdataset_source import expand_shard_paths

        paths = expand_shard_paths(reader_config.paths)
    elif kind == "parquet_images":
        from components.data.parquet_image_source import expand_parquet_paths

        paths = expand_parquet_paths(reader_config.paths)
    else:
        raise ValueError(f"kind: {kind!r} is not a local source kind")
    return _unique_names(paths)


def _unique_names(paths: Sequence[str]) -> list[tuple[str, str]]:
    """Names are file names; where two files share one, the shortest distinct path tails."""
    parts = [Path(path).parts for path in paths]
    depth = 1
    while depth <= max((len(item) for item in parts), default=1):
        names = ["/".join(item[-depth:]) for item in parts]
        if len(set(names)) == len(names):
            return list(zip(names, [str(path) for path in paths], strict=True))
        depth += 1
    raise ValueError(f"paths: the same file is listed twice in {list(paths)}")


def list_local_rows(kind: str, reader_config: Any, path: str) -> list[LocalRow]:
    """Every row of one list (refused ones included), in locator order for folders and in
    stored order for tars and Parquet files."""
    if kind == "folder":
        return _folder_rows(reader_config)
    if kind == "webdataset":
        from components.data.webdataset_source import list_shard

        return [
            LocalRow(
                entry.locator,
                entry.caption,
                entry.rejection,
                entry.detail,
                json.dumps({"member": entry.member, "offset": entry.offset, "size": entry.size}),
            )
            for entry in list_shard(path, reader_config)
        ]
    if kind == "parquet_images":
        from components.data.parquet_image_source import list_parquet_file

        return [
            LocalRow(entry.locator, entry.caption, entry.rejection, entry.detail, "")
            for entry in list_parquet_file(path, reader_config)
        ]
    raise ValueError(f"kind: {kind!r} is not a local source kind")


def _folder_rows(config: Any) -> list[LocalRow]:
    from components.data.folder_source import list_folder

    root = Path(os.path.realpath(config.root))
    rows = []
    for entry in list_folder(config):
        # The bytes are read through the real path: a symlinked file inside the root is read
        # at its target, relative to the root so the hint survives the root being remounted.
        hint = "" if entry.path is None else entry.path.relative_to(root).as_posix()
        rows.append(LocalRow(entry.relpath, entry.caption, entry.rejection, entry.detail, hint))
    return rows


def read_local_images(
    kind: str, reader_config: Any, path: str, rows: Sequence[LocalRow]
) -> list[ReadResult]:
    """The image bytes of `rows` (all of one list), or why each could not be read."""
    if kind == "folder":
        return _read_folder(reader_config, rows)
    if kind == "webdataset":
        from components.data.webdataset_source import WebDatasetEntry, read_images

        entries = []
        for row in rows:
            hint = json.loads(row.read_hint) if row.read_hint else {}
            # Reading needs the member's place only; the caption stays in the registry row.
            entries.append(
                WebDatasetEntry(
                    key=row.locator.split("::", 1)[-1],
                    locator=row.locator,
                    member=hint.get("member", ""),
                    offset=int(hint.get("offset", 0)),
                    size=int(hint.get("size", 0)),
                    rejection=row.rejection,
                    detail=row.detail,
                )
            )
        return read_images(path, entries)
    if kind == "parquet_images":
        from components.data.parquet_image_source import read_images as read_parquet_images

        readable = [row for row in rows if row.rejection is None]
        results = read_parquet_images(
            path, [int(row.locator.rsplit("::", 1)[1]) for row in readable], reader_config
        )
        by_locator = dict(zip((row.locator for row in readable), results, strict=True))
        return [by_locator.get(row.locator, (None, row.rejection, row.detail)) for row in rows]
    raise ValueError(f"kind: {kind!r} is not a local source kind")


def _read_folder(config: Any, rows: Sequence[LocalRow]) -> list[ReadResult]:
    from components.data.folder_source import FolderEntry, read_image_bytes

    root = Path(os.path.realpath(config.root))
    results: list[ReadResult] = []
    for row in rows:
        if row.rejection is not None:
            results.append((None, row.rejection, row.detail))
            continue
        entry = FolderEntry(relpath=row.locator, path=root / row.read_hint)
        results.append(read_image_bytes(entry, max_bytes=MAX_IMAGE_BYTES))
    return results
