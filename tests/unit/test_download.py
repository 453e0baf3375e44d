"""download_chunk against a loopback server: one row per input row, original bytes, reasons."""

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.data.demo_corpus import write_synthetic_corpus
from components.data.download import (
    DOWNLOAD_FAILURE_REASONS,
    DOWNLOAD_FILE_NAME,
    OUTPUT_COLUMNS,
    DownloadConfig,
    classify_download_error,
    download_chunk,
)
from components.data.loopback_server import closed_port_url
from components.data.url_policy import UrlPolicyConfig
from tests.loopback_routes import RoutedLoopbackServer

pytestmark = pytest.mark.unit

OUTPUT_NAMES = [name for name, _ in OUTPUT_COLUMNS]
# Generous enough for a loaded 2-core CI box; the slow route waits 3 s, well past it.
FAST = DownloadConfig(thread_count=8, timeout_seconds=1.5, retries=0)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import img2dataset.downloader  # noqa: F401  (its one-off ~2 s import belongs in setup)

    root = tmp_path_factory.mktemp("served")
    items = write_synthetic_corpus(root, count=4, seed=7, max_side_px=96)
    with RoutedLoopbackServer(root) as server:
        yield root, server, items


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _read(path):
    return pq.read_table(path).to_pylist()


def test_one_row_per_input_with_classified_statuses(served, tmp_path):
    root, server, items = served
    jpg, png = items[0].relpath, items[3].relpath
    cases = {
        "good_jpg": server.url(jpg),
        "good_png": server.url(png),
        "as_html": f"{server.base_url}/as-html/{jpg}",
        "missing": f"{server.base_url}/status/404",
        "server_error": f"{server.base_url}/status/503",
        "refused": closed_port_url(),
        "slow": f"{server.base_url}/slow/3/{jpg}",
        "noai": f"{server.base_url}/noai/{jpg}",
        "ftp": "ftp://127.0.0.1/pub/a.jpg",
        "no_url": None,
    }
    rows = [
        {"key": key, "url": url, "caption": f"caption {key}", "aesthetic_score": 6.5}
        for key, url in cases.items()
    ]
    result = download_chunk(rows, out_dir=tmp_path / "chunk", config=FAST)
    written = _read(result.path)
    assert [row["key"] for row in written] == list(cases)
    status = {row["key"]: row["status"] for row in written}
    assert status == {
        "good_jpg": "success",
        "good_png": "success",
        "as_html": "success",
        "missing": "http_404",
        "server_error": "http_error",
        "refused": "connection_refused",
        "slow": "timeout",
        "noai": "robots_disallowed",
        "ftp": "scheme_not_allowed",
        "no_url": "malformed_url",
    }
    for row in written:
        assert row["aesthetic_score"] == 6.5 and row["caption"] == f"caption {row['key']}"
        assert (row["image"] is None) == (row["status"] != "success")
        assert (row["error_message"] is None) == (row["status"] == "success")
    assert result.stats["count"] == len(cases) and result.stats["successes"] == 3
    schema = pq.read_schema(result.path)
    assert schema.names == [*OUTPUT_NAMES, "aesthetic_score"]
    assert schema.field("image").type == pa.large_binary()
    assert sum(result.stats["failures"].values()) == len(cases) - 3
    assert set(result.stats["failures"]) <= set(DOWNLOAD_FAILURE_REASONS)


def test_original_bytes_are_kept_byte_for_byte(served, tmp_path):
    root, server, items = served
    rows = [
        {"key": item.relpath, "url": server.url(item.relpath), "caption": None} for item in items
    ]
    written = _read(download_chunk(rows, out_dir=tmp_path, config=FAST).path)
    assert all(row["status"] == "success" for row in written)
    for row in written:
        assert _sha256(row["image"]) == _sha256((root / row["key"]).read_bytes())
        assert row["caption"] is None


def test_url_policy_refuses_before_any_request(served, tmp_path):
    _, server, items = served
    rows = [
        {"key": "a", "url": server.url(items[0].relpath), "caption": "x"},
        {"key": "b", "url": "http://169.254.169.254/latest/meta-data/", "caption": "x"},
    ]
    strict = download_chunk(rows, out_dir=tmp_path, config=FAST, url_policy=UrlPolicyConfig())
    assert [row["status"] for row in _read(strict.path)] == ["loopback_address", "metadata_address"]
    loopback_ok = UrlPolicyConfig(allow_hosts=("127.0.0.1",))
    allowed = download_chunk(rows[:1], out_dir=tmp_path, config=FAST, url_policy=loopback_ok)
    assert [row["status"] for row in _read(allowed.path)] == ["success"]


def test_too_large_drops_the_bytes(served, tmp_path):
    _, server, items = served
    rows = [{"key": "a", "url": server.url(items[0].relpath), "caption": "x"}]
    config = DownloadConfig(timeout_seconds=2.0, max_image_bytes=64)
    (row,) = _read(download_chunk(rows, out_dir=tmp_path, config=config).path)
    assert row["status"] == "too_large" and row["image"] is None


def test_rerun_after_a_kill_cleans_up_and_replaces(served, tmp_path):
    _, server, items = served
    stale_dir = tmp_path / ".download-partial-999-deadbeef"
    stale_dir.mkdir()
    (stale_dir / "0.parquet").write_bytes(b"half written")
    (tmp_path / f"{DOWNLOAD_FILE_NAME}.tmp-999").write_bytes(b"half written")
    rows = [{"key": "a", "url": server.url(items[0].relpath), "caption": "x"}]
    result = download_chunk(rows, out_dir=tmp_path, config=FAST)
    assert sorted(path.name for path in tmp_path.iterdir()) == [DOWNLOAD_FILE_NAME]
    assert [row["key"] for row in _read(result.path)] == ["a"]


def test_empty_chunk_writes_an_empty_file(tmp_path):
    result = download_chunk([], out_dir=tmp_path, config=FAST)
    assert pq.read_table(result.path).num_rows == 0
    assert result.stats == {"count": 0, "successes": 0, "failures": {}}


@pytest.mark.parametrize(
    "rows",
    [
        [{"url": "http://127.0.0.1/a"}],
        [{"key": "a", "url": "x"}, {"key": "a", "url": "y"}],
        [{"key": "a", "url": "x", "status": "success"}],
    ],
)
def test_rows_break_the_contract(rows, tmp_path):
    with pytest.raises(ValueError, match="rows"):
        download_chunk(rows, out_dir=tmp_path, config=FAST)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("HTTP Error 404: Not Found", "http_404"),
        ("HTTP Error 500: Internal Server Error", "http_error"),
        ("<urlopen error [Errno 111] Connection refused>", "connection_refused"),
        ("<urlopen error timed out>", "timeout"),
        ("The read operation timed out", "timeout"),
        ("<urlopen error [Errno -2] Name or service not known>", "unresolvable_host"),
        ("Use of image disallowed by X-Robots-Tag directive", "robots_disallowed"),
        ("<urlopen error unknown url type: gopher>", "scheme_not_allowed"),
        ("Remote end closed connection without response", "other_download_error"),
        (None, "other_download_error"),
    ],
)
def test_classify_download_error(message, reason):
    assert classify_download_error(message) == reason


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"thread_count": 0}, "thread_count"),
        ({"timeout_seconds": 0.0}, "timeout_seconds"),
        ({"retries": -1}, "retries"),
        ({"max_image_bytes": 0}, "max_image_bytes"),
        ({"user_agent_token": " "}, "user_agent_token"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DownloadConfig(**kwargs)


def test_redirects_are_checked_against_the_policy(served, tmp_path):
    root, server, items = served
    policy = UrlPolicyConfig(allow_hosts=("127.0.0.1",), resolve_hostnames=False)
    local_target = server.url(items[0].relpath)
    rows = [
        {"key": "to_loopback", "url": f"{server.base_url}/redirect?to={local_target}"},
        {"key": "to_private", "url": f"{server.base_url}/redirect?to=http://10.1.2.3/a.jpg"},
        {"key": "to_metadata", "url": f"{server.base_url}/redirect?to=http://169.254.169.254/"},
    ]
    result = download_chunk(rows, out_dir=tmp_path / "chunk", config=FAST, url_policy=policy)
    written = {row["key"]: row for row in _read(result.path)}
    assert written["to_loopback"]["status"] == "success"
    assert _sha256(written["to_loopback"]["image"]) == _sha256(
        (root / items[0].relpath).read_bytes()
    )
    for key, reason in (("to_private", "private_address"), ("to_metadata", "metadata_address")):
        assert written[key]["status"] == "redirect_refused"
        assert reason in written[key]["error_message"]
