"""Test-only routes for the loopback server, for the tests that need a misbehaving web server.

`RoutedLoopbackServer(root)` serves root's files like `LoopbackServer` and also answers:
  /status/<code>           with that HTTP error code (e.g. /status/404)
  /slow/<seconds>/<file>   after waiting (other requests are served meanwhile), with <file>
  /as-html/<file>          with <file>'s bytes and Content-Type text/html
  /noai/<file>             with <file> and the header "X-Robots-Tag: noai"
  /redirect?to=<url>       with 302 and Location <url> (an open redirect: tests only)
"""

from __future__ import annotations

from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs

from components.data.loopback_server import FileRequestHandler, LoopbackServer

MAX_SLOW_SECONDS = 120.0


class RoutedRequestHandler(FileRequestHandler):
    """Static files plus the routes listed in the module docstring."""

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


class RoutedLoopbackServer(LoopbackServer):
    """A LoopbackServer whose requests go through RoutedRequestHandler."""

    handler_class = RoutedRequestHandler
