"""HTTP server on 127.0.0.1 that serves a folder, so img2dataset really downloads in local runs.

Input: a root folder. Output: URLs (`base_url`, `url(relpath)`) answered from a background thread.
Besides plain files it has the routes the bad-input corpus needs:
  /status/<code>           answers with that HTTP error code (e.g. /status/404)
  /slow/<seconds>/<file>   waits, then serves <file>; other requests are served meanwhile
  /as-html/<file>          serves <file>'s bytes with Content-Type text/html
  /noai/<file>             serves <file> with the header "X-Robots-Tag: noai"
  /redirect?to=<url>       answers 302 with Location <url>
`closed_port_url()` gives a URL on 127.0.0.1 where nothing listens (connection refused).
"""

from __future__ import annotations

import functools
import socket
import threading
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, quote

LOOPBACK_HOST = "127.0.0.1"
MAX_SLOW_SECONDS = 120.0


class _CorpusRequestHandler(SimpleHTTPRequestHandler):
    """Static files plus the special routes listed in the module docstring."""

    server: _LoopbackHTTPServer
    _content_type_override: str | None = None
    _extra_headers: tuple[tuple[str, str], ...] = ()

    def do_GET(self) -> None:  # noqa: N802 (name fixed by BaseHTTPRequestHandler)
        if self._route():
            super().do_GET()

    def do_HEAD(self) -> None:  # noqa: N802
        if self._route():
            super().do_HEAD()

    def _route(self) -> bool:
        """Apply a special route; True when the (rewritten) path should be served as a file."""
        path, _, query = self.path.partition("?")
        parts = path.lstrip("/").split("/")
        if parts[0] == "redirect":
            return self._redirect(query)
        if parts[0] == "status" and len(parts) == 2:
            return self._send_status(parts[1])
        if parts[0] == "slow" and len(parts) >= 3:
            return self._wait_then_serve(parts[1], parts[2:])
        if parts[0] == "as-html" and len(parts) >= 2:
            self._content_type_override = "text/html"
            self.path = "/" + "/".join(parts[1:])
        elif parts[0] == "noai" and len(parts) >= 2:
            self._extra_headers = (("X-Robots-Tag", "noai"),)
            self.path = "/" + "/".join(parts[1:])
        return True

    def _redirect(self, query: str) -> bool:
        targets = parse_qs(query).get("to")
        if not targets:
            self.send_error(HTTPStatus.BAD_REQUEST)
            return False
        self.send_response(HTTPStatus.FOUND)
        self.send_header("Location", targets[0])
        self.send_header("Content-Length", "0")
        self.end_headers()
        return False

    def _send_status(self, code_text: str) -> bool:
        code = int(code_text) if code_text.isdigit() else 0
        if not 400 <= code <= 599:
            code = HTTPStatus.BAD_REQUEST
        self.send_error(code)
        return False

    def _wait_then_serve(self, seconds_text: str, file_parts: list[str]) -> bool:
        try:
            seconds = min(float(seconds_text), MAX_SLOW_SECONDS)
        except ValueError:
            self.send_error(HTTPStatus.BAD_REQUEST)
            return False
        # Waiting on the stop event (not time.sleep) lets stop() end slow requests at once.
        if self.server.stop_event.wait(max(seconds, 0.0)):
            return False
        self.path = "/" + "/".join(file_parts)
        return True

    def guess_type(self, path: str | Path) -> str:
        return self._content_type_override or super().guess_type(path)

    def end_headers(self) -> None:
        for name, value in self._extra_headers:
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return


class _LoopbackHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    stop_event: threading.Event

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients that give up early (timeouts in the bad-input corpus) reset the connection.
        return


class LoopbackServer:
    """Serves `root` over HTTP on 127.0.0.1 at a free port; use as a context manager."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._server: _LoopbackHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:<port>, without a trailing slash; only valid after start()."""
        if self._server is None:
            raise RuntimeError("LoopbackServer is not started")
        return f"http://{LOOPBACK_HOST}:{self._server.server_address[1]}"

    def url(self, relpath: str | Path) -> str:
        """The URL that serves root/relpath."""
        return f"{self.base_url}/{quote(Path(relpath).as_posix())}"

    def start(self) -> LoopbackServer:
        if self._server is not None:
            return self
        if not self.root.is_dir():
            raise FileNotFoundError(f"LoopbackServer root is not a folder: {self.root}")
        handler = functools.partial(_CorpusRequestHandler, directory=str(self.root))
        server = _LoopbackHTTPServer((LOOPBACK_HOST, 0), handler)
        server.stop_event = threading.Event()
        self._server = server
        # A short poll interval keeps stop() (which waits for one poll) fast in tests.
        serve = functools.partial(server.serve_forever, poll_interval=0.05)
        self._thread = threading.Thread(target=serve, name="loopback-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.stop_event.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def closed_port_url() -> str:
    """An http://127.0.0.1:<port>/x URL where nothing listens, so connecting is refused."""
    # The port is free the moment it is read; another process could take it later, which
    # the OS makes unlikely by not reusing a just-released ephemeral port at once.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK_HOST, 0))
        port = probe.getsockname()[1]
    return f"http://{LOOPBACK_HOST}:{port}/x"
