"""Download one chunk of url rows with img2dataset, keeping the original image bytes.

Input: rows {key, url, caption, extra columns such as scores}. Output: one Parquet file,
`<out_dir>/downloaded.parquet` (written atomically), with exactly one row per input row, in
input order: key, url, caption,
image (the bytes exactly as served, or null), status ("success" or a reason from
DOWNLOAD_FAILURE_REASONS), error_message, then the extra columns. img2dataset's own Downloader,
Resizer (re-encoding disabled) and Parquet writer run in this process on threads: calling
`img2dataset.download()` per chunk would spawn processes and pay seconds of start-up each time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.data.url_policy import REFUSAL_REASONS, UrlPolicyConfig, check_url

DOWNLOAD_FILE_NAME = "downloaded.parquet"
SUCCESS = "success"
DOWNLOAD_FAILURE_REASONS: tuple[str, ...] = (
    "http_404",
    "http_error",
    "connection_refused",
    "timeout",
    "too_large",
    "robots_disallowed",
    "redirect_refused",
    "other_download_error",
    *REFUSAL_REASONS,
)
"""Every status but "success": download failures, then URL refusals (url_policy's reasons)."""
OUTPUT_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("key", pa.string()),
    ("url", pa.string()),
    ("caption", pa.string()),
    ("image", pa.large_binary()),
    ("status", pa.string()),
    ("error_message", pa.string()),
)
IMG2DATASET_DISALLOWED_DIRECTIVES: tuple[str, ...] = (
    "noai",
    "noimageai",
    "noindex",
    "noimageindex",
)
"""img2dataset's default X-Robots-Tag directives that forbid using an image."""

_FETCH_SCHEMES = ("http", "https")
_PARTIAL_PREFIX = ".download-partial-"
_ROW_GROUP_ROWS = 256
# Ordered: the first matching fragment of the lower-cased error message names the reason.
_ERROR_PATTERNS: tuple[tuple[str, str], ...] = (
    ("redirect refused", "redirect_refused"),
    ("http error 404", "http_404"),
    ("http error", "http_error"),
    ("x-robots-tag", "robots_disallowed"),
    ("connection refused", "connection_refused"),
    ("timed out", "timeout"),
    ("timeout", "timeout"),
    ("name or service not known", "unresolvable_host"),
    ("temporary failure in name resolution", "unresolvable_host"),
    ("nodename nor servname", "unresolvable_host"),
    ("no address associated with hostname", "unresolvable_host"),
    ("unknown url type", "scheme_not_allowed"),
    ("no host given", "malformed_url"),
    ("invalid url", "malformed_url"),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class DownloadConfig:
    """How img2dataset fetches one chunk."""

    thread_count: int = 16
    """Concurrent HTTP requests per chunk (img2dataset threads)."""
    timeout_seconds: float = 10.0
    """Socket timeout per connect/read, in seconds (not a whole-download deadline)."""
    retries: int = 0
    """Extra attempts after a failed download."""
    max_image_bytes: int | None = 64 * 2**20
    """Bodies larger than this are dropped as "too_large" (checked after reading); None: no cap."""
    user_agent_token: str = "qwenflux"
    """Token in the User-Agent and the X-Robots-Tag user-agent name that applies to us."""
    disallowed_header_directives: tuple[str, ...] = IMG2DATASET_DISALLOWED_DIRECTIVES
    """X-Robots-Tag directives that make us drop an image ("robots_disallowed"); () for none."""

    def __post_init__(self) -> None:
        if self.thread_count < 1:
            raise ValueError(f"thread_count: must be >= 1, got {self.thread_count}")
        if not self.timeout_seconds > 0:
            raise ValueError(f"timeout_seconds: must be > 0, got {self.timeout_seconds}")
        if self.retries < 0:
            raise ValueError(f"retries: must be >= 0, got {self.retries}")
        if self.max_image_bytes is not None and self.max_image_bytes < 1:
            raise ValueError(f"max_image_bytes: must be >= 1 or None, got {self.max_image_bytes}")
        if not self.user_agent_token.strip() or not self.user_agent_token.isascii():
            raise ValueError("user_agent_token: must be a non-empty ASCII token")


@dataclass(frozen=True, slots=True)
class DownloadedChunk:
    """Where one chunk's rows landed, with counts."""

    path: Path
    """The chunk's Parquet file (one row per input row)."""
    stats: dict[str, Any]
    """{"count": rows, "successes": n, "failures": {reason: n}}."""


def download_chunk(
    rows: Sequence[Mapping[str, Any]],
    *,
    out_dir: Path,
    config: DownloadConfig,
    url_policy: UrlPolicyConfig | None = None,
) -> DownloadedChunk:
    """Download `rows` into out_dir/downloaded.parquet, replacing any earlier result.

    Every row needs a unique str "key" and a "url"; "caption" may be None or absent. Bad URLs
    and failed downloads are rows with a null image and a reason, never exceptions. URLs are
    only fetched over http(s), and when url_policy is given only if check_url allows them
    (refusals keep check_url's reason as status). Work happens in a hidden partial folder that
    is removed afterwards (and at the start of the next call if the process was killed), so
    only a complete file ever has the final name.
    """
    extra_columns = _extra_columns(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_partial_dirs(out_dir)
    refusals = [_refusal(row.get("url"), url_policy) for row in rows]
    fetchable = [index for index, refusal in enumerate(refusals) if refusal is None]
    work_dir = out_dir / f"{_PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with _redirects_checked(url_policy):
            fetched = _fetch_with_img2dataset(
                [rows[index]["url"] for index in fetchable], work_dir=work_dir, config=config
            )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    fetched = _take(fetched, positions=fetchable, num_rows=len(rows))
    statuses, errors = _statuses(refusals, fetched, config=config)
    is_success = pa.array([status == SUCCESS for status in statuses], type=pa.bool_())
    columns = {
        "key": pa.array([row["key"] for row in rows], type=pa.string()),
        "url": pa.array([_as_text(row.get("url")) for row in rows], type=pa.string()),
        "caption": pa.array([_as_text(row.get("caption")) for row in rows], type=pa.string()),
        "image": pc.if_else(is_success, fetched["image"], pa.scalar(None, pa.large_binary())),
        "status": pa.array(statuses, type=pa.string()),
        "error_message": pa.array(errors, type=pa.string()),
    }
    for name in extra_columns:
        columns[name] = pa.array([row.get(name) for row in rows])
    path = out_dir / DOWNLOAD_FILE_NAME
    tmp_path = out_dir / f"{DOWNLOAD_FILE_NAME}.tmp-{os.getpid()}"
    pq.write_table(pa.table(columns), tmp_path, row_group_size=_ROW_GROUP_ROWS)
    os.replace(tmp_path, path)
    return DownloadedChunk(path=path, stats=_stats(statuses))


class _PolicyRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a url the policy allows: a public url must not be able to
    bounce the downloader onto a metadata or private address."""

    def __init__(self, url_policy: UrlPolicyConfig) -> None:
        super().__init__()
        self._url_policy = url_policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: PLR0913
        reason = check_url(newurl, self._url_policy)
        if reason is not None:
            raise urllib.error.HTTPError(
                newurl, code, f"redirect refused ({reason}): {newurl}", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@contextlib.contextmanager
def _redirects_checked(url_policy: UrlPolicyConfig | None) -> Iterator[None]:
    """img2dataset fetches through urllib's global opener: swap in a policy-checking one.

    Process-wide while it lasts; Ray task workers run one chunk at a time, so nothing else in
    the process fetches meanwhile.
    """
    if url_policy is None:
        yield
        return
    previous = urllib.request._opener  # noqa: SLF001 (urllib has no getter for it)
    urllib.request.install_opener(urllib.request.build_opener(_PolicyRedirectHandler(url_policy)))
    try:
        yield
    finally:
        urllib.request._opener = previous  # noqa: SLF001


def classify_download_error(error_message: str | None) -> str:
    """Map an img2dataset/urllib error message to a reason in DOWNLOAD_FAILURE_REASONS."""
    text = (error_message or "").lower()
    for fragment, reason in _ERROR_PATTERNS:
        if fragment in text:
            return reason
    return "other_download_error"


def _extra_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Passthrough column names in first-seen order; checks the key contract."""
    reserved = {name for name, _ in OUTPUT_COLUMNS}
    seen_keys: set[str] = set()
    extra: dict[str, None] = {}
    for row in rows:
        key = row.get("key")
        if not isinstance(key, str) or key in seen_keys:
            raise ValueError(f"rows: every row needs a unique str 'key', got {key!r}")
        seen_keys.add(key)
        for name in row:
            if name in ("image", "status", "error_message"):
                raise ValueError(f"rows: input column {name!r} is reserved for the output")
            if name not in reserved:
                extra[name] = None
    return list(extra)


def _remove_partial_dirs(out_dir: Path) -> None:
    # One chunk has one writer at a time, so any partial folder here is from a killed run.
    for stale in out_dir.glob(f"{_PARTIAL_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in out_dir.glob(f"{DOWNLOAD_FILE_NAME}.tmp-*"):
        stale.unlink(missing_ok=True)


def _fetch_with_img2dataset(urls: list[str], *, work_dir: Path, config: DownloadConfig) -> pa.Table:
    """Columns image (bytes as served, or null) and error_message; one row per url, in order."""
    if not urls:
        return pa.table(
            {"image": pa.array([], pa.large_binary()), "error_message": pa.array([], pa.string())}
        )
    work_dir.mkdir()
    shard_path = work_dir / "0.feather"
    url_table = pa.table({"url": pa.array(urls, type=pa.string())})
    with pa.OSFile(str(shard_path), "wb") as sink, pa.ipc.new_file(sink, url_table.schema) as out:
        out.write_table(url_table)
    downloader = _build_downloader(len(urls), work_dir=work_dir, config=config)
    is_ok, _ = downloader((0, str(shard_path)))
    if not is_ok:
        raise RuntimeError(f"img2dataset failed on the whole chunk in {work_dir}")
    written = pq.read_table(
        work_dir / "0.parquet", columns=["key", "status", "error_message", "jpg"]
    )
    # With shard id 0 and a shard holding every url, img2dataset's key is the url's index.
    aligned = _take(written, positions=pc.cast(written["key"], pa.int64()), num_rows=len(urls))
    is_success = pc.fill_null(
        pc.and_(pc.equal(aligned["status"], SUCCESS), pc.is_valid(aligned["jpg"])), False
    )
    no_row = pa.scalar("img2dataset wrote no row for this url")
    error = pc.coalesce(aligned["error_message"], aligned["status"], no_row)
    return pa.table(
        {
            # large_binary: a chunk's bytes may pass 2 GiB, the limit of binary's 32-bit offsets.
            "image": pc.if_else(is_success, aligned["jpg"], None).cast(pa.large_binary()),
            "error_message": pc.if_else(is_success, pa.scalar(None, pa.string()), error),
        }
    )


def _take(table: pa.Table, *, positions: Sequence[int] | pa.Array, num_rows: int) -> pa.Table:
    """Rows of `table` placed at `positions` of a num_rows table; other rows are null."""
    row_at = np.full(num_rows, -1, dtype=np.int64)
    row_at[np.asarray(positions, dtype=np.int64)] = np.arange(table.num_rows, dtype=np.int64)
    return table.take(pa.array(row_at, mask=row_at < 0))


def _build_downloader(num_urls: int, *, work_dir: Path, config: DownloadConfig) -> Any:
    # Imported here: img2dataset costs ~1.6 s to import and pulls in wandb and albumentations
    # (whose online update check the process environment turns off: pipelines/environment.py).
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import ParquetSampleWriter

    resizer = Resizer(
        image_size=256,  # unused with resize_mode "no"
        resize_mode="no",
        resize_only_if_bigger=False,
        disable_all_reencoding=True,
    )
    return Downloader(
        sample_writer_class=ParquetSampleWriter,
        resizer=resizer,
        thread_count=min(config.thread_count, num_urls),
        save_caption=False,
        extract_exif=False,
        output_folder=str(work_dir),
        column_list=["url"],
        timeout=config.timeout_seconds,
        # With shard id 0 and a shard holding every url, img2dataset's key is the row index.
        number_sample_per_shard=max(num_urls, 2),
        oom_shard_count=1,
        compute_hash=None,
        verify_hash_type=None,
        encode_format="jpg",  # only names the bytes column: re-encoding is disabled
        retries=config.retries,
        user_agent_token=config.user_agent_token,
        disallowed_header_directives=list(config.disallowed_header_directives) or None,
    )


def _refusal(url: object, url_policy: UrlPolicyConfig | None) -> tuple[str, str] | None:
    """(status, error_message) for a URL that must not be fetched, or None when it may be."""
    if not isinstance(url, str):
        return "malformed_url", f"url is {type(url).__name__}, not str"
    # urllib also opens ftp:// and file:// URLs, so http(s) is enforced even without a policy.
    if urlsplit(url).scheme.lower() not in _FETCH_SCHEMES:
        return "scheme_not_allowed", "only http and https are fetched"
    reason = check_url(url, url_policy) if url_policy is not None else None
    return None if reason is None else (reason, f"refused by url policy: {reason}")


def _statuses(
    refusals: list[tuple[str, str] | None], fetched: pa.Table, *, config: DownloadConfig
) -> tuple[list[str], list[str | None]]:
    """(status, error_message) per row from URL refusals, fetch errors and body sizes."""
    fetch_errors = fetched["error_message"].to_pylist()
    sizes = pc.binary_length(fetched["image"]).to_pylist()
    statuses: list[str] = []
    errors: list[str | None] = []
    for refusal, error, size in zip(refusals, fetch_errors, sizes, strict=True):
        if refusal is not None:
            status, error = refusal
        elif size is None:
            status = classify_download_error(error)
        elif config.max_image_bytes is not None and size > config.max_image_bytes:
            status, error = "too_large", f"{size} bytes > max_image_bytes {config.max_image_bytes}"
        else:
            status = SUCCESS
        statuses.append(status)
        errors.append(error)
    return statuses, errors


def _as_text(value: object) -> str | None:
    """Strings pass through; None and non-strings (e.g. a NaN caption) become null."""
    return value if isinstance(value, str) else None


def _stats(statuses: list[str]) -> dict[str, Any]:
    failures = Counter(status for status in statuses if status != SUCCESS)
    return {
        "count": len(statuses),
        "successes": len(statuses) - sum(failures.values()),
        "failures": dict(sorted(failures.items())),
    }
