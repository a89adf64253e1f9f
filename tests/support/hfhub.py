"""A loopback stand-in for the Hugging Face Hub: the tree API as huggingface_hub's `list_repo_tree`
reads it (a JSON list of files and folders, LFS files carrying `lfs.oid`, pages chained by a `Link`
header), and files under `/<owner>/<repo>/resolve/<revision>/<path>` served with Range support."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from tests.support.httpserver import FileServer

TREE = "/api/models/owner/Model-GGUF/tree/main"


class FakeHub:
    """The tree API from `pages` (one list of items per page) or, for a path in `replies`, that
    status, headers and body; 404 for any other repo. Everything outside /api/ comes from the files
    under `root`, with FileServer's Range support."""

    def __init__(self, root: Path) -> None:
        self.files = FileServer(root)
        self.pages: dict[str, list[list[dict[str, Any]]]] = {}
        self.replies: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.next_base: str | None = None  # where `Link: rel="next"` points; this server if None
        self.api_requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                hub.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        host, port = self.httpd.server_address[:2]
        self.endpoint = f"http://{host!s}:{port}"

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        path, _, query = h.path.partition("?")
        if not path.startswith("/api/"):
            self.files.handle(h)
            return
        self.api_requests.append(h.path)
        headers: dict[str, str] = {}
        status, body = 404, b'{"error": "Repository not found"}'
        if path in self.replies:
            status, headers, body = self.replies[path]
        elif path in self.pages:
            pages = self.pages[path]
            page = int(parse_qs(query).get("page", ["0"])[0])
            status, body = 200, json.dumps(pages[page]).encode()
            if page + 1 < len(pages):
                link = f"{self.next_base or self.endpoint}{path}?recursive=true&page={page + 1}"
                headers = {"Link": f'<{link}>; rel="next"'}
        h.send_response(status)
        for key, value in {"Content-Type": "application/json", **headers}.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def tree(self, *items: dict[str, Any], path: str = TREE) -> None:
        self.pages[path] = [list(items)]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
