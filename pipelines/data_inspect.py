"""A picture of a published dataset version: one contact sheet per bucket and a counts chart.

Input: a run directory (`DataLayout(root)`) holding a published version's manifest, its shards
and the work files of the chunks (`work/fitted/...`: the fitted RGB images, exactly as training
saw them). Output, per version, written atomically and overwritten identically on a rerun:

    <root>/data/inspect/v<NNNN>/bucket=<id>.png   up to `samples_per_bucket` samples of each
                                                  non-empty bucket, captions under them
    <root>/data/inspect/v<NNNN>/counts.png        rejections by stage/reason, samples per
                                                  bucket, samples per source (when known)

Only sample_key, caption and (when the columns exist) source and caption_origin are read from
the shards; the source prefixes a tile's caption ("[name] caption") when the version has several
sources, and a caption the encoder generated is marked ("[generated] caption"). A
bucket whose fitted files are gone (work files cleaned up) gets a sheet saying so, with the
images it still has (none when all are gone), and is counted in the report.
`log_inspection` adds the PNGs to an MLflow run as artifacts under `data_inspect/`.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from components.data import shard_format
from components.data.buckets import Bucket
from components.data.dataset_picture import contact_sheet, count_chart
from pipelines.data_layout import DataLayout, read_fitted_slices

INSPECT_DIR = "inspect"
COUNTS_FILE = "counts.png"
ARTIFACT_DIR = "data_inspect"
SOURCE_COUNT_KEYS = ("encoded", "samples", "num_samples", "kept")
"""Keys a manifest source entry's `counts` mapping may give its sample count under, in order."""


@dataclass(frozen=True, slots=True)
class BucketSheet:
    """The contact sheet of one bucket."""

    bucket_id: str
    path: Path
    num_samples: int
    """Samples of the bucket in this version."""
    num_tiles: int
    """Samples drawn on the sheet."""
    missing_fitted: tuple[str, ...]
    """Fitted-image files (under the run's data folder) that were gone or incomplete."""
    captions: tuple[str, ...] = ()
    """The text under each tile, in tile order (source and "generated" tags included)."""


@dataclass(frozen=True, slots=True)
class InspectReport:
    """What `inspect_dataset` wrote and the counts it drew."""

    version: int
    out_dir: Path
    sheets: tuple[BucketSheet, ...]
    counts_path: Path
    counts: dict[str, dict[str, int]]
    """The chart's sections: {section: {label: count}}."""

    @property
    def tiles(self) -> dict[str, int]:
        """Tiles drawn per bucket id."""
        return {sheet.bucket_id: sheet.num_tiles for sheet in self.sheets}

    @property
    def buckets_missing_images(self) -> int:
        """Buckets some of whose picked samples had no fitted image left to show."""
        return sum(1 for sheet in self.sheets if sheet.missing_fitted)

    @property
    def paths(self) -> tuple[Path, ...]:
        return (*(sheet.path for sheet in self.sheets), self.counts_path)

    def format(self) -> str:
        """A human summary: the files written, then the counts drawn."""
        lines = [f"dataset version {self.version}: {self.out_dir}"]
        for sheet in self.sheets:
            note = f", fitted images missing: {len(sheet.missing_fitted)} files"
            lines.append(
                f"  {sheet.path.name:<24} {sheet.num_tiles} of {sheet.num_samples} samples"
                + (note if sheet.missing_fitted else "")
            )
        lines.append(f"  {self.counts_path.name}")
        for section, counts in self.counts.items():
            lines.append(f"{section}:")
            lines += [f"  {label:<32} {count}" for label, count in counts.items()]
            if not counts:
                lines.append("  (none)")
        return "\n".join(lines)


def inspect_dataset(
    root: Path, *, version: int | None = None, samples_per_bucket: int = 16, seed: int = 0
) -> InspectReport:
    """Draw the sheets and the counts chart of dataset `version` (default: the latest) of the
    run at `root`; see the module docstring for what is written where."""
    if samples_per_bucket < 1:
        raise ValueError(f"samples_per_bucket must be >= 1, got {samples_per_bucket}")
    layout = DataLayout(Path(root))
    manifest = shard_format.read_manifest(layout.data, version)
    number = int(manifest["version"])
    out_dir = layout.data / INSPECT_DIR / f"v{number:04d}"
    sheets = []
    one_source = len(_source_names(manifest)) <= 1
    for bucket_id, entry in manifest.get("buckets", {}).items():
        if not entry.get("num_samples"):
            continue
        bucket = Bucket(bucket_id, entry["aspect"], entry["width_px"], entry["height_px"])
        shards = [shard for shard in manifest["shards"] if shard["bucket_id"] == bucket_id]
        picked = pick_samples(
            layout, bucket_id=bucket_id, shards=shards, count=samples_per_bucket, seed=seed
        )
        if one_source:
            for row in picked:
                row.pop("source", None)
        sheet = _bucket_sheet(
            layout,
            bucket=bucket,
            picked=picked,
            num_samples=sum(int(shard["num_rows"]) for shard in shards),
            path=out_dir / f"bucket={bucket_id}.png",
        )
        sheets.append(sheet)
    counts = dataset_counts(manifest)
    counts_path = out_dir / COUNTS_FILE
    _save_png(count_chart(counts, title=_chart_title(manifest)), path=counts_path)
    return InspectReport(
        version=number,
        out_dir=out_dir,
        sheets=tuple(sheets),
        counts_path=counts_path,
        counts=counts,
    )


def _bucket_sheet(
    layout: DataLayout,
    *,
    bucket: Bucket,
    picked: list[dict[str, Any]],
    num_samples: int,
    path: Path,
) -> BucketSheet:
    images, missing = _fitted_images(layout, bucket=bucket, picked=picked)
    rows = sorted((row for row in picked if row["sample_key"] in images), key=_key)
    tiles = [(images[row["sample_key"]], _tile_caption(row)) for row in rows]
    title = (
        f"bucket {bucket.bucket_id} ({bucket.aspect_name}, {bucket.width_px}x{bucket.height_px} "
        f"px): {num_samples} samples, {len(tiles)} shown"
    )
    if missing:
        title += (
            f"\nno fitted image for {len(picked) - len(tiles)} of {len(picked)} picked samples: "
            f"{len(missing)} work files gone (cleaned up?): {', '.join(missing)}"
        )
    _save_png(contact_sheet(tiles, title=title), path=path)
    captions = tuple(caption for _, caption in tiles)
    return BucketSheet(bucket.bucket_id, path, num_samples, len(tiles), tuple(missing), captions)


def pick_samples(
    layout: DataLayout, *, bucket_id: str, shards: list[dict[str, Any]], count: int, seed: int
) -> list[dict[str, Any]]:
    """Up to `count` rows of a bucket's shards: `count` shards at most (seeded), read in path
    order and drawn from in turn, each one's rows in a seeded random order. A row is
    {sample_key, caption, chunk_index}, plus `source` and `caption_origin` when the shard has
    those columns."""
    generator = random.Random(f"{seed}:{bucket_id}")
    ordered = sorted(shards, key=lambda entry: entry["path"])
    chosen = sorted(generator.sample(range(len(ordered)), min(count, len(ordered))))
    queues = []
    for position in chosen:
        path = layout.data / ordered[position]["path"]
        names = pq.read_schema(path).names
        wanted = ["sample_key", "caption"]
        wanted += [name for name in ("source", "caption_origin") if name in names]
        rows = pq.read_table(path, columns=wanted).to_pylist()
        chunk_index = shard_format.shard_chunk_index(path)
        queues.append([{**row, "chunk_index": chunk_index} for row in rows])
        generator.shuffle(queues[-1])
    picked: list[dict[str, Any]] = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop())
    return picked


def _fitted_images(
    layout: DataLayout, *, bucket: Bucket, picked: list[dict[str, Any]]
) -> tuple[dict[str, Image.Image], list[str]]:
    """The fitted images of the picked rows by sample key, and the fitted files (relative to
    the data folder) that were missing or lacked a picked key."""
    keys_by_chunk: dict[int, list[str]] = {}
    for row in picked:
        keys_by_chunk.setdefault(row["chunk_index"], []).append(row["sample_key"])
    images: dict[str, Image.Image] = {}
    missing = []
    for chunk_index, keys in sorted(keys_by_chunk.items()):
        path = layout.fitted_images(chunk_index, bucket.bucket_id)
        keys = sorted(keys)
        try:
            for slice_keys, slice_images in read_fitted_slices(
                path, keys, bucket, slice_rows=len(keys)
            ):
                images.update(zip(slice_keys, slice_images, strict=True))
        except FileNotFoundError:
            for key in keys:
                images.pop(key, None)
            missing.append(str(path.relative_to(layout.data)))
    return images, missing


def _key(row: dict[str, Any]) -> str:
    return row["sample_key"]


def _source_names(manifest: Mapping[str, Any]) -> set[str]:
    names = {str(entry.get("name")) for entry in manifest.get("sources", [])}
    return names | {str(shard["source"]) for shard in manifest["shards"] if "source" in shard}


def _tile_caption(row: dict[str, Any]) -> str:
    caption = row.get("caption") or "(no caption)"
    tags = [row.get("source"), "generated" if row.get("caption_origin") == "generated" else None]
    tags = [tag for tag in tags if tag]
    return f"[{', '.join(tags)}] {caption}" if tags else caption


def dataset_counts(manifest: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """The chart's sections from a manifest: rejections by stage/reason (largest first),
    samples per bucket (manifest order, empty buckets included) and samples per source (left
    out when the manifest says nothing per source)."""
    rejected = manifest.get("counts", {}).get("rejected", {})
    reasons = {
        f"{stage}/{reason}": int(count)
        for stage, by_reason in rejected.items()
        for reason, count in by_reason.items()
    }
    sections = {
        "rejected by stage/reason": dict(
            sorted(reasons.items(), key=lambda item: (-item[1], item[0]))
        ),
        "samples per bucket": {
            bucket_id: int(entry.get("num_samples", 0))
            for bucket_id, entry in manifest.get("buckets", {}).items()
        },
    }
    per_source = _samples_per_source(manifest)
    if per_source is not None:
        sections["samples per source"] = per_source
    return sections


def _samples_per_source(manifest: Mapping[str, Any]) -> dict[str, int] | None:
    """From the `sources` entries' counts when every entry has one, else summed over the shard
    entries' `source` fields when every shard has one, else None."""
    from_sources = {}
    for entry in manifest.get("sources", []):
        samples = _source_samples(entry.get("counts"))
        if samples is None:
            from_sources = None
            break
        from_sources[str(entry.get("name", "?"))] = samples
    if from_sources:
        return from_sources
    shards = manifest.get("shards", [])
    if shards and all(shard.get("source") is not None for shard in shards):
        per_source = Counter()
        for shard in shards:
            per_source[str(shard["source"])] += int(shard["num_rows"])
        return dict(sorted(per_source.items()))
    return None


def _source_samples(counts: Any) -> int | None:
    if isinstance(counts, bool):
        return None
    if isinstance(counts, int):
        return counts
    if isinstance(counts, Mapping):
        for key in SOURCE_COUNT_KEYS:
            if isinstance(counts.get(key), int):
                return int(counts[key])
    return None


def _chart_title(manifest: Mapping[str, Any]) -> str:
    counts = manifest.get("counts", {})
    return (
        f"dataset version {manifest['version']} ({manifest.get('preset', '?')}): "
        f"{counts.get('encoded', '?')} samples from {counts.get('source_rows', '?')} source rows"
    )


def _save_png(image: Image.Image, *, path: Path) -> None:
    """Write a PNG through a temp name in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        image.save(temp, format="PNG")
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def log_inspection(report: InspectReport, *, run_id: str, tracking_uri: str | None = None) -> None:
    """Log the report's PNGs as artifacts under `data_inspect/` of the existing MLflow run
    `run_id` (tracking_uri: the store; None means MLflow's own default)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for path in report.paths:
        client.log_artifact(run_id, str(path), ARTIFACT_DIR)
