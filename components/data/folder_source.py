"""Read a local folder of images as source rows: list the images, find their captions, read bytes.

Input: a `FolderSourceConfig` naming the folder. `list_folder` returns one `FolderEntry` per image
(sorted by `relpath`, the POSIX path relative to the root and the row's stable identity), plus a
refused entry, reason from FOLDER_REASONS, for each hostile thing found. `read_image_bytes` reads
one entry's bytes exactly as stored (decoding is the filters' job). Nothing here raises on a
hostile folder; only configuration raises ValueError (a root that is missing, not a folder or
cannot be listed; a metadata file that is missing, unreadable or lacks its columns).

Walking rules:
- Names starting with "." (files, folders, symlinks) are skipped silently: editor, VCS and OS
  bookkeeping (.git, .DS_Store, ._AppleDouble), never training data.
- Symlinks are classified, never walked. One whose target leaves the root, loops or dangles is
  refused whatever its name. One to a regular file inside the root is listed under the link's
  relpath and read through the target (exact duplicates are dropped later by sha256). One to a
  folder inside the root is not descended: its target is listed under its own path already, and
  descending would count it twice and let links form loops.
- A folder named like an image is refused as "not_a_file" and still walked as a folder, so the
  images inside it are not lost. FIFOs, sockets and devices named like images are "not_a_file".
- A name that is not valid UTF-8 cannot be a row identity (it could not be written to Parquet):
  it is refused as "undecodable_name" (relpath backslash-escaped) and a folder is not descended.

Captions, first source that yields a non-empty caption: `<stem>.txt`, then `<stem>.json`
(`caption_json_key`), then the metadata file's row, else None with caption_from "none".
Sidecar suffixes match case-insensitively (the sorted-first name wins). An empty, unreadable
or invalid sidecar does not stop the search; what was wrong with it goes into `detail`.
"""

from __future__ import annotations

import codecs
import csv
import errno
import io
import json
import os
import posixpath
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath

import pyarrow as pa
import pyarrow.parquet as pq

FOLDER_REASONS: tuple[str, ...] = (
    "symlink_outside_root",
    "symlink_loop",
    "broken_symlink",
    "not_a_file",
    "undecodable_name",
    "unreadable",
    "empty_file",
    "too_large",
    "changed_since_listing",
)
"""Every reason a folder entry is refused; counters should be keyed by these."""
CAPTION_SOURCES: tuple[str, ...] = ("txt", "json", "metadata", "none")
"""Values of FolderEntry.caption_from: where the caption came from ("none": no caption)."""
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_SUFFIXES: tuple[str, ...] = (".jsonl", ".csv", ".parquet")
METADATA_FILE_NAME_COLUMN = "file_name"
"""Hugging Face ImageFolder's column: the image's path relative to the metadata file's folder."""

_SIDECAR_SUFFIXES = (".txt", ".json")
# A caption is a few hundred bytes; the cap keeps a hostile multi-gigabyte sidecar out of memory.
_MAX_CAPTION_BYTES = 1 << 20
# O_NOFOLLOW refuses a final component that became a symlink after listing; O_NONBLOCK keeps a
# FIFO swapped in from blocking the open (fstat then refuses it as not a regular file).
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True, kw_only=True, slots=True)
class FolderSourceConfig:
    """Where one local folder of images is and how its captions are found."""

    root: str
    """The folder; checked when listed, not here (it may be mounted only on the workers)."""
    image_extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    """File suffixes listed as images: lower-case with the dot, matched case-insensitively."""
    caption_json_key: str = "caption"
    """Key of the caption string in a `<stem>.json` sidecar."""
    metadata_file: str = ""
    """Captions file relative to root (.jsonl, .csv or .parquet, ImageFolder style); "": none."""
    caption_column: str = "caption"
    """The metadata file's caption column (next to its `file_name` column)."""

    def __post_init__(self) -> None:
        if not self.root.strip():
            raise ValueError("root: must name a folder, got an empty string")
        if not isinstance(self.image_extensions, tuple) or not self.image_extensions:
            raise ValueError(
                f"image_extensions: must be a non-empty tuple, got {self.image_extensions!r}"
            )
        for suffix in self.image_extensions:
            # A caption file suffix listed as an image would turn every caption into a row.
            if (
                not isinstance(suffix, str)
                or PurePath("x" + suffix).suffix != suffix.lower()
                or suffix in _SIDECAR_SUFFIXES + METADATA_SUFFIXES
            ):
                raise ValueError(f"image_extensions: {suffix!r} is not a lower-case image suffix")
        if not self.caption_json_key:
            raise ValueError("caption_json_key: must be non-empty")
        if not self.caption_column or self.caption_column == METADATA_FILE_NAME_COLUMN:
            raise ValueError(
                f"caption_column: must be non-empty and not {METADATA_FILE_NAME_COLUMN!r}, "
                f"got {self.caption_column!r}"
            )
        metadata = PurePath(self.metadata_file)
        if self.metadata_file and (
            metadata.is_absolute()
            or ".." in metadata.parts
            or metadata.suffix.lower() not in METADATA_SUFFIXES
        ):
            raise ValueError(
                f"metadata_file: must be a path inside root without '..' ending in one of "
                f"{METADATA_SUFFIXES}, got {self.metadata_file!r}"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class FolderEntry:
    """One image of a folder source, or one hostile thing found there (rejection set)."""

    relpath: str
    """POSIX path relative to the root: the row's stable identity."""
    path: Path | None
    """Absolute real path the bytes are read from; None when refused."""
    caption: str | None = None
    """Stripped, non-empty caption, or None."""
    caption_from: str = "none"
    """One of CAPTION_SOURCES."""
    rejection: str | None = None
    """A reason from FOLDER_REASONS; None when the entry may be read."""
    detail: str = ""
    """What was seen: why it was refused, or what was wrong with a caption file ("" if nothing)."""

    def __post_init__(self) -> None:
        if self.rejection is not None and self.rejection not in FOLDER_REASONS:
            raise ValueError(f"rejection: {self.rejection!r} is not in FOLDER_REASONS")
        if (self.path is None) != (self.rejection is not None):
            raise ValueError("path: must be None exactly when rejection is set")
        if self.caption_from not in CAPTION_SOURCES:
            raise ValueError(f"caption_from: {self.caption_from!r} is not in CAPTION_SOURCES")
        if (self.caption is None) != (self.caption_from == "none"):
            raise ValueError("caption: must be None exactly when caption_from is 'none'")


def list_folder(config: FolderSourceConfig) -> list[FolderEntry]:
    """Every image under config.root and every hostile thing found there, sorted by relpath."""
    root = _real_root(config.root)
    captions = metadata_captions(config)
    entries: list[FolderEntry] = []
    pending = [root]  # real folders still to list; the final sort makes the order irrelevant
    while pending:
        folder = pending.pop()
        prefix = "" if folder == root else folder.relative_to(root).as_posix() + "/"
        try:
            with os.scandir(folder) as listing:
                children = sorted(listing, key=lambda child: child.name)
        except OSError as error:
            if folder == root:
                raise ValueError(f"root: cannot list {root}: {_describe(error)}") from None
            entries.append(_refused(prefix.rstrip("/"), "unreadable", _describe(error)))
            continue
        entries += _scan_folder(children, prefix, root, config, captions, pending)
    entries.sort(key=lambda entry: entry.relpath)
    return entries


def _scan_folder(
    children: list[os.DirEntry[str]],
    prefix: str,
    root: Path,
    config: FolderSourceConfig,
    captions: Mapping[str, str],
    pending: list[Path],
) -> list[FolderEntry]:
    """Entries for one folder's children (sorted by name); subfolders to walk go onto pending."""
    entries: list[FolderEntry] = []
    images: list[tuple[str, str, Path]] = []
    sidecars: dict[tuple[str, str], Path] = {}
    for child in children:
        if child.name.startswith("."):
            continue
        relpath = prefix + child.name
        # os.fsdecode keeps undecodable bytes as lone surrogates; escaping changes only those.
        escaped = os.fsencode(relpath).decode("utf-8", "backslashreplace")
        if escaped != relpath:
            entries.append(_refused(escaped, "undecodable_name", "name is not valid UTF-8"))
            continue
        kind, path, detail = _classify(child, root)
        stem, suffix = PurePath(child.name).stem, PurePath(child.name).suffix.lower()
        is_image = suffix in config.image_extensions
        if kind in FOLDER_REASONS:
            entries.append(_refused(relpath, kind, detail))
        elif kind == "file" and is_image:
            images.append((relpath, stem, path))
        elif kind == "file" and suffix in _SIDECAR_SUFFIXES:
            sidecars.setdefault((stem, suffix), path)
        elif kind != "file" and is_image:
            entries.append(_refused(relpath, "not_a_file", detail))
        if kind == "folder":
            pending.append(path)
    for relpath, stem, path in images:
        text, source, note = _find_caption(stem, sidecars, captions.get(relpath), config)
        entries.append(
            FolderEntry(relpath=relpath, path=path, caption=text, caption_from=source, detail=note)
        )
    return entries


def _classify(child: os.DirEntry[str], root: Path) -> tuple[str, Path, str]:
    """(kind, real path, detail): kind is "file", "folder", "linked_folder", "other" or a reason."""
    path = Path(child.path)
    try:
        if child.is_symlink():
            return _classify_symlink(path, root)
        if child.is_dir(follow_symlinks=False):
            return "folder", path, "a folder named like an image; the files in it are listed"
        if child.is_file(follow_symlinks=False):
            return "file", path, ""
    except OSError as error:
        return "unreadable", path, _describe(error)
    return "other", path, "not a regular file (FIFO, socket or device)"


def _classify_symlink(path: Path, root: Path) -> tuple[str, Path, str]:
    link = _link_text(path)
    # Non-strict: resolves as far as it can, so a dangling or looping link still has a target.
    target = Path(os.path.realpath(path))
    try:
        mode, failure = os.stat(path).st_mode, None
    except OSError as error:
        mode, failure = 0, error
    if failure is not None and failure.errno == errno.ELOOP:
        return "symlink_loop", path, f"symlink loop through {link!r}"
    if not target.is_relative_to(root):
        return "symlink_outside_root", path, f"points to {link!r}, outside the root"
    if failure is not None:
        missing = failure.errno in (errno.ENOENT, errno.ENOTDIR)
        return ("broken_symlink" if missing else "unreadable"), path, f"{link!r}: {failure}"
    if stat.S_ISDIR(mode):
        return "linked_folder", target, f"a symlink to the folder {link!r} (not followed)"
    if stat.S_ISREG(mode):
        return "file", target, ""
    return "other", target, f"a symlink to {link!r}, not a regular file"


def read_image_bytes(entry: FolderEntry, *, max_bytes: int) -> tuple[bytes | None, str | None, str]:
    """(bytes, None, "") for a readable entry, else (None, reason from FOLDER_REASONS, detail).

    `entry` must come from list_folder: its path is a real path, so a parent that no longer
    resolves to itself means a folder on it was swapped for a symlink since listing. The file
    itself is opened with O_NOFOLLOW, so its own swap cannot race the check; a folder swapped
    between the check and the open can (closing that needs openat per component, not worth it
    for folders we were given to read). A refused entry returns its own rejection.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes: must be >= 1, got {max_bytes}")
    if entry.rejection is not None or entry.path is None:
        return None, entry.rejection or "unreadable", entry.detail
    parent = entry.path.parent
    if os.path.realpath(parent) != str(parent):
        return None, "changed_since_listing", f"{parent} is no longer the folder that was listed"
    return _read_regular_file(entry.path, max_bytes=max_bytes)


def _read_regular_file(path: Path, *, max_bytes: int) -> tuple[bytes | None, str | None, str]:
    try:
        descriptor = os.open(path, _OPEN_FLAGS)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return None, "changed_since_listing", f"{path.name} is now a symlink"
        return None, "unreadable", _describe(error)
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            return None, "not_a_file", f"{path.name} is no longer a regular file"
        if status.st_size > max_bytes:
            return None, "too_large", f"{status.st_size} bytes > {max_bytes}"
        # One byte past the size fstat gave shows a file still being written.
        with open(descriptor, "rb", closefd=False) as file:
            data = file.read(status.st_size + 1)
    except OSError as error:
        return None, "unreadable", _describe(error)
    finally:
        os.close(descriptor)
    if len(data) > status.st_size:
        return None, "changed_since_listing", f"{path.name} grew while being read"
    if not data:
        return None, "empty_file", f"{path.name} has 0 bytes"
    return data, None, ""


def _find_caption(
    stem: str,
    sidecars: Mapping[tuple[str, str], Path],
    metadata_caption: str | None,
    config: FolderSourceConfig,
) -> tuple[str | None, str, str]:
    """(caption, caption_from, detail) from the first source with a non-empty caption."""
    notes: list[str] = []
    for source, suffix in (("txt", ".txt"), ("json", ".json")):
        path = sidecars.get((stem, suffix))
        if path is None:
            continue
        caption, note = _read_sidecar(
            path, json_key=config.caption_json_key if source == "json" else None
        )
        if caption is not None:
            return caption, source, "; ".join(notes)
        notes.append(note)
    if metadata_caption is not None:
        return metadata_caption, "metadata", "; ".join(notes)
    return None, "none", "; ".join(notes)


def _read_sidecar(path: Path, *, json_key: str | None) -> tuple[str | None, str]:
    """(caption, "") or (None, what was wrong); json_key None means plain text."""
    data, reason, detail = _read_regular_file(path, max_bytes=_MAX_CAPTION_BYTES)
    if reason == "empty_file":
        return None, f"empty caption file {path.name}"
    if data is None:
        return None, f"caption file {path.name} {reason}: {detail}"
    text = decode_caption_text(data)
    if json_key is not None:
        try:
            document = json.loads(text)
        except (ValueError, RecursionError) as error:
            return None, f"invalid JSON in {path.name}: {str(error)[:200]}"
        if not isinstance(document, dict) or not isinstance(document.get(json_key), str):
            return None, f"{path.name} has no string {json_key!r} key"
        text = document[json_key]
    text = text.strip()
    if not text:
        return None, f"empty caption file {path.name}"
    return text, ""


def decode_caption_text(data: bytes) -> str:
    """UTF-16 with a BOM (LE or BE), else UTF-8 (BOM optional), else Latin-1 (never fails)."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        # The "utf-16" codec reads the BOM to pick the byte order and drops it.
        return data.decode("utf-16", errors="replace")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def metadata_captions(config: FolderSourceConfig) -> dict[str, str]:
    """{relpath from root: caption} from config.metadata_file ({} when there is none).

    `file_name` is relative to the metadata file's folder (Hugging Face ImageFolder). Rows whose
    name leaves the root, or whose caption is null, not a string or blank, are skipped; for a
    name listed twice the first row wins. Rows naming no listed file are kept here and simply
    match nothing: `unmatched_metadata` names them. The file itself is configuration, so a
    missing or unreadable one, or one without the two columns, raises ValueError naming it.
    """
    if not config.metadata_file:
        return {}
    root = _real_root(config.root)
    path = root / config.metadata_file
    if not path.exists():
        raise ValueError(f"metadata_file: {path} does not exist")
    if not Path(os.path.realpath(path)).is_relative_to(root) or not path.is_file():
        raise ValueError(f"metadata_file: {path} is not a regular file inside the root")
    try:
        rows = _parse_metadata(path, (METADATA_FILE_NAME_COLUMN, config.caption_column))
    except (OSError, ValueError, csv.Error, pa.ArrowException, RecursionError) as error:
        raise ValueError(f"metadata_file: cannot read {path}: {_describe(error)}") from None
    folder = posixpath.dirname(PurePath(config.metadata_file).as_posix())
    captions: dict[str, str] = {}
    for file_name, caption in rows:
        if not isinstance(file_name, str) or not isinstance(caption, str) or not caption.strip():
            continue
        relpath = posixpath.normpath(posixpath.join(folder, file_name))
        if posixpath.isabs(file_name) or relpath == ".." or relpath.startswith("../"):
            continue
        captions.setdefault(relpath, caption.strip())
    return captions


def unmatched_metadata(captions: Mapping[str, str], entries: Iterable[FolderEntry]) -> list[str]:
    """Metadata relpaths that name no listed entry (a typo'd or deleted file), sorted."""
    return sorted(set(captions) - {entry.relpath for entry in entries})


def _parse_metadata(path: Path, wanted: tuple[str, str]) -> list[tuple[object, object]]:
    """(file_name, caption) per row, in file order."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        _require_columns(pq.read_schema(path).names, wanted)
        table = pq.read_table(path, columns=list(wanted))
        return list(zip(*(table[name].to_pylist() for name in wanted), strict=True))
    text = path.read_text(encoding="utf-8-sig")
    if suffix == ".csv":
        # newline="" keeps line breaks inside quoted captions, as the csv module expects.
        reader = csv.DictReader(io.StringIO(text, newline=""))
        _require_columns(list(reader.fieldnames or []), wanted)
        return [(row[wanted[0]], row[wanted[1]]) for row in reader]
    rows: list[tuple[object, object]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            _require_columns(list(row), wanted)
        except ValueError as error:
            raise ValueError(f"line {number}: {error}") from None
        rows.append((row[wanted[0]], row[wanted[1]]))
    return rows


def _require_columns(names: list[str], wanted: tuple[str, str]) -> None:
    missing = [name for name in wanted if name not in names]
    if missing:
        raise ValueError(f"lacks column(s) {missing}, has {names}")


def _real_root(root: str) -> Path:
    real = Path(os.path.realpath(root))
    if not real.exists():
        raise ValueError(f"root: folder source root {root!r} does not exist")
    if not real.is_dir():
        raise ValueError(f"root: folder source root {root!r} is not a directory")
    return real


def _refused(relpath: str, reason: str, detail: str) -> FolderEntry:
    return FolderEntry(relpath=relpath, path=None, rejection=reason, detail=detail)


def _link_text(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]
