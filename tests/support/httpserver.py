"""A real HTTP file server on a loopback port, with Range support and fault injection.

Tests serve real GGUF files from it and tell it how to misbehave: cut the connection after some
bytes, ignore Range headers, or answer 503 a few times before serving.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Faults:
    cut_after: int | None = None  # close the connection after sending this many body bytes
    cuts: int = 0  # ... this many times
    ignore_range: bool = False
    errors_503: int = 0
    throttle_s: float = 0.0  # pause between 64 KiB blocks, to make a download slow
    down_after_cut: bool = False  # after a cut, answer 503 until this is cleared


@dataclass
class RequestLog:
    path: str
    range: str | None
    status: int


@dataclass
class FileServer:
    root: Path
    faults: Faults = field(default_factory=Faults)
    requests: list[RequestLog] = field(default_factory=list)
    httpd: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self.httpd is not None
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def start(self) -> FileServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        import time

        faults = self.faults
        range_header = h.headers.get("Range")
        path = self.root / h.path.lstrip("/")
        if faults.errors_503 > 0 or (faults.down_after_cut and faults.cut_after == -1):
            faults.errors_503 = max(faults.errors_503 - 1, 0)
            self._reply(h, 503, b"busy", range_header)
            return
        if not path.is_file() or ".." in h.path:
            self._reply(h, 404, b"not found", range_header)
            return
        size = path.stat().st_size
        start, end = 0, size - 1
        status = 200
        match = _RANGE_RE.match(range_header or "")
        if match and not faults.ignore_range:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else size - 1
            if start >= size:
                self.requests.append(RequestLog(h.path, range_header, 416))
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            status = 206
        length = end - start + 1
        self.requests.append(RequestLog(h.path, range_header, status))
        h.send_response(status)
        h.send_header("Content-Length", str(length))
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        h.end_headers()
        limit = length
        cut = faults.cut_after is not None and faults.cuts > 0
        if cut:
            assert faults.cut_after is not None
            faults.cuts -= 1
            limit = min(length, faults.cut_after)
        with path.open("rb") as fh:
            fh.seek(start)
            sent = 0
            while sent < limit:
                block = fh.read(min(65536, limit - sent))
                if not block:
                    break
                try:
                    h.wfile.write(block)
                except (BrokenPipeError, ConnectionResetError):
                    return
                sent += len(block)
                if faults.throttle_s:
                    time.sleep(faults.throttle_s)
        if cut:
            if faults.down_after_cut:
                faults.cut_after = -1  # marks "down" until the test clears down_after_cut
            h.wfile.flush()
            h.close_connection = True
            try:
                h.connection.shutdown(2)
            except OSError:
                pass

    def _reply(self, h: BaseHTTPRequestHandler, status: int, body: bytes, rng: str | None) -> None:
        self.requests.append(RequestLog(h.path, rng, status))
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)


def link_or_copy(src: Path, dst: Path) -> Path:
    """Put `src` in the served folder without copying 250 MB when a hard link works."""
    try:
        os.link(src, dst)
    except OSError:
        import shutil

        shutil.copyfile(src, dst)
    return dst
