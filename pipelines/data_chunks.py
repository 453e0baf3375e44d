"""The chunk stage of the data workflow, run as a Ray task for one chunk of source rows (all of
one list): URL policy -> img2dataset -> filters -> buckets for url lists, direct reads (folder,
tar members, Parquet image bytes; components/data/local_sources.py) -> filters -> buckets for
local sources.

Kept light on purpose: a chunk task imports only what it uses (no torch model code), because
every fresh Ray worker pays for its imports. `process_chunk` writes each kept image, decoded and
fitted to its bucket, to the chunk's fitted files (what the encoder reads), then one outcome row
per source row of its chunk ("kept" or the reason), atomically.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from components.data.buckets import BucketConfig
from components.data.download import DownloadConfig, download_chunk
from components.data.filters import FilterConfig, Rejection, filter_sample, needs_caption
from components.data.url_policy import UrlPolicyConfig, check_url
from pipelines.data_layout import (
    OUTCOME_SCHEMA,
    SCORE_COLUMNS,
    DataLayout,
    FittedImageWriter,
    write_table_atomic,
)
from pipelines.environment import apply_quiet_environment


@dataclass(frozen=True, slots=True)
class ChunkConfigs:
    """The configs a chunk task needs (not the whole DataConfig: that would import the encoder)."""

    url_policy: UrlPolicyConfig
    download: DownloadConfig
    filters: FilterConfig
    buckets: BucketConfig
    captioning: bool = False
    """Rows without a usable caption are kept for the encoder to caption (not rejected)."""


@dataclass(frozen=True, slots=True)
class ChunkSource:
    """Where a chunk's rows come from: its source's kind and reader config, its list's path and
    the base url of the source's loopback server ("" when it has none)."""

    kind: str
    reader: Any
    list_path: str
    base_url: str = ""


def process_chunk(
    index: int,
    rows: list[dict[str, Any]],
    *,
    layout_root: str,
    config: ChunkConfigs,
    source: ChunkSource,
) -> int:
    """Read (or policy + download) + filter + bucket one chunk; writes its fitted images, then
    its outcome file, each atomically."""
    apply_quiet_environment()  # a Ray job's workers get no driver runtime_env (ray_session.py)
    layout = DataLayout(Path(layout_root))
    if source.reader is not None:
        outcomes = _process_local(index, rows, layout=layout, config=config, source=source)
    else:
        outcomes = _process_urls(
            index, rows, layout=layout, config=config, base_url=source.base_url
        )
    outcomes.sort(key=lambda outcome: outcome["sample_key"])
    write_table_atomic(
        pa.Table.from_pylist(outcomes, schema=OUTCOME_SCHEMA), layout.chunk_outcome(index)
    )
    return len(outcomes)


def _process_local(
    index: int,
    rows: list[dict[str, Any]],
    *,
    layout: DataLayout,
    config: ChunkConfigs,
    source: ChunkSource,
) -> list[dict[str, Any]]:
    from components.data.local_sources import LocalRow, read_local_images

    local_rows = [
        LocalRow(
            row["url"].split(":", 1)[1],
            row["caption"],
            row["listing_rejection"],
            row["listing_detail"] or "",
            row["read_hint"] or "",
        )
        for row in rows
    ]
    results = read_local_images(source.kind, source.reader, source.list_path, local_rows)
    outcomes = []
    # Key order: the fitted files must list their images in sample_key order.
    with FittedImageWriter(layout, index) as fitted:
        for row, (data, reason, detail) in sorted(
            zip(rows, results, strict=True), key=lambda pair: pair[0]["sample_key"]
        ):
            if row["duplicate_url"]:
                outcomes.append(_outcome(row, stage="read", reason="duplicate_url"))
            elif data is None:
                outcomes.append(
                    _outcome(row, stage="read", reason=reason or "unreadable", detail=detail)
                )
            else:
                read = {"status": "success", "image": data}
                outcomes.append(_filter_row(row, read, config, fitted))
    return outcomes


def _process_urls(
    index: int,
    rows: list[dict[str, Any]],
    *,
    layout: DataLayout,
    config: ChunkConfigs,
    base_url: str,
) -> list[dict[str, Any]]:
    outcomes, to_download = [], []
    for row in rows:
        url = _resolve_url(row["url"], base_url)
        refusal = "duplicate_url" if row["duplicate_url"] else check_url(url, config.url_policy)
        if refusal:
            outcomes.append(_outcome(row, stage="policy", reason=refusal))
        else:
            to_download.append({**row, "url": url})
    with FittedImageWriter(layout, index) as fitted:
        if to_download:
            downloads = _download(index, to_download, layout=layout, config=config)
            _check_source_alive(downloads, base_url)
            by_key = {row["sample_key"]: row for row in rows}
            # Key order: the fitted files must list their images in sample_key order.
            for downloaded in sorted(downloads, key=lambda downloaded: downloaded["key"]):
                row = by_key[downloaded["key"]]
                outcomes.append(_filter_row(row, downloaded, config, fitted))
    return outcomes


_NETWORK_FAILURES = ("connection_refused", "timeout")


class SourceGoneError(RuntimeError):
    """The run's own served source stopped answering: the run is being torn down."""


def _check_source_alive(downloads: list[dict[str, Any]], base_url: str) -> None:
    """Refuse to record network failures against our own loopback source once it is gone.

    When the driver dies its server dies with it, while a chunk task may still be finishing;
    its "connection refused" rows describe the dying run, not the urls, and must not become
    final outcomes that a rerun would skip.
    """
    failed_locally = any(
        row["status"] in _NETWORK_FAILURES and row["url"].startswith(base_url) for row in downloads
    )
    if not base_url or not failed_locally:
        return
    try:
        with urllib.request.urlopen(base_url, timeout=5):
            return
    except urllib.error.HTTPError:
        return
    except OSError as error:
        message = f"served source {base_url} is gone ({error}); chunk not recorded"
        raise SourceGoneError(message) from error


def _resolve_url(url: str, base_url: str) -> str:
    """Relative urls in a served source resolve against the loopback server."""
    return urljoin(base_url, url) if base_url and not urlsplit(url).scheme else url


def _download(
    index: int, rows: list[dict[str, Any]], *, layout: DataLayout, config: ChunkConfigs
) -> list[dict[str, Any]]:
    request = [
        {"key": row["sample_key"], "url": row["url"], "caption": row["caption"]}
        | {name: row.get(name) for name in SCORE_COLUMNS if name in row}
        for row in rows
    ]
    # The policy goes along too: urls were checked above, redirects are checked as they happen.
    result = download_chunk(
        request,
        out_dir=layout.chunk_dir(index),
        config=config.download,
        url_policy=config.url_policy,
    )
    return pq.read_table(result.path).to_pylist()


def _filter_row(
    row: dict[str, Any], downloaded: dict[str, Any], config: ChunkConfigs, fitted: FittedImageWriter
) -> dict:
    if downloaded["status"] != "success" or downloaded.get("image") is None:
        detail = downloaded.get("error_message") or ""
        return _outcome(row, stage="download", reason=downloaded["status"], detail=detail)
    scores = {name: row.get(name) for name in SCORE_COLUMNS}
    caption, filters = row["caption"], config.filters
    if config.captioning and needs_caption(caption, filters):
        # The encoder captions it; every other check still applies.
        caption, filters = "x", replace(filters, min_caption_chars=0)
    result = filter_sample(
        downloaded["image"],
        caption,
        scores=scores,
        config=filters,
        buckets=config.buckets,
    )
    if isinstance(result, Rejection):
        return _outcome(row, stage="filter", reason=result.reason, detail=result.detail)
    fitted.add(row["sample_key"], result.bucket, result.fitted)
    return _outcome(row, stage="filter", reason="kept") | {
        "bucket_id": result.bucket.bucket_id,
        "source_width_px": result.width_px,
        "source_height_px": result.height_px,
        "image_sha256": result.image_sha256,
        "phash": result.phash,
    }


def _outcome(row: dict[str, Any], *, stage: str, reason: str, detail: str = "") -> dict:
    return {
        "sample_key": row["sample_key"],
        "url": row["url"],
        "caption": row["caption"],
        "stage": stage,
        "reason": reason,
        "detail": detail[:500],
    }
