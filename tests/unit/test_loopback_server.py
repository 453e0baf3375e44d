"""Loopback server: serves files and nothing else. The tests' routed server
(tests/loopback_routes.py) answers the special routes and never blocks on a slow request."""

import http.client
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest

from components.data.loopback_server import LoopbackServer, closed_port_url
from tests.loopback_routes import RoutedLoopbackServer

pytestmark = pytest.mark.unit

PIC = b"\xff\xd8 fake jpeg bytes"


def _write_root(root):
    (root / "sub").mkdir()
    (root / "sub" / "pic.jpg").write_bytes(PIC)
    (root / "sub" / "index.html").write_bytes(b"<html></html>")


@pytest.fixture
def server(tmp_path):
    _write_root(tmp_path)
    with LoopbackServer(tmp_path) as running:
        yield running


@pytest.fixture
def routed(tmp_path):
    _write_root(tmp_path)
    with RoutedLoopbackServer(tmp_path) as running:
        yield running


def _get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.headers, response.read()


def _raw_get(base_url, path):
    """(status, headers) without following redirects."""
    connection = http.client.HTTPConnection(urlsplit(base_url).netloc, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status, response.headers
    finally:
        connection.close()


def test_serves_files_on_loopback(server):
    assert server.base_url.startswith("http://127.0.0.1:")
    status, headers, body = _get(server.url("sub/pic.jpg"))
    assert (status, body) == (200, PIC)
    assert headers["Content-Type"] == "image/jpeg"


@pytest.mark.parametrize(
    "path",
    [
        "/sub/missing.jpg",
        "/",
        "/sub",
        "/sub/",
        "/status/500",
        "/as-html/sub/pic.jpg",
        "/noai/sub/pic.jpg",
        "/slow/0/sub/pic.jpg",
        "/redirect?to=http://169.254.169.254/latest/meta-data/",
        "/redirect?to=/sub/pic.jpg",
    ],
)
def test_anything_but_a_file_is_a_plain_404(server, path):
    status, headers = _raw_get(server.base_url, path)
    assert status == 404 and "Location" not in headers
    assert "X-Robots-Tag" not in headers


def test_routed_status_route(routed):
    with pytest.raises(urllib.error.HTTPError) as raised:
        _get(routed.base_url + "/status/404")
    assert raised.value.code == 404
    assert _raw_get(routed.base_url, "/status/503")[0] == 503


def test_routed_as_html_and_noai_keep_the_bytes(routed):
    _, headers, body = _get(routed.base_url + "/as-html/sub/pic.jpg")
    assert headers["Content-Type"] == "text/html" and body == PIC
    _, headers, body = _get(routed.base_url + "/noai/sub/pic.jpg")
    assert headers["X-Robots-Tag"] == "noai" and body == PIC


def test_routed_redirect_points_where_asked(routed):
    status, headers = _raw_get(routed.base_url, "/redirect?to=http://10.1.2.3/a.jpg")
    assert (status, headers["Location"]) == (302, "http://10.1.2.3/a.jpg")


def test_slow_route_does_not_block_other_requests(routed):
    slow_result = {}

    def fetch_slow():
        started = time.monotonic()
        slow_result["body"] = _get(routed.base_url + "/slow/0.6/sub/pic.jpg")[2]
        slow_result["seconds"] = time.monotonic() - started

    slow_thread = threading.Thread(target=fetch_slow)
    slow_thread.start()
    time.sleep(0.05)
    started = time.monotonic()
    assert _get(routed.url("sub/pic.jpg"))[0] == 200
    assert time.monotonic() - started < 0.3
    slow_thread.join(timeout=5)
    assert slow_result["body"] == PIC
    assert slow_result["seconds"] >= 0.55


def test_slow_route_times_out_a_short_client_timeout(routed):
    with pytest.raises(TimeoutError):
        _get(routed.base_url + "/slow/2/sub/pic.jpg", timeout=0.2)


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
