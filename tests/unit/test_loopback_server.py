"""Loopback server: serves files, answers the special routes, never blocks on a slow request."""

import threading
import time
import urllib.error
import urllib.request

import pytest

from components.data.loopback_server import LoopbackServer, closed_port_url

pytestmark = pytest.mark.unit


@pytest.fixture
def server(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "pic.jpg").write_bytes(b"\xff\xd8 fake jpeg bytes")
    with LoopbackServer(tmp_path) as running:
        yield running


def _get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.headers, response.read()


def test_serves_files_on_loopback(server):
    assert server.base_url.startswith("http://127.0.0.1:")
    status, headers, body = _get(server.url("sub/pic.jpg"))
    assert (status, body) == (200, b"\xff\xd8 fake jpeg bytes")
    assert headers["Content-Type"] == "image/jpeg"


@pytest.mark.parametrize("path", ["/status/404", "/sub/missing.jpg"])
def test_not_found(server, path):
    with pytest.raises(urllib.error.HTTPError) as raised:
        _get(server.base_url + path)
    assert raised.value.code == 404


def test_as_html_and_noai_routes_keep_the_bytes(server):
    _, headers, body = _get(server.base_url + "/as-html/sub/pic.jpg")
    assert headers["Content-Type"] == "text/html" and body == b"\xff\xd8 fake jpeg bytes"
    _, headers, body = _get(server.base_url + "/noai/sub/pic.jpg")
    assert headers["X-Robots-Tag"] == "noai" and body == b"\xff\xd8 fake jpeg bytes"


def test_slow_route_does_not_block_other_requests(server):
    slow_result = {}

    def fetch_slow():
        started = time.monotonic()
        slow_result["body"] = _get(server.base_url + "/slow/0.6/sub/pic.jpg")[2]
        slow_result["seconds"] = time.monotonic() - started

    slow_thread = threading.Thread(target=fetch_slow)
    slow_thread.start()
    time.sleep(0.05)
    started = time.monotonic()
    assert _get(server.url("sub/pic.jpg"))[0] == 200
    assert time.monotonic() - started < 0.3
    slow_thread.join(timeout=5)
    assert slow_result["body"] == b"\xff\xd8 fake jpeg bytes"
    assert slow_result["seconds"] >= 0.55


def test_slow_route_times_out_a_short_client_timeout(server):
    with pytest.raises(TimeoutError):
        _get(server.base_url + "/slow/2/sub/pic.jpg", timeout=0.2)


def test_stop_frees_the_port_and_closed_port_refuses(tmp_path):
    server = LoopbackServer(tmp_path).start()
    url = server.base_url + "/"
    server.stop()
    with pytest.raises(urllib.error.URLError, match="refused"):
        _get(url)
    with pytest.raises(urllib.error.URLError, match="refused"):
        _get(closed_port_url())


def test_base_url_needs_a_started_server(tmp_path):
    with pytest.raises(RuntimeError, match="not started"):
        _ = LoopbackServer(tmp_path).base_url
