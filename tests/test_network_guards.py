"""What stands between the network and a running `pendra serve`: the body limit, the receive
deadline, the Host allow-list, the refusal to serve an open address, and the draining shutdown.
Each runs against the real server process over real sockets."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pendra_shared.store import ModelStore

from tests.conftest import run_cli
from tests.support.server import ServerProcess, free_port, start_server

CHAT = "gemma3:270m"
GEMMA_EOS = {"1": -100, "106": -100}  # <eos> and <end_of_turn>: the stream runs to max_tokens


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[ServerProcess]:
    """`pendra serve` over an empty store, with small limits so the tests stay quick."""
    env = {
        "PENDRA_MODELS_DIR": str(tmp_path / "models"),
        "PENDRA_MAX_BODY_BYTES": "65536",
        "PENDRA_RECEIVE_TIMEOUT_S": "2",
        "PENDRA_SELFCHECK": "false",
    }
    server = start_server(env, tmp_path / "serve.log")
    yield server
    server.stop()


def host_port(server: ServerProcess) -> tuple[str, int]:
    host, port = server.base_url.removeprefix("http://").split(":")
    return host, int(port)


def assert_clean_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert "Traceback" not in response.text and "/" not in error["message"].replace("/v1", "")


def test_a_body_past_the_limit_is_refused_before_it_is_read(bare: ServerProcess) -> None:
    url = f"{bare.base_url}/v1/chat/completions"
    big = {"model": CHAT, "messages": [{"role": "user", "content": "x" * 100_000}]}
    assert_clean_error(httpx.post(url, json=big, timeout=10), 413, "request_too_large")

    # No Content-Length (chunked): refused once the bytes pass the limit, not after 10 MB arrive.
    sent = [0]

    def chunks() -> Iterator[bytes]:
        for _ in range(160):
            sent[0] += 65536
            yield b"x" * 65536

    try:
        response = httpx.post(url, content=chunks(), timeout=10)
    except httpx.TransportError:
        pass  # the server may close while the client still writes; either way it read no more
    else:
        assert_clean_error(response, 413, "request_too_large")
    assert sent[0] < 160 * 65536

    # Under the limit a body is read whole and reaches the route (here: no such model).
    small = {"model": "nope:1", "messages": [{"role": "user", "content": "x" * 1000}]}
    assert httpx.post(url, json=small, timeout=10).status_code == 404
    assert httpx.get(f"{bare.base_url}/health", timeout=10).json()["status"] == "ok"


def test_a_client_that_trickles_its_request_is_cut_off(bare: ServerProcess) -> None:
    host, port = host_port(bare)
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=10) as slow:
        closed_after = None
        for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n":
            try:
                slow.sendall(bytes([byte]))
                slow.settimeout(0.5)
                if slow.recv(1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                continue
            except OSError:
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None and 1.5 < closed_after < 8, closed_after

    # A body that never finishes is cut off the same way.
    with socket.create_connection((host, port), timeout=10) as slow:
        slow.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        slow.settimeout(8)
        started = time.monotonic()
        assert slow.recv(65536) == b""
        assert time.monotonic() - started < 8

    # A normal client on a fresh connection is served throughout.
    assert httpx.get(f"{bare.base_url}/health", timeout=10).status_code == 200


def test_only_local_host_names_reach_a_loopback_server_without_keys(tmp_path: Path) -> None:
    env = {
        "PENDRA_MODELS_DIR": str(tmp_path / "models"),
        "PENDRA_SELFCHECK": "false",
        "PENDRA_ALLOWED_HOSTS": "pendra.example",
    }
    server = start_server(env, tmp_path / "serve.log")
    try:
        url = f"{server.base_url}/v1/models"
        for host in ("attacker.example", "127.0.0.1.nip.io", "localhost.attacker.example", "x/?"):
            refused = httpx.get(url, headers={"Host": host}, timeout=10)
            assert_clean_error(refused, 403, "host_not_allowed")
        for host in ("localhost", "127.0.0.1", "[::1]:80", "box.local", "gpu.internal", "pendra.example"):
            assert httpx.get(url, headers={"Host": host}, timeout=10).status_code == 200, host
        assert httpx.get(url, headers={"Host": socket.gethostname()}, timeout=10).status_code == 200
    finally:
        server.stop()

    # With API keys the key is the guard, so any name is served to a client that has one.
    keyed = start_server({**env, "PENDRA_API_KEYS": "k1"}, tmp_path / "keyed.log")
    try:
        headers = {"Host": "pendra.example.com", "Authorization": "Bearer k1"}
        assert httpx.get(f"{keyed.base_url}/v1/models", headers=headers, timeout=10).status_code == 200
    finally:
        keyed.stop()


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--host", "0.0.0.0"], {}),
        (["--host", "::"], {}),
        ([], {"PENDRA_PUBLISHED": "0.0.0.0:8080"}),
        ([], {"PENDRA_PUBLISHED": "8080"}),
        (["inference", "--host", "0.0.0.0"], {"PENDRA_API_KEYS": "k1"}),  # inference checks no keys
    ],
)
def test_an_open_address_without_keys_refuses_to_start(
    tmp_path: Path, args: list[str], env: dict[str, str]
) -> None:
    base = {"PENDRA_MODELS_DIR": str(tmp_path / "models"), "PENDRA_SELFCHECK": "false"}
    result = run_cli("serve", *args, "--port", str(free_port()), env={**base, **env}, timeout=60)
    assert result.returncode == 1
    assert "refusing to listen" in result.stderr and "PENDRA_ALLOW_OPEN" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("env", [{"PENDRA_ALLOW_OPEN": "1"}, {"PENDRA_API_KEYS": "k1"}])
def test_an_open_address_starts_with_keys_or_when_allowed(tmp_path: Path, env: dict[str, str]) -> None:
    base = {"PENDRA_MODELS_DIR": str(tmp_path / "models"), "PENDRA_SELFCHECK": "false"}
    server = start_server({**base, **env}, tmp_path / "serve.log", "--host", "0.0.0.0", ready_path="/health")
    server.stop()
    assert server.proc.returncode == 0


@pytest.fixture(scope="module")
def gemma_store(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Path:
    root = tmp_path_factory.mktemp("drain") / "models"
    ModelStore(root).import_file(gemma_path, name=CHAT)
    return root


def start_chat_server(store: Path, log: Path, shutdown_s: float) -> ServerProcess:
    env = {
        "PENDRA_MODELS_DIR": str(store),
        "PENDRA_N_CTX": "1024",
        "PENDRA_PRELOAD": CHAT,
        "PENDRA_SHUTDOWN_TIMEOUT_S": str(shutdown_s),
    }
    return start_server(env, log, timeout_s=180)


def open_stream(server: ServerProcess, client: httpx.Client, max_tokens: int) -> Iterator[str]:
    body = {
        "model": CHAT,
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": GEMMA_EOS,
        "messages": [{"role": "user", "content": "Count slowly."}],
    }
    with client.stream("POST", f"{server.base_url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                yield line.removeprefix("data: ")


def test_sigterm_drains_running_streams_and_refuses_new_requests(gemma_store: Path, tmp_path: Path) -> None:
    server = start_chat_server(gemma_store, tmp_path / "serve.log", shutdown_s=60)
    with httpx.Client(timeout=120) as client:
        events = open_stream(server, client, max_tokens=60)
        first = next(events)  # the stream is running
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        refused = httpx.post(
            f"{server.base_url}/v1/chat/completions",
            json={"model": CHAT, "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        assert_clean_error(refused, 503, "shutting_down")
        assert refused.headers["retry-after"]
        assert httpx.get(f"{server.base_url}/ready", timeout=10).status_code == 503
        rest = [first, *events]
    assert rest[-1] == "[DONE]"
    chunks = [json.loads(event) for event in rest[:-1]]
    assert all("error" not in chunk for chunk in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert server.proc.wait(30) == 0


def test_streams_still_running_at_the_shutdown_timeout_end_with_an_error_event(
    gemma_store: Path, tmp_path: Path
) -> None:
    server = start_chat_server(gemma_store, tmp_path / "serve.log", shutdown_s=1)
    with httpx.Client(timeout=120) as client:
        events = open_stream(server, client, max_tokens=900)
        first = next(events)
        stopped = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        rest = [first, *events]
    assert time.monotonic() - stopped < 15
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert error["code"] == "shutting_down" and error["type"] == "server_error"
    assert server.proc.wait(30) == 0
    assert "draining 1 running request" in server.log()
