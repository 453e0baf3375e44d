"""Chunk-level rules of the data workflow that need no Ray: chunking, duplicate urls, and the
guard that keeps a dying run from recording its own source's death as url failures."""

import pyarrow as pa
import pytest

from components.data.loopback_server import LoopbackServer, closed_port_url
from pipelines.data import _chunk_rows
from pipelines.data_chunks import SourceGoneError, _check_source_alive, _resolve_url

pytestmark = pytest.mark.unit


def test_chunks_keep_order_and_mark_repeated_urls():
    source = pa.table(
        {
            "sample_key": [f"{i:09d}" for i in range(5)],
            "url": ["a", "b", "a", "c", "b"],
            "caption": ["x"] * 5,
        }
    )
    chunks = _chunk_rows(source, chunk_size=2)
    assert [[row["sample_key"] for row in chunk] for chunk in chunks] == [
        ["000000000", "000000001"],
        ["000000002", "000000003"],
        ["000000004"],
    ]
    flags = [row["duplicate_url"] for chunk in chunks for row in chunk]
    assert flags == [False, False, True, False, True]


def test_relative_urls_resolve_only_against_a_served_source():
    assert _resolve_url("img/1.jpg", "http://127.0.0.1:9/") == "http://127.0.0.1:9/img/1.jpg"
    assert _resolve_url("https://x.org/1.jpg", "http://127.0.0.1:9/") == "https://x.org/1.jpg"
    assert _resolve_url("img/1.jpg", "") == "img/1.jpg"


def test_refused_rows_against_a_dead_served_source_are_not_recorded(tmp_path):
    dead_base = closed_port_url().rsplit("/", 1)[0] + "/"
    rows = [{"url": f"{dead_base}a.jpg", "status": "connection_refused"}]
    with pytest.raises(SourceGoneError, match="is gone"):
        _check_source_alive(rows, dead_base)
    with LoopbackServer(tmp_path) as server:
        alive = [{"url": f"{server.base_url}/status/404", "status": "connection_refused"}]
        _check_source_alive(alive, server.base_url)
    external = [{"url": "http://203.0.113.9/a.jpg", "status": "timeout"}]
    _check_source_alive(external, dead_base)
    _check_source_alive(rows, "")
