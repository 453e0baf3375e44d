"""The data run's manifest and printed summary.

The manifest (`<root>/data/manifest.json`, and `<root>/data/versions/vNNNN.json` per version)
is the contract's index: format version, dataset version, its sources (kind, sampling weight,
lists, and per source: rows, kept, rejections by reason, samples per bucket), counts (rows new in
this version, reused from earlier ones, per bucket, per rejection reason), encoder
ids/revisions/dtypes and layer cut, the config hash, every shard with its rows, bytes, source,
list and version, bytes per sample per column, code version.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from components.data import shard_format
from components.data.buckets import build_buckets
from pipelines.config_loading import config_hash
from pipelines.data_layout import DataLayout, read_outcomes
from pipelines.data_sources import Registry, state_fingerprint

ENCODERS_FILE = "encoders.json"


@dataclass
class DataSummary:
    """Counts of one data run, as printed and as stored in the manifest."""

    version: int
    source_rows: int
    new_rows: int
    """Rows this version added (downloaded, filtered and encoded for it)."""
    new_encoded: int
    """Samples this version added to the shards."""
    downloaded: int
    kept: int
    encoded: int
    rejected: dict[str, dict[str, int]]
    per_bucket: dict[str, int]
    bytes_per_sample: float
    column_bytes_per_sample: dict[str, float] = field(default_factory=dict)
    generated_captions: int = 0
    """Kept rows captioned by data.captioning's model."""
    truncated_captions: int = 0
    """Captions cut to data.encode.max_caption_tokens."""
    per_source: dict[str, int] = field(default_factory=dict)
    """Encoded samples per source."""
    manifest_path: str = ""

    def format(self) -> str:
        """A human summary: downloaded, rejected by reason, per bucket, bytes per sample."""
        reused = self.source_rows - self.new_rows
        lines = [
            f"dataset version {self.version}",
            f"source rows     {self.source_rows} (new {self.new_rows}, reused {reused})",
            f"new samples     {self.new_encoded} encoded for this version, "
            f"{self.encoded - self.new_encoded} reused",
            f"fetched         {self.downloaded} (downloaded or read)",
            f"kept + encoded  {self.encoded} (kept by filters {self.kept})",
            "per source      "
            + ", ".join(f"{name} {count}" for name, count in self.per_source.items()),
            f"captions        {self.generated_captions} generated, "
            f"{self.truncated_captions} cut to the token cap",
            "rejected by reason:",
        ]
        for stage, reasons in self.rejected.items():
            for reason, count in sorted(reasons.items()):
                lines.append(f"  {stage:<9} {reason:<24} {count}")
        lines.append("samples per bucket:")
        lines += [f"  {bucket:<12} {count}" for bucket, count in self.per_bucket.items()]
        lines.append(f"bytes per sample (Parquet, compressed): {self.bytes_per_sample:,.0f}")
        for name, size in self.column_bytes_per_sample.items():
            lines.append(f"  {name:<32} {size:,.0f}")
        lines.append(f"manifest: {self.manifest_path}")
        return "\n".join(lines)


def write_encoder_description(layout: DataLayout, description: dict[str, Any]) -> None:
    """Called by encoder actors: what encoded the shards (same content from every actor)."""
    shard_format.write_json_atomic(layout.data / ENCODERS_FILE, description)


def build_manifest(
    layout: DataLayout, *, config, registry: Registry, duplicates: dict
) -> DataSummary:
    """Check the run's invariants, write the version's manifest and return the summary."""
    outcomes = read_outcomes(layout, registry.num_chunks)
    if outcomes.num_rows != len(registry.rows):
        raise RuntimeError(
            f"{layout.work}: {outcomes.num_rows} outcomes for {len(registry.rows)} source rows"
        )
    rejected = _rejections(outcomes.to_pylist(), duplicates)
    shard_entries, column_bytes = _shard_entries(layout, registry)
    encoded = sum(entry["num_rows"] for entry in shard_entries)
    kept = sum(1 for reason in outcomes["reason"].to_pylist() if reason == "kept")
    if encoded != kept - len(duplicates):
        raise RuntimeError(
            f"{layout.data}: {encoded} encoded rows, expected {kept - len(duplicates)}"
        )
    per_bucket = _per_bucket(config, shard_entries)
    source_entries = _source_entries(
        config, registry, outcomes.to_pylist(), duplicates, shard_entries
    )
    total_bytes = sum(entry["num_bytes"] for entry in shard_entries)
    new_rows = sum(1 for row in registry.rows if row["added_in"] == registry.version)
    summary = DataSummary(
        version=registry.version,
        source_rows=len(registry.rows),
        new_rows=new_rows,
        new_encoded=sum(
            entry["num_rows"] for entry in shard_entries if entry["added_in"] == registry.version
        ),
        downloaded=sum(1 for stage in outcomes["stage"].to_pylist() if stage == "filter"),
        kept=kept,
        encoded=encoded,
        rejected=rejected,
        per_bucket={bucket: entry["num_samples"] for bucket, entry in per_bucket.items()},
        bytes_per_sample=total_bytes / max(encoded, 1),
        generated_captions=_sum(shard_entries, "num_generated_captions"),
        truncated_captions=_sum(shard_entries, "num_truncated_captions"),
        per_source={source["name"]: source["counts"]["encoded"] for source in source_entries},
        column_bytes_per_sample={
            name: size / max(encoded, 1) for name, size in column_bytes.items()
        },
    )
    manifest = {
        "dataset_id": _dataset_id(shard_entries, config),
        "version": registry.version,
        "sources": source_entries,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "config_hash": config_hash(config),
        "preset": config.run.name,
        "encoders": _encoder_description(layout),
        "counts": {
            "source_rows": summary.source_rows,
            "new_rows": summary.new_rows,
            "reused_rows": summary.source_rows - summary.new_rows,
            "new_encoded": summary.new_encoded,
            "downloaded": summary.downloaded,
            "kept_by_filters": summary.kept,
            "encoded": summary.encoded,
            "generated_captions": summary.generated_captions,
            "truncated_captions": summary.truncated_captions,
            "rejected": summary.rejected,
        },
        "buckets": per_bucket,
        "tensor_dtypes": _tensor_dtypes(layout),
        "shards": shard_entries,
        "bytes_per_sample": {
            "parquet_file": summary.bytes_per_sample,
            "columns_uncompressed": summary.column_bytes_per_sample,
        },
    }
    path, summary.version = _publish(layout, manifest)
    summary.manifest_path = str(path)
    return summary


def _publish(layout: DataLayout, manifest: dict[str, Any]) -> tuple[Path, int]:
    """Write the version's manifest; returns its path and version. A published version with the
    same shards and source weights is left as it is (a rerun of a finished version changes
    nothing, not even its timestamp); new weights on the same shards are a new version."""
    try:
        published = shard_format.read_manifest(layout.data, manifest["version"])
    except shard_format.ShardFormatError:
        published = None
    if published is not None and published["shards"] == manifest["shards"]:
        if _weights(published) == _weights(manifest):
            return layout.data / shard_format.MANIFEST_NAME, manifest["version"]
        manifest = {**manifest, "version": manifest["version"] + 1}
    return shard_format.write_manifest(layout.data, manifest), manifest["version"]


def _weights(manifest: dict[str, Any]) -> dict[str, float]:
    return {source["name"]: source["weight"] for source in manifest.get("sources", [])}


def _source_entries(
    config,
    registry: Registry,
    outcomes: list[dict[str, Any]],
    duplicates: dict,
    shard_entries: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Per source: name, kind, weight, its lists, and its rows, kept, rejections, buckets."""
    source_of = {row["sample_key"]: row["source"] for row in registry.rows}
    by_source: dict[str, list[dict[str, Any]]] = {source.name: [] for source in config.data.sources}
    for row in outcomes:  # one pass over the outcomes, not one per source
        by_source[source_of[row["sample_key"]]].append(row)
    entries = []
    for source in config.data.sources:
        own = by_source[source.name]
        keys = {row["sample_key"] for row in own}
        per_bucket = Counter()
        for entry in shard_entries:
            if entry["source"] == source.name:
                per_bucket[entry["bucket_id"]] += entry["num_rows"]
        entries.append(
            {
                "name": source.name,
                "kind": source.kind,
                "weight": source.weight,
                "lists": registry.list_summaries(source.name),
                "counts": {
                    "source_rows": len(own),
                    "kept_by_filters": sum(row["reason"] == "kept" for row in own),
                    "encoded": sum(per_bucket.values()),
                    "generated_captions": _sum(
                        shard_entries, "num_generated_captions", source.name
                    ),
                    "truncated_captions": _sum(
                        shard_entries, "num_truncated_captions", source.name
                    ),
                    "rejected": _rejections(
                        own, {key: value for key, value in duplicates.items() if key in keys}
                    ),
                    "per_bucket": dict(sorted(per_bucket.items())),
                },
            }
        )
    return entries


def _sum(entries: list[dict[str, Any]], key: str, source: str | None = None) -> int:
    return sum(entry[key] for entry in entries if source is None or entry["source"] == source)


def _rejections(outcomes: list[dict[str, Any]], duplicates: dict) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter] = {}
    for row in outcomes:
        if row["reason"] != "kept":
            counts.setdefault(row["stage"], Counter())[row["reason"]] += 1
    for reason, _ in duplicates.values():
        counts.setdefault("dedup", Counter())[reason] += 1
    return {stage: dict(counter) for stage, counter in counts.items()}


def _shard_entries(
    layout: DataLayout, registry: Registry
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    chunk_rows = {row["chunk_index"]: row for row in registry.rows}
    entries, column_bytes = [], Counter()
    for path in shard_format.list_shards(layout.data):
        metadata_ = pq.read_metadata(path)
        for group in range(metadata_.num_row_groups):
            row_group = metadata_.row_group(group)
            for column in range(row_group.num_columns):
                chunk = row_group.column(column)
                name = chunk.path_in_schema.split(".")[0]
                if name in shard_format.tensor_names(True, has_t5=True):
                    column_bytes[name] += chunk.total_uncompressed_size
        # Chunks never span two lists: the chunk names the shard's source, list and version.
        chunk = chunk_rows[shard_format.shard_chunk_index(path)]
        captions = pq.read_table(path, columns=["caption_origin", "caption_truncated"])
        entries.append(
            {
                "path": str(path.relative_to(layout.data)),
                "bucket_id": path.parent.name.removeprefix("bucket="),
                "num_rows": metadata_.num_rows,
                "num_bytes": path.stat().st_size,
                "source": chunk["source"],
                "source_list": chunk["source_list"],
                "num_generated_captions": captions["caption_origin"].to_pylist().count("generated"),
                "num_truncated_captions": sum(captions["caption_truncated"].to_pylist()),
                "added_in": chunk["added_in"],
            }
        )
    return entries, dict(column_bytes)


def _per_bucket(config, shard_entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every configured bucket, including empty ones, with its sample count."""
    counts = Counter()
    for entry in shard_entries:
        counts[entry["bucket_id"]] += entry["num_rows"]
    return {
        bucket.bucket_id: {
            "aspect": bucket.aspect_name,
            "width_px": bucket.width_px,
            "height_px": bucket.height_px,
            "num_samples": counts.get(bucket.bucket_id, 0),
        }
        for bucket in build_buckets(config.data.buckets)
    }


def _tensor_dtypes(layout: DataLayout) -> dict[str, str]:
    """Stored dtype of every tensor column (read from the first shard; all shards agree)."""
    paths = shard_format.list_shards(layout.data)
    if not paths:
        return {}
    table = pq.read_table(paths[0]).slice(0, 1)
    return {
        name.removesuffix("_dtype"): table[name][0].as_py()
        for name in table.column_names
        if name.endswith("_dtype")
    }


def _encoder_description(layout: DataLayout) -> dict[str, Any]:
    path = layout.data / ENCODERS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _dataset_id(shard_entries: list[dict[str, Any]], config) -> str:
    """Names what training draws from: the data config (sources aside), the shard list and the
    sources' weights (new weights on the same shards train afresh)."""
    digest = hashlib.sha256(state_fingerprint(config.data).encode())
    for entry in shard_entries:
        digest.update(f"{entry['path']}:{entry['num_rows']}".encode())
    for source in config.data.sources:
        digest.update(f"{source.name}:{source.weight!r}".encode())
    return digest.hexdigest()[:16]


def code_version() -> dict[str, str]:
    """Package version and git commit of the code that ran."""
    try:
        version = metadata.version("qwen2vl-flux-pipeline")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    return {"package": version, "git_sha": sha}
