"""HTTP server on 127.0.0.1 that serves a folder, so img2dataset really downloads in local runs.

Input: a root folder. Output: URLs (`base_url`, `url(relpath)`) answered from a background thread.
It serves the folder's files and nothing else: no directory listings, no redirects, no other
routes (a path that is not a file is a 404). `closed_port_url()` gives a URL on 127.0.0.1 where
nothing listens (connection refused).
"""

from __future__ import annotations

import functools
import socket
import threading
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import BinaryIO
from urllib.parse import quote

LOOPBACK_HOST = "127.0.0.1"


class FileRequestHandler(SimpleHTTPRequestHandler):
    """GET and HEAD of the files under the server's root; anything else is a 404 (a folder
    gets no listing and no redirect to its index)."""

    server: _LoopbackHTTPServer

    def send_head(self) -> BinaryIO | None:
        if not Path(self.translate_path(self.path)).is_file():
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None
        return super().send_head()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return


class _LoopbackHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    stop_event: threading.Event
    """Set by LoopbackServer.stop(), so a handler that waits can give up at once."""

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients that give up early (download timeouts) reset the connection.
        return


class LoopbackServer:
    """Serves `root` over HTTP on 127.0.0.1 at a free port; use as a context manager.

    `handler_class` answers the requests; a subclass of FileRequestHandler may add routes.
    """

    handler_class: type[FileRequestHandler] = FileRequestHandler

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
        handler = functools.partial(self.handler_class, directory=str(self.root))
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
