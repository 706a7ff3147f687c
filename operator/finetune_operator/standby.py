"""The liveness endpoint of an operator that stands by while another one holds the Lease.

A standby answers its probes, as a client-go controller's healthz does while it waits for
leadership: it is a healthy pod, ready to take over. So a Deployment of several replicas rolls
out (its pods become Ready), a rolling update brings up the new pod before the old one stops, and
the kubelet does not restart a standby for waiting. It answers `standby`, not kopf's JSON, and
gives the port up once it holds the Lease, for kopf's own endpoint (`kopf.run`'s
`liveness_endpoint`), which answers only once kopf runs.
"""

from __future__ import annotations

import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self

BODY = b"standby\n"


class StandbyEndpoint:
    """`start` serves `url`'s path (200 `standby`) from a thread; `stop` (or leaving the `with`
    block) closes the port. Nothing is served until `start`, so that an operator that acquires
    the Lease at once never answers before kopf does."""

    def __init__(self, url: str) -> None:
        # Parsed as kopf parses its liveness endpoint, so that both serve the same address.
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"unsupported liveness endpoint {url!r}: only http:// is served")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        if self._server is not None:
            return
        path = self.path

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                found = self.path.split("?", 1)[0] == path
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(BODY if found else b"not found\n")

            def log_message(self, format: str, *args: object) -> None:
                pass  # a probe every few seconds is not worth a log line

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="standby", daemon=True).start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
