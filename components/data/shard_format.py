"""The Parquet shard format and its manifest: the contract between the data and training halves.

Layout under a dataset root:
    shards/bucket=<bucket_id>/part-<chunk>.parquet   one file per (download chunk, bucket)
    versions/v<NNNN>.json                             the manifest of each dataset version
    manifest.json                                     the latest version's manifest

A manifest holds counts, encoders, hashes, bytes per sample, its version number, its source
lists and every shard it includes (a version's shards are a subset of the next one's).

A row is one training sample. Scalar columns are listed in `SCALAR_COLUMNS`. Every tensor `name`
is three columns: `name` (raw little-endian bytes, C order), `name_dtype` (torch dtype name;
bfloat16 is stored as its uint16 bits, float8_e4m3fn as its uint8 bits) and `name_shape`
(list<int32>), so any Parquet reader can rebuild it without Ray's tensor extension type.
Bump `FORMAT_VERSION` whenever a column is added, removed or changes meaning.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

FORMAT_VERSION = 4
"""2: versioned manifests (version, sources, per-shard source list); 3: sources of several
kinds with sampling weights and per-source counts in the manifest, a `source` per shard entry,
shard columns `source`, `caption_origin`, `caption_model` and `caption_truncated`; 4: the
optional T5 caption states (`T5_TENSORS`), declared by the manifest's `encoders.t5_caption`."""
READ_FORMAT_VERSIONS = (3, 4)
"""Versions this code reads: a version-3 dataset is a version-4 one without T5 caption states."""
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
VERSIONS_DIR = "versions"

SCALAR_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("sample_key", pa.string()),
    ("source", pa.string()),
    ("url", pa.string()),
    ("caption", pa.string()),
    ("caption_origin", pa.string()),
    ("caption_model", pa.string()),
    ("caption_truncated", pa.bool_()),
    ("bucket_id", pa.string()),
    ("width_px", pa.int32()),
    ("height_px", pa.int32()),
    ("source_width_px", pa.int32()),
    ("source_height_px", pa.int32()),
    ("image_sha256", pa.string()),
)
"""Per-sample scalars: identity (key; source name; url, or `<source>:<locator>` for a local
source), caption and where it came from (`caption_origin` "given" by the source or "generated";
`caption_model` "<model>@<revision>" of a generated one, else ""; `caption_truncated`: cut to
the encoder's max_caption_tokens), bucket size (width/height) and the source image's size."""

CAPTION_ORIGINS = ("given", "generated")

REQUIRED_TENSORS = (
    "vae_latent",
    "image_prompt_hidden",
    "image_prompt_position_ids",
    "image_prompt_attention_mask",
    "image_prompt_image_mask",
    "image_grid_thw",
    "caption_prompt_hidden",
    "caption_prompt_position_ids",
    "caption_prompt_attention_mask",
    "clip_pooled",
)
"""Tensors every shard row carries (see components/data/encode.py for their shapes)."""

OPTIONAL_TENSORS = ("image_prompt_hidden_scale", "caption_prompt_hidden_scale")
"""Per-token scales, present only when the hidden states are stored as float8_e4m3fn."""

T5_TENSORS = ("caption_t5_hidden",)
"""FLUX's T5 states of the caption [256, d_model] in the hidden dtype, present in every row of a
dataset whose manifest declares `encoders.t5_caption` (data.encode.t5_caption), in none
otherwise; with float8_e4m3fn storage also `caption_t5_hidden_scale` [256]."""
T5_SCALE = "caption_t5_hidden_scale"

# Stored through an integer view of the same width: NumPy has no bfloat16 or float8 types.
_BIT_VIEWS = {
    torch.bfloat16: torch.uint16,
    torch.float8_e4m3fn: torch.uint8,
    torch.float16: torch.uint16,
}
_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float32,
        torch.float64,
        torch.bfloat16,
        torch.float16,
        torch.float8_e4m3fn,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


class ShardFormatError(ValueError):
    """A shard or manifest that does not follow this format version."""


def tensor_names(has_scales: bool, has_t5: bool = False) -> tuple[str, ...]:
    """Tensor columns of a shard; scales only in float8 storage mode, T5 states only in a
    dataset that declares them."""
    names = REQUIRED_TENSORS + (OPTIONAL_TENSORS if has_scales else ())
    if has_t5:
        names += T5_TENSORS + ((T5_SCALE,) if has_scales else ())
    return names


def has_t5_caption(manifest: dict[str, Any]) -> bool:
    """Whether a dataset's shards hold T5 caption states (its manifest declares them)."""
    return bool(manifest.get("encoders", {}).get("t5_caption"))


def shard_schema(names: Sequence[str]) -> pa.Schema:
    """The Arrow schema of a shard holding tensors `names`."""
    fields = [pa.field(name, dtype, nullable=False) for name, dtype in SCALAR_COLUMNS]
    for name in names:
        fields.append(pa.field(name, pa.binary(), nullable=False))
        fields.append(pa.field(f"{name}_dtype", pa.string(), nullable=False))
        fields.append(pa.field(f"{name}_shape", pa.list_(pa.int32()), nullable=False))
    return pa.schema(fields, metadata={"qwenflux_format_version": str(FORMAT_VERSION)})


def tensor_to_cell(tensor: torch.Tensor) -> tuple[bytes, str, list[int]]:
    """A CPU tensor as (little-endian bytes, dtype name, shape)."""
    tensor = tensor.detach().cpu().contiguous()
    dtype_name = str(tensor.dtype).removeprefix("torch.")
    if dtype_name not in _DTYPES:
        raise ShardFormatError(f"tensor dtype {tensor.dtype} is not storable")
    view = tensor.view(_BIT_VIEWS[tensor.dtype]) if tensor.dtype in _BIT_VIEWS else tensor
    array = view.numpy()
    if sys.byteorder != "little":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes(), dtype_name, list(tensor.shape)


def cell_to_tensor(data: bytes, dtype_name: str, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `tensor_to_cell`; the result owns its memory."""
    dtype = _DTYPES.get(dtype_name)
    if dtype is None:
        raise ShardFormatError(f"unknown stored dtype {dtype_name!r}")
    storage_dtype = _BIT_VIEWS.get(dtype, dtype)
    numpy_dtype = torch.empty(0, dtype=storage_dtype).numpy().dtype.newbyteorder("<")
    array = np.frombuffer(data, dtype=numpy_dtype).reshape(tuple(shape))
    tensor = torch.from_numpy(array.astype(numpy_dtype.newbyteorder("="), copy=True))
    return tensor.view(dtype) if storage_dtype is not dtype else tensor


@dataclass(frozen=True, slots=True)
class ShardFile:
    """What one written shard holds, for the manifest."""

    path: str
    num_rows: int
    num_bytes: int
    column_bytes: dict[str, int]


class ShardWriter:
    """Streams rows (scalars + torch tensors) into one Parquet shard, renamed into place on close.

    Each row holds every `SCALAR_COLUMNS` name and a tensor per `tensor_names(...)` entry. Rows
    arrive in slices; each slice becomes row groups of at most `max_row_group_bytes`.
    """

    def __init__(self, path: Path, *, max_row_group_bytes: int, compression: str = "zstd"):
        self.path = path
        self._temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self._max_row_group_bytes = max_row_group_bytes
        self._compression = compression
        self._writer: pq.ParquetWriter | None = None
        self._names: tuple[str, ...] = ()
        self.num_rows = 0
        self.column_bytes: dict[str, int] = {}

    def write_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        if self._writer is None:
            self._names = tensor_names(
                "image_prompt_hidden_scale" in rows[0], has_t5="caption_t5_hidden" in rows[0]
            )
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(
                self._temp, shard_schema(self._names), compression=self._compression
            )
        table = self._rows_to_table(rows)
        row_bytes = max(1, table.nbytes // table.num_rows)
        rows_per_group = max(1, min(table.num_rows, self._max_row_group_bytes // row_bytes))
        self._writer.write_table(table, row_group_size=rows_per_group)
        self.num_rows += table.num_rows

    def close(self) -> ShardFile:
        """Finish the file and move it into place; an empty shard is an error."""
        if self._writer is None:
            raise ShardFormatError(f"refusing to write an empty shard: {self.path}")
        self._writer.close()
        os.replace(self._temp, self.path)
        return ShardFile(str(self.path), self.num_rows, self.path.stat().st_size, self.column_bytes)

    def abort(self) -> None:
        """Drop the partial file (the final path is never touched)."""
        if self._writer is not None:
            self._writer.close()
        self._temp.unlink(missing_ok=True)

    def _rows_to_table(self, rows: Sequence[dict[str, Any]]) -> pa.Table:
        schema = shard_schema(self._names)
        columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        for row in rows:
            for name, _ in SCALAR_COLUMNS:
                columns[name].append(row[name])
            for name in self._names:
                data, dtype_name, shape = tensor_to_cell(row[name])
                columns[name].append(data)
                columns[f"{name}_dtype"].append(dtype_name)
                columns[f"{name}_shape"].append(shape)
                self.column_bytes[name] = self.column_bytes.get(name, 0) + len(data)
        return pa.table(columns, schema=schema)


def write_shard(
    rows: Sequence[dict[str, Any]],
    path: Path,
    *,
    max_row_group_bytes: int,
    compression: str = "zstd",
) -> ShardFile:
    """Write rows atomically as one Parquet shard (see `ShardWriter`)."""
    writer = ShardWriter(path, max_row_group_bytes=max_row_group_bytes, compression=compression)
    try:
        writer.write_rows(rows)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def read_shard(path: Path) -> pa.Table:
    """Read one shard, checking its format version; errors name the file."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as error:
        raise ShardFormatError(f"{path}: unreadable Parquet shard: {error}") from None
    version = (table.schema.metadata or {}).get(b"qwenflux_format_version", b"?").decode()
    if version not in {str(known) for known in READ_FORMAT_VERSIONS}:
        raise ShardFormatError(
            f"{path}: shard format version {version}, this code reads "
            f"{' and '.join(map(str, READ_FORMAT_VERSIONS))}"
        )
    return table


def iter_samples(table: pa.Table) -> Iterator[dict[str, Any]]:
    """Rows of a shard table with tensors rebuilt as torch tensors."""
    names = [name for name in table.column_names if f"{name}_dtype" in table.column_names]
    scalars = [name for name, _ in SCALAR_COLUMNS]
    plain = table.select(scalars + [col for n in names for col in (n, f"{n}_dtype", f"{n}_shape")])
    for row in plain.to_pylist():
        sample = {name: row[name] for name in scalars}
        for name in names:
            sample[name] = cell_to_tensor(row[name], row[f"{name}_dtype"], row[f"{name}_shape"])
        yield sample


def shard_path(root: Path, bucket_id: str, chunk_index: int) -> Path:
    """Where the shard of (bucket, chunk) lives under a dataset root."""
    return root / SHARDS_DIR / f"bucket={bucket_id}" / f"part-{chunk_index:05d}.parquet"


def shard_chunk_index(path: Path) -> int:
    """The download chunk a shard file holds (inverse of `shard_path`'s file name)."""
    return int(path.stem.removeprefix("part-"))


def list_shards(root: Path) -> list[Path]:
    """Every finished shard under a dataset root, in a stable order."""
    return sorted((root / SHARDS_DIR).glob("bucket=*/part-*.parquet"))


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON through a temp file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(temp, path)


def version_path(root: Path, version: int) -> Path:
    return root / VERSIONS_DIR / f"v{version:04d}.json"


def list_versions(root: Path) -> list[int]:
    """Published dataset versions under a dataset root, ascending."""
    names = (path.stem for path in (root / VERSIONS_DIR).glob("v*.json"))
    return sorted(int(name[1:]) for name in names if name[1:].isdigit())


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest of version `manifest["version"]` and make it the latest (adds the
    format version). The version file is written first, so a kill leaves the latest pointing
    at a whole earlier version."""
    payload = {**manifest, "format_version": FORMAT_VERSION}
    write_json_atomic(version_path(root, int(manifest["version"])), payload)
    path = root / MANIFEST_NAME
    write_json_atomic(path, payload)
    return path


def read_manifest(root: Path, version: int | None = None) -> dict[str, Any]:
    """Read and version-check a dataset manifest (the latest, or `version`); errors name the
    file."""
    path = root / MANIFEST_NAME if version is None else version_path(root, version)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        if version is not None:
            raise ShardFormatError(
                f"no dataset version {version} at {path} (published: {list_versions(root)})"
            ) from None
        raise ShardFormatError(
            f"no manifest at {path}: the data pipeline has not finished"
        ) from None
    except json.JSONDecodeError as error:
        raise ShardFormatError(f"{path}: corrupt manifest: {error}") from None
    if manifest.get("format_version") not in READ_FORMAT_VERSIONS:
        raise ShardFormatError(
            f"{path}: format version {manifest.get('format_version')}, "
            f"this code reads {' and '.join(map(str, READ_FORMAT_VERSIONS))}"
        )
    return manifest


def vae_factors(manifest: dict[str, Any]) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of the VAE the dataset's raw latents came from: the one
    place training, the gate and the model package read them (FLUX applies them as
    (latent - shift) * scaling before packing)."""
    encoders = manifest.get("encoders", {})
    try:
        return float(encoders["vae_scaling_factor"]), float(encoders["vae_shift_factor"])
    except KeyError as missing:
        raise ShardFormatError(f"manifest lacks encoders.{missing.args[0]}") from None
