"""Read Parquet files whose rows hold image bytes and a caption as source rows, in two phases.

Input: a `ParquetImageSourceConfig` naming files or folders (`expand_parquet_paths` turns them
into a sorted list of files) and the two columns. The image column is Hugging Face `datasets`'
struct<bytes: binary, path: string> or a plain binary, large_binary or binary_view column; the
caption column is a string column.

1. Listing, once on the driver: `list_parquet_file` reads the footer and only the caption
   column, row group by row group, never the image column's data. It returns one
   `ParquetImageEntry` per row (locator f"{file_name}::{row_index}", file_name being the last
   part of the path: the row's identity within its file's list), or for a file that cannot be
   used at all ONE refused entry with locator f"{file_name}::file":
   "unreadable_file" (not Parquet: corrupt, truncated, 0 bytes), "no_image_column" (missing or
   of an unsupported type), "no_caption_column" (missing or not strings; not checked when
   `caption_column` is ""). A row group whose captions cannot be read refuses its own rows as
   "unreadable_file" and leaves the other row groups listed.
2. Reading, later in a worker task: `read_images` returns, per requested row and in order,
   (bytes, None, "") or (None, reason, detail). It reads only the row groups that hold those
   rows and only the image column. Bytes are returned exactly as stored (decoding is the
   filters' job). A struct whose bytes are null but whose path is set is refused: the image
   was stored by path only, and paths are not followed.

Every refusal carries a reason from PARQUET_IMAGE_REASONS. Nothing here raises on a bad file;
only configuration raises ValueError (bad config fields, a path item that does not exist, a
folder without Parquet files). A path containing "://" is opened through
`pyarrow.fs.FileSystem.from_uri`; any other path is local.
"""

from __future__ import annotations

import bisect
import os
import posixpath
import stat
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

PARQUET_IMAGE_REASONS: tuple[str, ...] = (
    "unreadable_file",
    "no_image_column",
    "no_caption_column",
    "no_image_bytes",
    "empty_file",
    "too_large",
    "row_out_of_range",
)
"""Every reason a Parquet row or file is refused; counters should be keyed by these."""
PARQUET_CAPTION_SOURCES: tuple[str, ...] = ("column", "none")
"""Values of ParquetImageEntry.caption_from ("none": no caption)."""
DEFAULT_MAX_IMAGE_BYTES = 64 << 20
PARQUET_SUFFIX = ".parquet"
FILE_LOCATOR_SUFFIX = "::file"
"""Locator suffix of the one refused entry standing for a whole file."""

_READ_ERRORS = (OSError, ValueError, pa.ArrowException)
_MAX_NAMES_IN_DETAIL = 20
_IMAGE_TYPES_WANTED = "binary, large_binary, binary_view or struct<bytes: binary, ...>"


@dataclass(frozen=True, kw_only=True, slots=True)
class ParquetImageSourceConfig:
    """Which Parquet files hold the images and captions, and what their columns are called."""

    paths: tuple[str, ...]
    """Parquet files or folders of them (see expand_parquet_paths); local paths or URIs."""
    image_column: str = "image"
    """Column of image bytes: binary, large_binary, or Hugging Face's struct {bytes, path}."""
    caption_column: str = "text"
    """Column of caption strings; "" means captions are not expected and every row gets None."""
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    """Stored images larger than this many bytes are refused as "too_large" when read."""

    def __post_init__(self) -> None:
        if not isinstance(self.paths, tuple) or not self.paths:
            raise ValueError(f"paths: must be a non-empty tuple of paths, got {self.paths!r}")
        for item in self.paths:
            if not isinstance(item, str) or not item.strip():
                raise ValueError(f"paths: every item must be a non-empty string, got {item!r}")
        if not isinstance(self.image_column, str) or not self.image_column.strip():
            raise ValueError(f"image_column: must name a column, got {self.image_column!r}")
        if not isinstance(self.caption_column, str) or (
            self.caption_column and not self.caption_column.strip()
        ):
            raise ValueError(
                f'caption_column: must name a column or be "", got {self.caption_column!r}'
            )
        if self.caption_column == self.image_column:
            raise ValueError(f"caption_column: must differ from image_column {self.image_column!r}")
        if (
            isinstance(self.max_image_bytes, bool)
            or not isinstance(self.max_image_bytes, int)
            or self.max_image_bytes < 1
        ):
            raise ValueError(f"max_image_bytes: must be an int >= 1, got {self.max_image_bytes!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ParquetImageEntry:
    """One row of a Parquet image file, or one refused whole file (row_index None)."""

    path: str
    """The file as given to list_parquet_file; read_images takes it back."""
    locator: str
    """f"{file_name}::{row_index}", or f"{file_name}::file" for a refused file (file_name: the
    path's last part), the row's identity within its file."""
    row_index: int | None
    """Row number within the file (over all row groups); None for a refused file."""
    caption: str | None = None
    """Stripped, non-empty caption, or None."""
    caption_from: str = "none"
    """One of PARQUET_CAPTION_SOURCES."""
    rejection: str | None = None
    """A reason from PARQUET_IMAGE_REASONS; None when the row may be read."""
    detail: str = ""
    """What was seen: why it was refused, or what was wrong with the caption ("" if nothing)."""

    def __post_init__(self) -> None:
        if self.rejection is not None and self.rejection not in PARQUET_IMAGE_REASONS:
            raise ValueError(f"rejection: {self.rejection!r} is not in PARQUET_IMAGE_REASONS")
        if self.row_index is None and self.rejection is None:
            raise ValueError("row_index: may be None only for a refused file")
        if self.row_index is not None and self.row_index < 0:
            raise ValueError(f"row_index: must be >= 0, got {self.row_index}")
        if self.caption_from not in PARQUET_CAPTION_SOURCES:
            raise ValueError(
                f"caption_from: {self.caption_from!r} is not in PARQUET_CAPTION_SOURCES"
            )
        if (self.caption is None) != (self.caption_from == "none"):
            raise ValueError("caption: must be None exactly when caption_from is 'none'")


def expand_parquet_paths(paths: Sequence[str]) -> list[str]:
    """Parquet files named by `paths`, de-duplicated in order.

    An item that is a file is taken as it is, whatever its suffix. A folder gives every
    `*.parquet` inside it, recursively and sorted by relative path; names starting with "." or
    "_" are skipped, files and folders alike (`_delta_log`, `_SUCCESS`, `.cache`). Local items
    come back as absolute paths, URIs as URIs. A missing item, or a folder holding no Parquet
    file, is a ValueError naming it.
    """
    if isinstance(paths, str) or not paths:
        raise ValueError(f"paths: must be a non-empty sequence of paths, got {paths!r}")
    expanded: list[str] = []
    seen: set[str] = set()
    for item in paths:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"paths: every item must be a non-empty string, got {item!r}")
        for path in _expand_uri(item) if "://" in item else _expand_local(item):
            if path not in seen:
                seen.add(path)
                expanded.append(path)
    return expanded


def _expand_local(item: str) -> list[str]:
    if not os.path.isdir(item):
        if not os.path.exists(item):
            raise ValueError(f"paths: {item!r} does not exist")
        return [os.path.abspath(item)]
    found: list[str] = []
    for folder, subfolders, files in os.walk(os.path.abspath(item), onerror=_refuse_walk):
        subfolders[:] = [name for name in subfolders if _is_listed_name(name)]
        found += [os.path.join(folder, name) for name in files if _is_parquet_name(name)]
    if not found:
        raise ValueError(f"paths: folder {item!r} holds no {PARQUET_SUFFIX} file")
    return sorted(found)


def _refuse_walk(error: OSError) -> None:
    raise ValueError(f"paths: cannot list {error.filename!r}: {_describe(error)}")


def _expand_uri(item: str) -> list[str]:
    location, mark, query = item.partition("?")
    try:
        filesystem, inner = pafs.FileSystem.from_uri(item)
        info = filesystem.get_file_info(inner)
        if info.type == pafs.FileType.File:
            return [item]
        if info.type != pafs.FileType.Directory:
            raise ValueError(f"paths: {item!r} does not exist")
        base = inner.rstrip("/")
        listed = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    except (OSError, pa.ArrowException) as error:
        raise ValueError(f"paths: cannot list {item!r}: {_describe(error)}") from None
    found: list[str] = []
    for child in listed:
        relative = child.path[len(base) :].lstrip("/")
        *folders, name = relative.split("/")
        if (
            child.type == pafs.FileType.File
            and all(_is_listed_name(folder) for folder in folders)
            and _is_parquet_name(name)
        ):
            found.append(relative)
    if not found:
        raise ValueError(f"paths: folder {item!r} holds no {PARQUET_SUFFIX} file")
    return [f"{location.rstrip('/')}/{relative}{mark}{query}" for relative in sorted(found)]


def _is_listed_name(name: str) -> bool:
    return not name.startswith((".", "_"))


def _is_parquet_name(name: str) -> bool:
    return _is_listed_name(name) and name.lower().endswith(PARQUET_SUFFIX)


def list_parquet_file(path: str, config: ParquetImageSourceConfig) -> list[ParquetImageEntry]:
    """One entry per row of `path` in row order, or one refused entry for an unusable file.

    Reads the footer and the caption column only; the image column's pages are never read.
    """
    try:
        with _open_input(path) as source:
            parquet = pq.ParquetFile(source, pre_buffer=False)
            schema = parquet.schema_arrow
            problem = _schema_problem(schema, config=config, captions=True)
            if problem is not None:
                return [_file_refused(path, reason=problem[0], detail=problem[1])]
            return _list_rows(path, parquet=parquet, config=config)
    except _READ_ERRORS as error:
        return [_file_refused(path, reason="unreadable_file", detail=_describe(error))]


def _list_rows(
    path: str, *, parquet: pq.ParquetFile, config: ParquetImageSourceConfig
) -> list[ParquetImageEntry]:
    entries: list[ParquetImageEntry] = []
    row = 0
    for group in range(parquet.metadata.num_row_groups):
        group_rows = parquet.metadata.row_group(group).num_rows
        captions, problem = _read_captions(
            parquet, group=group, group_rows=group_rows, config=config
        )
        for offset in range(group_rows):
            caption, note = (
                (None, problem) if problem else _clean_caption(captions[offset], config=config)
            )
            entries.append(
                ParquetImageEntry(
                    path=path,
                    locator=f"{_file_name(path)}::{row}",
                    row_index=row,
                    caption=caption,
                    caption_from="none" if caption is None else "column",
                    rejection="unreadable_file" if problem else None,
                    detail=note,
                )
            )
            row += 1
    return entries


def _read_captions(
    parquet: pq.ParquetFile, *, group: int, group_rows: int, config: ParquetImageSourceConfig
) -> tuple[list[object], str]:
    """(one raw caption per row of the row group, "") or ([], what went wrong)."""
    if not config.caption_column:
        return [None] * group_rows, ""
    try:
        table = parquet.read_row_group(group, columns=[config.caption_column], use_threads=False)
    except _READ_ERRORS as error:
        return [], f"row group {group}: captions unreadable: {_describe(error)}"
    if table.num_columns != 1 or table.num_rows != group_rows:
        return [], f"row group {group}: caption column has {table.num_rows} of {group_rows} rows"
    return table.column(0).to_pylist(), ""


def _clean_caption(raw: object, *, config: ParquetImageSourceConfig) -> tuple[str | None, str]:
    """(stripped caption or None, note on why there is none)."""
    if not config.caption_column:
        return None, ""
    if not isinstance(raw, str):
        return None, "caption is null"
    text = raw.strip()
    if not text:
        return None, "caption is blank"
    return text, ""


def read_images(
    path: str, row_indices: Sequence[int], config: ParquetImageSourceConfig
) -> list[tuple[bytes | None, str | None, str]]:
    """(bytes, None, "") or (None, reason, detail) for each of `row_indices`, in their order.

    Only the row groups holding the requested rows are read, and only the image column. A file
    that went bad since listing refuses every row as "unreadable_file"; rows past a file that
    shrank are "row_out_of_range".
    """
    try:
        with _open_input(path) as source:
            parquet = pq.ParquetFile(source, pre_buffer=False)
            problem = _schema_problem(parquet.schema_arrow, config=config, captions=False)
            if problem is not None:
                reason, detail = problem
                return [(None, reason, f"since listing: {detail}")] * len(row_indices)
            return _read_rows(parquet, row_indices=row_indices, config=config)
    except _READ_ERRORS as error:
        return [(None, "unreadable_file", _describe(error))] * len(row_indices)


def _read_rows(
    parquet: pq.ParquetFile, *, row_indices: Sequence[int], config: ParquetImageSourceConfig
) -> list[tuple[bytes | None, str | None, str]]:
    metadata = parquet.metadata
    starts = [0]
    for group in range(metadata.num_row_groups):
        starts.append(starts[-1] + metadata.row_group(group).num_rows)
    total = starts[-1]
    results: list[tuple[bytes | None, str | None, str]] = [(None, "unreadable_file", "")] * len(
        row_indices
    )
    wanted: dict[int, list[tuple[int, int]]] = {}
    for position, row in enumerate(row_indices):
        if not 0 <= row < total:
            results[position] = (None, "row_out_of_range", f"row {row}; the file has {total} rows")
            continue
        # bisect_right skips empty row groups: they share their start with the next group.
        group = bisect.bisect_right(starts, row) - 1
        wanted.setdefault(group, []).append((position, row - starts[group]))
    for group in sorted(wanted):
        for position, result in _read_row_group_images(
            parquet, group=group, requests=wanted[group], config=config
        ):
            results[position] = result
    return results


def _read_row_group_images(
    parquet: pq.ParquetFile,
    *,
    group: int,
    requests: list[tuple[int, int]],
    config: ParquetImageSourceConfig,
) -> list[tuple[int, tuple[bytes | None, str | None, str]]]:
    """(position, result) for each (position, row offset within the row group) request."""
    group_rows = parquet.metadata.row_group(group).num_rows
    try:
        table = parquet.read_row_group(group, columns=[config.image_column], use_threads=False)
    except _READ_ERRORS as error:
        table, problem = None, _describe(error)
    else:
        problem = ""
        if table.num_columns != 1 or table.num_rows != group_rows:
            problem = f"image column has {table.num_rows} of {group_rows} rows"
    if table is None or problem:
        refusal = (None, "unreadable_file", f"row group {group}: {problem}")
        return [(position, refusal) for position, _ in requests]
    column = table.column(0)
    return [
        (position, _image_value(column[offset], max_bytes=config.max_image_bytes))
        for position, offset in requests
    ]


def _image_value(value: pa.Scalar, *, max_bytes: int) -> tuple[bytes | None, str | None, str]:
    stored_path = None
    if isinstance(value, pa.StructScalar):
        if not value.is_valid:
            return None, "no_image_bytes", "the image is null"
        if value.type.get_field_index("path") >= 0:
            stored_path = value["path"].as_py()
        value = value["bytes"]
    if not value.is_valid:
        if isinstance(stored_path, str) and stored_path:
            return (
                None,
                "no_image_bytes",
                f"the image was stored by path only ({stored_path[:200]!r}); paths are not "
                "followed",
            )
        return None, "no_image_bytes", "the image bytes are null"
    buffer = value.as_buffer()
    if buffer.size == 0:
        return None, "empty_file", "the image bytes have length 0"
    if buffer.size > max_bytes:
        return None, "too_large", f"{buffer.size} bytes > {max_bytes}"
    return buffer.to_pybytes(), None, ""


def _schema_problem(
    schema: pa.Schema, *, config: ParquetImageSourceConfig, captions: bool
) -> tuple[str, str] | None:
    """(reason, detail) for the first unusable column (the caption one only when `captions`)."""
    checks = [
        (config.image_column, "no_image_column", _is_image_type, _IMAGE_TYPES_WANTED),
    ]
    if captions and config.caption_column:
        checks.append((config.caption_column, "no_caption_column", _is_caption_type, "a string"))
    for name, reason, accepts, wanted in checks:
        indices = schema.get_all_field_indices(name)
        if len(indices) != 1:
            found = f"{len(indices)} columns {name!r}" if indices else f"no column {name!r}"
            return reason, f"{found}; columns: {schema.names[:_MAX_NAMES_IN_DETAIL]}"[:300]
        data_type = schema.field(indices[0]).type
        if not accepts(data_type):
            return reason, f"column {name!r} has type {str(data_type)[:200]}, not {wanted}"
    return None


def _is_image_type(data_type: pa.DataType) -> bool:
    if pa.types.is_struct(data_type):
        index = data_type.get_field_index("bytes")
        data_type = data_type.field(index).type if index >= 0 else pa.null()
    return data_type in (pa.binary(), pa.large_binary(), pa.binary_view())


def _is_caption_type(data_type: pa.DataType) -> bool:
    if pa.types.is_dictionary(data_type):
        data_type = data_type.value_type
    # A caption column with only nulls in it is written with type null by pyarrow's inference.
    return data_type in (pa.string(), pa.large_string(), pa.string_view(), pa.null())


def _open_input(path: str) -> pa.NativeFile:
    """A random-access reader on `path` (a URI when it contains "://")."""
    if "://" in path:
        filesystem, inner = pafs.FileSystem.from_uri(path)
        return filesystem.open_input_file(inner)
    # Opening a FIFO named like a Parquet file would block until a writer came.
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{path!r} is not a regular file")
    return pa.OSFile(path, "rb")


def _file_refused(path: str, *, reason: str, detail: str) -> ParquetImageEntry:
    return ParquetImageEntry(
        path=path,
        locator=f"{_file_name(path)}{FILE_LOCATOR_SUFFIX}",
        row_index=None,
        rejection=reason,
        detail=detail,
    )


def _file_name(path: str) -> str:
    return posixpath.basename(path.rstrip("/"))


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]
