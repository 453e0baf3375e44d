"""Read WebDataset tar shards as source rows: expand shard paths, list samples, read image bytes.

`expand_shard_paths` turns a `WebDatasetSourceConfig`'s paths (tar files, folders, brace
patterns) into tar paths. `list_shard` (once per shard, on the driver) reads member headers and
the small caption members, never image bytes, and returns one `WebDatasetEntry` per sample in
stored order: key, locator `<tar name>::<key>`, image member name, data offset and size, caption.
`read_images` (later, in a worker) seeks to each offset and returns the bytes as stored (decoding
is the filters' job). A hostile shard never raises: each thing wrong is a refused entry, reason
from WEBDATASET_REASONS. Only configuration raises ValueError (a path that names nothing).

A sample's key is the member path up to the first "." of its basename (`dir/0001.jpg` ->
`dir/0001`, extension `jpg`; `a.b.jpg` -> `a`, `b.jpg`); its members are adjacent. Extensions match
case-insensitively. The image is the first of `image_extensions` present as a regular file; the
caption is the first non-empty text of `caption_extensions`, then the `.json` member's
`caption_json_key`, else None. Directories and basenames starting with "." (macOS `._` files) are
skipped. A damaged tar keeps the samples closed before the damage plus one refused entry with key
"" (the sample open there is dropped: it may lack members). "://" paths go through pyarrow.fs.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from components.data.folder_source import decode_caption_text

WEBDATASET_REASONS: tuple[str, ...] = (
    "no_image",
    "duplicate_key",
    "truncated_tar",
    "not_a_file",
    "unreadable",
    "too_large",
    "empty_file",
    "changed_since_listing",
)
"""Every reason a WebDataset entry is refused; counters should be keyed by these."""
CAPTION_SOURCES: tuple[str, ...] = ("txt", "json", "none")
"""Values of WebDatasetEntry.caption_from: "txt" is a plain-text member of caption_extensions."""
ReadResult = tuple[bytes | None, str | None, str]
"""(bytes, None, "") or (None, reason from WEBDATASET_REASONS, detail)."""

_JSON_EXTENSION = "json"
# A caption is a few hundred bytes; the cap keeps a hostile huge caption member out of memory.
# It also bounds every read tarfile makes while listing (pax and GNU long-name headers).
_MAX_LISTING_READ = 1 << 20
_BLOCK = tarfile.BLOCKSIZE
_MAX_PATTERN_MATCHES = 1_000_000
_EXTENSION = re.compile(r"[a-z0-9_+-]+(?:\.[a-z0-9_+-]+)*")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


@dataclass(frozen=True, kw_only=True, slots=True)
class WebDatasetSourceConfig:
    """Which tar shards make up a WebDataset source and how their samples are read."""

    paths: tuple[str, ...]
    """Tar files, folders (every *.tar inside, recursively) or brace patterns like {000..099}."""
    image_extensions: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    """Image member extensions in order of preference: lower-case, without the leading dot."""
    caption_extensions: tuple[str, ...] = ("txt",)
    """Plain-text caption member extensions in order of preference (may be empty)."""
    caption_json_key: str = "caption"
    """Key of the caption string in a sample's `.json` member (the fallback caption)."""
    max_image_bytes: int = 64 << 20
    """Largest image member listed as readable; a larger one is refused as "too_large"."""

    def __post_init__(self) -> None:
        if not isinstance(self.paths, tuple) or not self.paths:
            raise ValueError(f"paths: must be a non-empty tuple, got {self.paths!r}")
        if not all(isinstance(path, str) and path.strip() for path in self.paths):
            raise ValueError(f"paths: every path must be a non-empty string, got {self.paths!r}")
        for name in ("image_extensions", "caption_extensions"):
            extensions = getattr(self, name)
            if not isinstance(extensions, tuple) or not extensions and name == "image_extensions":
                raise ValueError(f"{name}: must be a tuple (non-empty for images): {extensions!r}")
            if not all(isinstance(ext, str) and _EXTENSION.fullmatch(ext) for ext in extensions):
                raise ValueError(f"{name}: {extensions} must be lower-case, without the dot")
        # A caption extension listed as an image would turn every caption into a row.
        if set(self.image_extensions) & {*self.caption_extensions, _JSON_EXTENSION}:
            raise ValueError(f"image_extensions: {self.image_extensions} holds a caption one")
        if _JSON_EXTENSION in self.caption_extensions:
            raise ValueError("caption_extensions: 'json' is read through caption_json_key")
        if not isinstance(self.caption_json_key, str) or not self.caption_json_key:
            raise ValueError("caption_json_key: must be non-empty")
        if type(self.max_image_bytes) is not int or self.max_image_bytes < 1:
            raise ValueError(f"max_image_bytes: must be an int >= 1, got {self.max_image_bytes!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class WebDatasetEntry:
    """One sample of a shard, or one hostile thing found there (rejection set)."""

    key: str
    """The sample's key (member path up to the first dot of its basename); "" for the shard."""
    locator: str
    """`<tar file name>::<key>`: the row's identity within the shard."""
    member: str = ""
    """Name of the image member; "" when there is none."""
    offset: int = 0
    """Byte offset of the image member's data in the tar."""
    size: int = 0
    """Size in bytes of the image member's data."""
    caption: str | None = None
    """Stripped, non-empty caption, or None."""
    caption_from: str = "none"
    """One of CAPTION_SOURCES."""
    rejection: str | None = None
    """A reason from WEBDATASET_REASONS; None when the image may be read."""
    detail: str = ""
    """What was seen: why it was refused, or what was wrong with a caption member."""

    def __post_init__(self) -> None:
        if self.rejection is not None and self.rejection not in WEBDATASET_REASONS:
            raise ValueError(f"rejection: {self.rejection!r} is not in WEBDATASET_REASONS")
        if self.rejection is None and (not self.member or self.offset < _BLOCK or self.size < 1):
            raise ValueError("member: a readable entry needs a member, an offset and a size")
        if self.caption_from not in CAPTION_SOURCES:
            raise ValueError(f"caption_from: {self.caption_from!r} is not in CAPTION_SOURCES")
        if (self.caption is None) != (self.caption_from == "none"):
            raise ValueError("caption: must be None exactly when caption_from is 'none'")


def expand_shard_paths(paths: Sequence[str]) -> list[str]:
    """Tar paths named by `paths` (files, folders, brace patterns), de-duplicated, in order.

    A local file or pattern naming nothing that exists, or a folder holding no *.tar, is a
    ValueError naming it. Paths with "://" are brace-expanded, not checked (listing reports a
    missing one as "unreadable").
    """
    shards: dict[str, None] = {}
    for item in paths:
        for shard in _expand_item(item):
            shards.setdefault(shard, None)
    return list(shards)


def _expand_item(item: str) -> list[str]:
    if "://" in item:
        return _expand_braces(item, item=item)
    # A name that exists is taken literally, so a file with braces in its name stays usable.
    candidates = [item] if os.path.exists(item) else _expand_braces(item, item=item)
    found: list[str] = []
    for candidate in candidates:
        if os.path.isdir(candidate):
            found += _tars_under(candidate)
        elif os.path.isfile(candidate):
            found.append(os.path.normpath(candidate))
    if not found:
        what = "does not exist" if candidates == [item] else "matches no existing file"
        raise ValueError(f"paths: {item!r} {what}")
    return found


def _tars_under(folder: str) -> list[str]:
    found = []
    for parent, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in names:
            path = os.path.normpath(os.path.join(parent, name))
            if not name.startswith(".") and name.lower().endswith(".tar") and os.path.isfile(path):
                found.append(path)
    if not found:
        raise ValueError(f"paths: folder {folder!r} holds no .tar file")
    return sorted(found)


def _expand_braces(text: str, *, item: str) -> list[str]:
    match = _BRACE.search(text)
    if match is None:
        return [text]
    body, ranged = match.group(1), _RANGE.fullmatch(match.group(1))
    if ranged is not None:
        low, high = int(ranged.group(1)), int(ranged.group(2))
        if low > high or high - low >= _MAX_PATTERN_MATCHES:
            raise ValueError(f"paths: {item!r}: range {{{body}}} is backwards or too long")
        options = [str(number).zfill(len(ranged.group(1))) for number in range(low, high + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(f"paths: {item!r}: {{{body}}} is neither a range a..b nor a list a,b")
    rests = _expand_braces(text[match.end() :], item=item)
    if len(options) * len(rests) > _MAX_PATTERN_MATCHES:
        raise ValueError(f"paths: {item!r} expands to more than {_MAX_PATTERN_MATCHES} names")
    return [text[: match.start()] + option + rest for option in options for rest in rests]


def list_shard(path: str, config: WebDatasetSourceConfig) -> list[WebDatasetEntry]:
    """Every sample of the tar at `path` in stored order, hostile ones refused; never raises."""
    shard_name = posixpath.basename(path.rstrip("/"))
    try:
        file = _open_shard(path)
    except (OSError, ValueError) as error:
        detail = f"cannot open {path}: {_describe(error)}"
        return [_shard_entry(shard_name, reason="unreadable", detail=detail)]
    with file:
        return list_shard_file(file, shard_name=shard_name, config=config)


def list_shard_file(
    file: BinaryIO, *, shard_name: str, config: WebDatasetSourceConfig
) -> list[WebDatasetEntry]:
    """list_shard on an open, seekable binary file; reads headers and caption members only."""
    try:
        file_size = file.seek(0, os.SEEK_END)
        file.seek(0)
    except (OSError, ValueError) as error:
        return [_shard_entry(shard_name, reason="unreadable", detail=_describe(error))]
    scan = _ShardScan(_ListingReader(file, size=file_size), shard_name=shard_name, config=config)
    position, damage, reason = 0, "", "truncated_tar"
    try:
        # backslashreplace: a name that is not UTF-8 still gives a UTF-8 key (bytes escaped).
        tar = tarfile.TarFile(fileobj=scan.reader, encoding="utf-8", errors="backslashreplace")
        while not damage:
            position = tar.offset
            info = tar.next()
            if info is None:
                damage = _end_of_archive(scan.reader, offset=tar.offset)
                break
            damage = _header_damage(info, next_offset=tar.offset, file_size=file_size)
            if not info.isdir():
                scan.add(info, damaged=bool(damage))
    except (tarfile.TarError, EOFError, ValueError, OverflowError) as error:
        damage = f"at byte {position} of {file_size}: {_describe(error)}"
    except OSError as error:
        damage, reason = f"read failed at byte {position}: {_describe(error)}", "unreadable"
    if not damage:
        scan.close_sample()
        return scan.entries
    if scan.key is not None:
        damage += f"; sample {scan.key!r} being read there is dropped"
    return [*scan.entries, _shard_entry(shard_name, reason=reason, detail=damage)]


class _ListingReader:
    """The shard as tarfile sees it while listing: no read past the end or above the cap."""

    def __init__(self, file: BinaryIO, *, size: int) -> None:
        self.file, self.size, self.seek, self.tell = file, size, file.seek, file.tell

    def read(self, count: int = -1) -> bytes:
        if not 0 <= count <= _MAX_LISTING_READ:
            raise tarfile.ReadError(f"a {count}-byte header read at byte {self.tell()}")
        return self.file.read(min(count, max(self.size - self.tell(), 0)))


class _ShardScan:
    """Members in stored order grouped into samples; finished samples become entries."""

    def __init__(
        self, reader: _ListingReader, *, shard_name: str, config: WebDatasetSourceConfig
    ) -> None:
        self.reader, self.shard_name, self.config = reader, shard_name, config
        self.entries: list[WebDatasetEntry] = []
        self.seen: set[str] = set()
        # The sample being read: its key, first member per extension, caption member bytes.
        self.key: str | None = None
        self.duplicate = False
        self.members: dict[str, tarfile.TarInfo] = {}
        self.texts: dict[str, bytes] = {}
        self.notes: list[str] = []

    def add(self, info: tarfile.TarInfo, *, damaged: bool) -> None:
        """Group a member into its sample; a damaged one only closes the sample before it."""
        base = info.name.rpartition("/")[2]
        if not base or base.startswith("."):
            return
        stem, _, extension = base.partition(".")
        key, extension = info.name[: len(info.name) - len(base)] + stem, extension.lower()
        if key != self.key:
            self.close_sample()
            self.key, self.duplicate = key, key in self.seen
            self.seen.add(key)
        if damaged:
            return
        if extension in self.members:
            self.notes.append(f"repeated member {info.name!r} ignored")
            return
        self.members[extension] = info
        is_text = extension in self.config.caption_extensions or extension == _JSON_EXTENSION
        # A sparse member's stored data is not its content.
        if not is_text or not info.isreg() or info.issparse() or self.duplicate:
            return
        if info.size > _MAX_LISTING_READ:
            self.notes.append(f"caption member {info.name!r} too_large: {info.size} bytes")
            return
        self.reader.seek(info.offset_data)
        self.texts[extension] = self.reader.read(info.size)

    def close_sample(self) -> None:
        if self.key is not None:
            self.entries.append(_sample_entry(self))
        self.key, self.members, self.texts, self.notes = None, {}, {}, []


def _header_damage(info: tarfile.TarInfo, *, next_offset: int, file_size: int) -> str:
    """Why this member's header cannot be trusted, or "" when it can."""
    where = f"member {info.name!r} at byte {info.offset}"
    if info.size < 0 or next_offset <= info.offset:
        return f"{where} has an invalid size {info.size}"
    # next_offset is where tarfile looks for the next header: past the data and its padding.
    if next_offset > file_size:
        return f"{where}: data and padding run to byte {next_offset}, the file has {file_size}"
    return ""


def _end_of_archive(reader: _ListingReader, *, offset: int) -> str:
    """Empty when a zero block ends the archive at `offset`, else what is there instead."""
    reader.seek(offset)
    block = reader.read(_BLOCK)
    if block == bytes(_BLOCK):
        return ""
    if not block:
        return f"the file ends at byte {offset} without the end-of-archive blocks"
    return f"at byte {offset}: an invalid or partial header ({len(block)} bytes)"


def _sample_entry(sample: _ShardScan) -> WebDatasetEntry:
    """The entry of the sample whose members have all been seen."""
    key, config = sample.key or "", sample.config
    locator = f"{sample.shard_name}::{key}"
    if sample.duplicate:
        detail = f"key {key!r} appeared earlier in the shard (a sample's members are adjacent)"
        return WebDatasetEntry(key=key, locator=locator, rejection="duplicate_key", detail=detail)
    caption, caption_from, note = _find_caption(sample)
    images = [sample.members[ext] for ext in config.image_extensions if ext in sample.members]
    image = next((image for image in images if image.isreg() and not image.issparse()), None)
    rejection, problem = None, ""
    if image is None and images:
        image, rejection = images[0], "not_a_file"
        problem = f"image member {image.name!r} is not a regular file"
    elif image is None:
        rejection = "no_image"
        problem = f"no image member among extensions {list(sample.members)}"
    elif image.size == 0:
        rejection, problem = "empty_file", f"{image.name!r} has 0 bytes"
    elif image.size > config.max_image_bytes:
        rejection = "too_large"
        problem = f"{image.name!r}: {image.size} bytes > {config.max_image_bytes}"
    return WebDatasetEntry(
        key=key,
        locator=locator,
        member="" if image is None else image.name,
        offset=0 if image is None else image.offset_data,
        size=0 if image is None else image.size,
        caption=caption,
        caption_from=caption_from,
        rejection=rejection,
        detail="; ".join(text for text in (problem, *sample.notes, note) if text),
    )


def _find_caption(sample: _ShardScan) -> tuple[str | None, str, str]:
    """(caption, caption_from, detail) from the first member with a non-empty caption."""
    config = sample.config
    notes: list[str] = []
    for extension in config.caption_extensions:
        text = decode_caption_text(sample.texts.get(extension, b"")).strip()
        if text:
            return text, "txt", "; ".join(notes)
        if extension in sample.texts:
            notes.append(f"empty caption member .{extension}")
    if _JSON_EXTENSION in sample.texts:
        try:
            document = json.loads(decode_caption_text(sample.texts[_JSON_EXTENSION]))
        except (ValueError, RecursionError) as error:
            document = None
            notes.append(f"invalid JSON in .json member: {str(error)[:200]}")
        value = document.get(config.caption_json_key) if isinstance(document, dict) else None
        if isinstance(value, str) and value.strip():
            return value.strip(), "json", "; ".join(notes)
        if document is not None:
            notes.append(f".json member has no non-empty string {config.caption_json_key!r}")
    return None, "none", "; ".join(notes)


def read_images(path: str, entries: Sequence[WebDatasetEntry]) -> list[ReadResult]:
    """Per entry, in order: (bytes, None, "") or (None, reason, detail); one open of the shard.

    `entries` must come from list_shard of this shard (a locator naming another shard is a
    ValueError). A refused entry returns its own rejection. The member's own header block is
    checked before its bytes are returned, so a shard replaced since listing is
    "changed_since_listing" rather than wrong bytes; one that got shorter is "truncated_tar".
    """
    shard_name = posixpath.basename(path.rstrip("/"))
    for entry in entries:
        if not entry.locator.startswith(f"{shard_name}::"):
            raise ValueError(f"entries: {entry.locator!r} is not an entry of {shard_name}")
    results: list[ReadResult] = []
    try:
        with _open_shard(path) as file:
            for entry in entries:
                results.append(_read_entry(file, entry=entry))
    except (OSError, ValueError) as error:
        failure = (None, "unreadable", f"cannot read {path}: {_describe(error)}")
        rest = entries[len(results) :]
        results += [(None, e.rejection, e.detail) if e.rejection else failure for e in rest]
    return results


def _read_entry(file: BinaryIO, *, entry: WebDatasetEntry) -> ReadResult:
    if entry.rejection is not None:
        return None, entry.rejection, entry.detail
    file.seek(entry.offset - _BLOCK)
    header, data = file.read(_BLOCK), file.read(entry.size)
    if len(data) < entry.size:
        end = entry.offset + entry.size
        return None, "truncated_tar", f"{entry.member!r} ends at byte {end}, past the shard's end"
    try:
        info: tarfile.TarInfo | None = tarfile.TarInfo.frombuf(header, "utf-8", "backslashreplace")
    except tarfile.HeaderError:
        info = None
    if info is None or not info.isreg() or info.size != entry.size:
        detail = f"the header before byte {entry.offset} is no longer that of {entry.member!r}"
        return None, "changed_since_listing", detail
    return data, None, ""


def _open_shard(path: str) -> BinaryIO:
    """The shard opened for binary reads; raises OSError or ValueError when it cannot be."""
    if "://" in path:
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        return filesystem.open_input_file(inner)
    # O_NONBLOCK keeps a FIFO named like a shard from blocking the open; fstat then refuses it.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(f"{path} is not a regular file")
        return open(descriptor, "rb", buffering=0)
    except BaseException:
        os.close(descriptor)
        raise


def _shard_entry(shard_name: str, *, reason: str, detail: str) -> WebDatasetEntry:
    return WebDatasetEntry(key="", locator=f"{shard_name}::", rejection=reason, detail=detail)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]
