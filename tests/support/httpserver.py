"""A real HTTP file server on a loopback port, with Range support and fault injection.

Tests serve real GGUF files from it and tell it how to misbehave: cut the connection after some
bytes, ignore Range headers, or answer 503 a few times before serving. `HostileServer` plays a
source that attacks the installer: redirects anywhere, gzip bombs, endless or trickling bodies.
"""

from __future__ import annotations

import os
import re
import ssl
import threading
from collections.abc import Callable
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


# -- hostile servers: redirects, compression bombs, endless and trickling bodies ---------------------

Route = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Seen:
    path: str
    host: str | None
    range: str | None
    accept_encoding: str | None


@dataclass
class HostileServer:
    """A loopback server whose answers are whatever the test routes say, to play the source an
    install must not trust. Each route is a function of the request handler; the methods below
    build the usual ones. `seen` records every request that reached it; `sent` the body bytes
    each route managed to write before the client went away."""

    host: str = "127.0.0.1"
    tls: ssl.SSLContext | None = None  # serve https with this server context
    routes: dict[str, Route] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)
    httpd: ThreadingHTTPServer | None = None
    stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        assert self.httpd is not None
        return int(self.httpd.server_address[1])

    def url(self, path: str, host: str | None = None) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{host or self.host}:{self.port}{path}"

    def start(self) -> HostileServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.seen.append(
                    Seen(self.path, self.headers.get("Host"), self.headers.get("Range"),
                         self.headers.get("Accept-Encoding"))
                )  # fmt: skip
                route = server.routes.get(self.path.split("?")[0])
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                try:
                    route(self)
                except (OSError, ValueError):  # the client left (reset, closed file, TLS EOF)
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer((self.host, 0), Handler)
        self.httpd.daemon_threads = True
        if self.tls is not None:
            self.httpd.socket = self.tls.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()

    def _count(self, path: str, n: int) -> None:
        self.sent[path] = self.sent.get(path, 0) + n

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(status)
            h.send_header("Location", location)
            h.send_header("Content-Length", "0")
            h.end_headers()

        self.routes[path] = route

    def body(self, path: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        """`data` as the body, with a Content-Length and any extra `headers`."""

        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                h.send_header(name, value)
            h.end_headers()
            h.wfile.write(data)
            self._count(path, len(data))

        self.routes[path] = route

    def gzip_bomb(self, path: str, decoded_bytes: int = 50_000_000) -> bytes:
        """`decoded_bytes` zeros, gzip-compressed (about 1000:1), served with Content-Encoding:
        gzip. Returns the compressed body."""
        import gzip

        bomb = gzip.compress(b"\0" * decoded_bytes, compresslevel=9)
        self.body(path, bomb, {"Content-Encoding": "gzip"})
        return bomb

    def endless(self, path: str, block: bytes = b"\xab" * 65536, limit: int = 10 * 1024**3) -> None:
        """A chunked body with no Content-Length that goes on until the client leaves (or
        `limit` bytes): the server that would fill the disk."""

        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            sent = 0
            while sent < limit and not self.stopping.is_set():
                h.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                sent += len(block)
                self._count(path, len(block))
            h.wfile.write(b"0\r\n\r\n")

        self.routes[path] = route

    def trickle(self, path: str, length: int, every_s: float, byte: bytes = b"x") -> None:
        """Announce `length` bytes, then send one byte every `every_s` seconds (slowloris)."""

        def route(h: BaseHTTPRequestHandler) -> None:
            match = _RANGE_RE.match(h.headers.get("Range") or "")
            start = int(match.group(1)) if match else 0
            h.send_response(206 if start else 200)
            h.send_header("Content-Length", str(length - start))
            if start:
                h.send_header("Content-Range", f"bytes {start}-{length - 1}/{length}")
            h.end_headers()
            for _ in range(length - start):
                if self.stopping.wait(every_s):
                    return
                h.wfile.write(byte)
                h.wfile.flush()
                self._count(path, 1)

        self.routes[path] = route
