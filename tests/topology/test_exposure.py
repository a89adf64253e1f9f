"""Every route of every app behind the API keys, path and Host tricks that must not open a door,
keys that never leak, and the gateway's body limit in front of the inference service."""

from __future__ import annotations

import http.server
import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from pendra_api.app import create_app as create_gateway
from pendra_inference.app import create_app as create_inference
from pendra_shared.config import load_settings
from starlette.routing import Route

from pendra.embedded import create_embedded_app
from tests.support.server import ServerProcess, free_port, start_server
from tests.topology.conftest import Stack

OPEN = {"/health", "/ready", "/metrics"}
# The console's page shells and assets: open (they hold no data), each answering as itself.
CONSOLE = {"/": 200, "/console": 307, "/console/": 200, "/console/{page}": 200, "/console/static/{name}": 200}
KEY = "s3cret-key-Zq81"
SAMPLE_PARAMS = {
    "name": "gemma3:270m",
    "job_id": "install:gemma3:270m",
    "path": "models",
    "model": "x",
    "page": "models",
}


def concrete(path: str) -> str:
    return re.sub(r"{(\w+)(?::\w+)?}", lambda m: SAMPLE_PARAMS.get(m.group(1), "x"), path)


def routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route, through included routers (FastAPI wraps them) and the
    documentation routes FastAPI adds itself."""
    found: list[tuple[str, str]] = []
    pending: list[Any] = list(app.routes)
    while pending:
        route = pending.pop(0)
        router = getattr(route, "original_router", None)
        if router is not None:
            prefix = route.include_context.prefix
            for inner in router.routes:
                if prefix:
                    assert isinstance(inner, APIRoute), f"a prefixed route of an unknown kind: {inner!r}"
                    inner = APIRoute(prefix + inner.path, inner.endpoint, methods=inner.methods)
                pending.append(inner)
        elif isinstance(route, APIRoute | Route):
            found += [(method, route.path) for method in sorted(route.methods or ()) if method != "HEAD"]
        else:
            raise AssertionError(f"a route of an unknown kind: {route!r}")
    return found


def raw(base: str, request: str) -> bytes:
    """A request sent byte for byte (clients normalise paths and refuse odd Host values)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request.encode())
        return sock.recv(65536)


@pytest.mark.parametrize("kind", ["compose", "embedded"])
def test_every_route_of_every_app_needs_a_key(make_stack: Callable[..., Stack], kind: str) -> None:
    stack = make_stack(kind, env={"PENDRA_API_KEYS": KEY})
    settings = load_settings()
    if kind == "compose":
        # The gateway's own routes, and every inference route as the gateway exposes it.
        table = routes(create_gateway(settings))
        table += [(m, p) for m, p in routes(create_inference(settings)) if p.startswith("/v1/")]
    else:
        table = routes(create_embedded_app(settings))
    assert len(table) > 15  # the enumeration found the apps' routes, not an empty list
    with httpx.Client(base_url=stack.api_url, timeout=10) as client:
        for method, path in table:
            response = client.request(method, concrete(path), json={} if method == "POST" else None)
            if path in OPEN:
                assert response.status_code in (200, 503), (method, path)
                continue
            if path in CONSOLE:
                url = "/console/static/console.js" if path == "/console/static/{name}" else concrete(path)
                response = client.request(method, url)
                assert response.status_code == CONSOLE[path], (method, path, response.status_code)
                assert "gemma" not in response.text  # a shell: no model, job or setting in it
                continue
            assert response.status_code == 401, (method, path, response.status_code)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["code"] == "invalid_api_key"
        for header in ("Bearer", f"Basic {KEY}", f"bearer{KEY}", f"Bearer {KEY[:-1]}", f"Bearer {KEY}x"):
            response = client.get("/v1/models", headers={"Authorization": header})
            assert response.status_code == 401, header
        assert client.get("/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200

    base = stack.api_url
    tricks = [
        "GET /v1/models HTTP/1.1\r\nHost: x/?\r\n\r\n",
        "GET /v1/models HTTP/1.1\r\nHost: a/#\r\n\r\n",
        "GET /HEALTH HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "GET /health/ HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "GET /health/../v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "GET /health%2f..%2fv1/models HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "GET //v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "GET /v1//models HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "GET /ready/../api/models HTTP/1.1\r\nHost: localhost\r\n\r\n",
        # Two Authorization headers: the first one decides, so a second valid one opens nothing.
        f"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer nope\r\n"
        f"Authorization: Bearer {KEY}\r\n\r\n",
        "GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer \r\n\r\n",
    ]
    for request in tricks:
        head = raw(base, request).split(b"\r\n", 1)[0]
        assert head in (b"HTTP/1.1 401 Unauthorized", b"HTTP/1.1 400 Bad Request"), (request, head)
    # The console's open prefix opens only its own routes: dot segments reach nothing else.
    for path in (
        "/console/../api/models",
        "/console/static/..%2f..%2fapi%2fmodels",
        "/console/%2e%2e/v1/models",
    ):
        answer = raw(base, f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert answer.split(b"\r\n", 1)[0] in (b"HTTP/1.1 404 Not Found", b"HTTP/1.1 400 Bad Request"), path
        assert b"models_dir" not in answer and b'"data"' not in answer, path
    assert raw(base, "GET /metrics?x=/v1 HTTP/1.1\r\nHost: localhost\r\n\r\n").startswith(b"HTTP/1.1 200")

    # The key appears in no log and no metric.
    with httpx.Client(base_url=base, timeout=10) as client:
        client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}-wrong"})
        assert KEY not in client.get("/metrics").text
    assert KEY not in stack.logs()


class Recorder(http.server.ThreadingHTTPServer):
    """A stand-in for the inference service that records what the gateway forwards."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_any(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                recorder.seen.append({"path": self.path, "headers": dict(self.headers), "size": len(body)})
                payload = b'{"object":"list","data":[]}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_any

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[ServerProcess, Recorder]]:
    recorder = Recorder()
    thread = threading.Thread(target=recorder.serve_forever, daemon=True)
    thread.start()
    env = {
        "PENDRA_MODELS_DIR": str(tmp_path / "models"),
        "PENDRA_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "PENDRA_INFERENCE_URL": f"http://127.0.0.1:{recorder.server_address[1]}",
        "PENDRA_API_KEYS": KEY,
        "PENDRA_MAX_BODY_BYTES": "65536",
    }
    server = start_server(env, tmp_path / "api.log", "api", ready_path="/health")
    yield server, recorder
    server.stop()
    recorder.shutdown()
    recorder.server_close()


def test_the_gateway_forwards_no_credentials_and_no_oversized_body(
    gateway: tuple[ServerProcess, Recorder],
) -> None:
    server, recorder = gateway
    auth = {"Authorization": f"Bearer {KEY}", "Cookie": "session=abc"}
    with httpx.Client(base_url=server.base_url, timeout=10, headers=auth) as client:
        assert client.get("/v1/models").status_code == 200
        small = {"model": "m", "messages": [{"role": "user", "content": "x" * 1000}]}
        assert client.post("/v1/chat/completions", json=small).status_code == 200
        big = {"model": "m", "messages": [{"role": "user", "content": "x" * 100_000}]}
        refused = client.post("/v1/chat/completions", json=big)
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "request_too_large"
    assert [seen["path"] for seen in recorder.seen] == ["/v1/models", "/v1/chat/completions"]
    for seen in recorder.seen:
        names = {name.lower() for name in seen["headers"]}
        assert "authorization" not in names and "cookie" not in names
    assert KEY not in server.log()


def test_cors_never_pairs_any_origin_with_credentials(tmp_path: Path) -> None:
    env = {
        "PENDRA_MODELS_DIR": str(tmp_path / "models"),
        "PENDRA_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "PENDRA_CORS_ORIGINS": "*",
        "PENDRA_API_KEYS": KEY,
    }
    server = start_server(env, tmp_path / "api.log", "api", ready_path="/health")
    try:
        preflight = httpx.options(
            f"{server.base_url}/v1/models",
            headers={"Origin": "https://anywhere.example", "Access-Control-Request-Method": "GET"},
            timeout=10,
        )
    finally:
        server.stop()
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in preflight.headers


def test_key_comparison_time_does_not_depend_on_where_a_wrong_key_differs() -> None:
    """With 64 KiB keys a plain comparison would stop at the first differing byte, thousands of
    times sooner for a wrong first byte than a wrong last one; digests make both the same work.
    Medians of interleaved rounds, so a busy machine slows both sides alike."""
    from statistics import median
    from time import perf_counter_ns

    from pendra_api.auth import key_matches

    key = b"k" * 65536
    early, late = b"x" + key[1:], key[:-1] + b"x"
    samples: dict[bytes, list[int]] = {early: [], late: []}
    for _ in range(300):
        for token in (early, late):
            started = perf_counter_ns()
            assert not key_matches(token, [key])
            samples[token].append(perf_counter_ns() - started)
    ratio = median(samples[early]) / median(samples[late])
    assert 0.75 < ratio < 1.33, ratio
