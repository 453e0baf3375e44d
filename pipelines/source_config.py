"""The data sources of a dataset: `[[data.sources]]` items and the synthetic demo corpus.

Each source has a name (its identity in the dataset: the registry, the manifest, the shards), a
kind and a sampling weight. Kinds:
- `url_list`: Parquet/JSONL url lists (files or folders of them), downloaded with img2dataset.
- `synthetic`: the generated demo corpus, a url list served on 127.0.0.1 (no paths).
- `folder`: a local tree of images with .txt/.json sidecars or an ImageFolder metadata file.
- `webdataset`: tar shards (files, folders, brace patterns such as `s/{00000..00099}.tar`).
- `parquet_images`: Parquet files with the image bytes in a column.
Options that belong to other kinds are refused by name, so a misplaced key never goes unseen.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

SOURCE_KINDS = ("url_list", "synthetic", "folder", "webdataset", "parquet_images")
LOCAL_KINDS = ("folder", "webdataset", "parquet_images")
"""Kinds read directly from files in the chunk tasks (no HTTP)."""

_OPTIONS_BY_KIND = {
    "url_list": ("serve_dir",),
    "synthetic": (),
    "folder": ("image_extensions", "caption_json_key", "metadata_file", "caption_column"),
    "webdataset": ("image_extensions", "caption_json_key"),
    "parquet_images": ("image_column", "caption_column"),
}


@dataclass(frozen=True, kw_only=True, slots=True)
class DataSourceConfig:
    """One `[[data.sources]]` item. Kind-specific options default to None (the reader's own
    default) and are refused for kinds that do not read them."""

    name: str
    """The source's identity in the dataset (registry, manifest, shards); letters, digits, -_."""
    kind: str
    """One of SOURCE_KINDS."""
    paths: tuple[str, ...] = ()
    """url_list: list files or folders of them; folder: one root; webdataset: tars, folders or
    brace patterns; parquet_images: files or folders; synthetic: none."""
    weight: float = 1.0
    """Relative sampling share in training: steps draw this source with probability
    weight / sum of weights (each step still from one aspect bucket)."""
    serve_dir: str | None = None
    """url_list: folder served on 127.0.0.1 for the run; relative urls resolve against it."""
    image_extensions: tuple[str, ...] | None = None
    """folder: suffixes with the dot (".jpg"); webdataset: member extensions without ("jpg")."""
    caption_json_key: str | None = None
    """folder, webdataset: key of the caption string in a .json sidecar or member."""
    metadata_file: str | None = None
    """folder: captions file relative to the root (ImageFolder's metadata.jsonl/.csv/.parquet)."""
    caption_column: str | None = None
    """folder: the metadata file's caption column; parquet_images: the caption column."""
    image_column: str | None = None
    """parquet_images: the column with the image bytes (binary, or {bytes, path})."""

    def __post_init__(self) -> None:
        if not self.name or not all(char.isalnum() or char in "-_" for char in self.name):
            raise ValueError(f"name: {self.name!r} must be letters, digits, '-' or '_'")
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"kind: {self.kind!r} is not one of {', '.join(SOURCE_KINDS)}")
        if not self.weight > 0:
            raise ValueError(f"weight: must be > 0, got {self.weight}")
        if self.kind == "synthetic" and self.paths:
            raise ValueError("paths: a synthetic source has none (it writes its own corpus)")
        if self.kind != "synthetic" and not self.paths:
            raise ValueError(f"paths: a {self.kind} source needs at least one path")
        if self.kind == "folder" and len(self.paths) != 1:
            raise ValueError(f"paths: a folder source has one root, got {len(self.paths)}")
        allowed = _OPTIONS_BY_KIND[self.kind]
        for field in fields(self):
            option = field.name
            if (
                option in _ALL_OPTIONS
                and option not in allowed
                and getattr(self, option) is not None
            ):
                raise ValueError(f"{option}: not an option of a {self.kind} source")

    @property
    def is_local(self) -> bool:
        return self.kind in LOCAL_KINDS

    def reader_config(self):
        """The component config of a local kind's reader (None for url_list / synthetic)."""
        options = {
            option: getattr(self, option)
            for option in _OPTIONS_BY_KIND[self.kind]
            if getattr(self, option) is not None
        }
        if self.kind == "folder":
            from components.data.folder_source import FolderSourceConfig

            return FolderSourceConfig(root=self.paths[0], **options)
        if self.kind == "webdataset":
            from components.data.webdataset_source import WebDatasetSourceConfig

            return WebDatasetSourceConfig(paths=self.paths, **options)
        if self.kind == "parquet_images":
            from components.data.parquet_image_source import ParquetImageSourceConfig

            return ParquetImageSourceConfig(paths=self.paths, **options)
        return None


_ALL_OPTIONS = {option for options in _OPTIONS_BY_KIND.values() for option in options}


@dataclass(frozen=True, kw_only=True, slots=True)
class SyntheticCorpusConfig:
    """The generated demo corpus that a `synthetic` source serves on 127.0.0.1."""

    count: int = 96
    """Images in the corpus."""
    max_side_px: int = 160
    """Longest side of the images."""

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("count must be >= 1")
        if self.max_side_px < 16:
            raise ValueError("max_side_px must be >= 16")


def check_sources(sources: tuple[DataSourceConfig, ...]) -> None:
    """A dataset's sources: at least one, names unique, at most one synthetic."""
    if not sources:
        raise ValueError("sources: a dataset needs at least one [[data.sources]] item")
    names = [source.name for source in sources]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"sources: the name {repeated[0]!r} is used twice")
    if sum(source.kind == "synthetic" for source in sources) > 1:
        raise ValueError("sources: at most one synthetic source")
