"""``seqr registry serve``: serve a registry folder read-only over HTTP, for tests and small
deployments (a real deployment can use any static web server; the files are all it takes).

Only ``metadata/`` and ``targets/`` are served (never the publisher's staging queue or a
client's trusted state), every file goes through registry.store's reads (no symlink followed
at any depth, regular files only), and there are no directory listings. GET and HEAD only.
"""

from __future__ import annotations

import http.server
import os
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

from seqr.core.errors import FormatError
from seqr.registry import layout, store

__all__ = ["RegistryServer"]

_CHUNK = 1 << 20
_TYPES = {".json": "application/json"}


class _Handler(http.server.BaseHTTPRequestHandler):
    server: RegistryServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        self._serve(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(send_body=False)

    def _serve(self, *, send_body: bool) -> None:
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        top = rel.split("/", 1)[0]
        fd = None
        if top in (layout.METADATA, layout.TARGETS) and "/" in rel:
            try:
                fd = store.open_regular(self.server.folder, rel, rel)
            except FormatError:
                fd = None
        if fd is None:
            self.send_error(404, "not found")
            return
        try:
            size = os.fstat(fd).st_size
            self.send_response(200)
            self.send_header(
                "Content-Type", _TYPES.get(Path(rel).suffix, "application/octet-stream")
            )
            self.send_header("Content-Length", str(size))
            self.send_header(
                "Cache-Control", "no-cache" if rel.endswith("timestamp.json") else "max-age=60"
            )
            self.end_headers()
            if send_body:
                sent = 0
                while sent < size and (chunk := os.read(fd, min(_CHUNK, size - sent))):
                    self.wfile.write(chunk)
                    sent += len(chunk)
        finally:
            os.close(fd)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        if not self.server.quiet:
            super().log_message(format, *args)


class RegistryServer(http.server.ThreadingHTTPServer):
    """A static, read-only HTTP server over one registry folder."""

    daemon_threads = True

    def __init__(
        self, folder: Path, host: str = "127.0.0.1", port: int = 0, *, quiet: bool = False
    ):
        self.folder = Path(folder)
        self.quiet = quiet
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/"

    def start(self) -> RegistryServer:
        """Serve in a daemon thread (tests); ``shutdown()`` stops it."""
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self
