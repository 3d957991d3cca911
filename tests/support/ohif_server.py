"""Serve the built OHIF viewer and Orthanc's DICOMweb from one origin (tests only).

``OhifServer`` is a small threaded HTTP server on a free loopback port:
- ``/app-config.js``: tests/ohif/app-config.js (our configuration),
- ``/dicom-web/...`` and ``/wado``: proxied to Orthanc (basic auth added here,
  so the browser never holds Orthanc credentials; the Host header is kept so
  Orthanc writes BulkDataURIs on this origin),
- anything else: a file of @ohif/app's ``dist/``, or ``index.html`` for the
  viewer's client-side routes (``/viewer?StudyInstanceUIDs=...``).

Pages are cross-origin isolated (COOP/COEP) as OHIF asks, for SharedArrayBuffer.
"""

from __future__ import annotations

import mimetypes
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx

OHIF_DIR = Path(__file__).resolve().parents[1] / "ohif"
DIST = OHIF_DIR / "node_modules" / "@ohif" / "app" / "dist"
APP_CONFIG = OHIF_DIR / "app-config.js"
PROXIED = ("/dicom-web/", "/wado")
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}

mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet in tests
        return

    def _isolation(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")

    def _send(
        self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self._isolation()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {
            k: v for k, v in self.headers.items() if k.lower() not in _HOP | {"authorization"}
        }
        try:
            r = self.server.orthanc.request(self.command, self.path, content=body, headers=headers)
        except httpx.HTTPError as exc:
            self._send(502, f"Orthanc unreachable: {exc}".encode(), "text/plain")
            return
        self.server.proxied.append((self.command, self.path.split("?")[0], r.status_code))
        extra = {k: v for k, v in r.headers.items() if k.lower() not in _HOP | {"content-type"}}
        self._send(
            r.status_code,
            r.content,
            r.headers.get("content-type", "application/octet-stream"),
            extra,
        )

    def _static(self) -> None:
        path = urlsplit(self.path).path
        if path == "/app-config.js":
            self._send(
                200, APP_CONFIG.read_bytes(), "text/javascript", {"Cache-Control": "no-store"}
            )
            return
        target = (DIST / path.lstrip("/")).resolve()
        if not target.is_relative_to(DIST.resolve()) or not target.is_file():
            if "." in path.rsplit("/", 1)[-1]:
                self._send(404, b"not found", "text/plain")
                return
            target = DIST / "index.html"  # client-side route of the viewer
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        self._send(200, target.read_bytes(), ctype)

    def _route(self) -> None:
        if self.path.startswith(PROXIED):
            self._proxy()
        elif self.command in ("GET", "HEAD"):
            self._static()
        else:
            self._send(405, b"method not allowed", "text/plain")

    do_GET = do_HEAD = do_POST = _route


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    orthanc: httpx.Client
    proxied: list[tuple[str, str, int]]


class OhifServer:
    """The viewer at ``url``; ``proxied`` lists (method, path, status) sent to Orthanc."""

    def __init__(self, orthanc_url: str, auth: tuple[str, str] | None = None) -> None:
        if not (DIST / "index.html").is_file():
            raise FileNotFoundError(f"{DIST} missing: run `npm ci` in tests/ohif")
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.orthanc = httpx.Client(base_url=orthanc_url, auth=auth, timeout=60)
        self._server.proxied = []
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def proxied(self) -> list[tuple[str, str, int]]:
        return self._server.proxied

    def __enter__(self) -> OhifServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._server.orthanc.close()
        self._thread.join(timeout=10)
