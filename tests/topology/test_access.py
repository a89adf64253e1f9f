"""API keys and CORS on the gateway, and `pendra models` acting through a running API."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import run_cli
from tests.support import api
from tests.support.server import free_port, start_server
from tests.topology.conftest import Stack


def raw_get(base: str, target: str, key: str) -> bytes:
    """A GET sent as written (HTTP clients resolve dot segments before sending)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        return sock.recv(65536)


@pytest.mark.parametrize("kind", ["compose", "embedded"])
def test_api_keys_guard_everything_but_health_ready_and_metrics(
    make_stack: Callable[..., Stack], kind: str
) -> None:
    stack = make_stack(
        kind, env={"PENDRA_API_KEYS": "key-one, key-two", "PENDRA_CORS_ORIGINS": "https://console.example"}
    )
    base = stack.api_url
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(base + path, timeout=10).status_code == 200, path

    for path in ("/v1/models", "/api/models", "/api/catalogue"):
        refused = httpx.get(base + path, timeout=10)
        assert refused.status_code == 401, path
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert refused.headers["www-authenticate"] == "Bearer"
    wrong = httpx.get(f"{base}/api/models", headers={"Authorization": "Bearer key-three"}, timeout=10)
    assert wrong.status_code == 401 and "invalid API key" in wrong.json()["error"]["message"]
    prefix = httpx.get(f"{base}/api/models", headers={"Authorization": "Bearer key-on"}, timeout=10)
    assert prefix.status_code == 401

    longer = httpx.get(f"{base}/api/models", headers={"Authorization": "Bearer key-one-more"}, timeout=10)
    assert longer.status_code == 401  # keys are compared as SHA-256 digests, whatever their length
    # Dot segments never leave /v1 (F12 in the hardening notes): httpx would resolve them upstream.
    for raw in ("/v1/../metrics", "/v1/%2e%2e/metrics", "/v1/models/../../ready"):
        assert raw_get(base, raw, "key-one").startswith(b"HTTP/1.1 404"), raw

    with openai.OpenAI(base_url=f"{base}/v1", api_key="key-two", max_retries=0) as client:
        assert client.models.list().data == []
    with openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()

    preflight = httpx.options(
        f"{base}/v1/chat/completions",
        headers={
            "Origin": "https://console.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
        timeout=10,
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://console.example"
    stranger = httpx.options(
        f"{base}/v1/models",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        timeout=10,
    )
    assert "access-control-allow-origin" not in stranger.headers


@pytest.mark.parametrize("kind", ["compose", "embedded"])
def test_the_cli_installs_lists_and_uninstalls_through_the_api(
    make_stack: Callable[..., Stack], kind: str
) -> None:
    stack = make_stack(kind, env={"PENDRA_API_KEYS": "cli-key"})
    env = {"PENDRA_API_URL": stack.api_url, "PENDRA_API_KEY": "cli-key", "PENDRA_MODELS_DIR": "/nonexistent"}

    installed = run_cli("models", "install", "gemma3:270m", env=env)
    assert installed.returncode == 0, installed.stderr
    assert f"installed gemma3:270m on {stack.api_url}" in installed.stdout
    assert (stack.store / "gemma3-270m.gguf").is_file()

    listed = run_cli("models", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "gemma3:270m" in listed.stdout and "ready" in listed.stdout

    again = run_cli("models", "install", "gemma3:270m", env=env)
    assert again.returncode == 0 and "already installed" in again.stdout

    removed = run_cli("models", "uninstall", "gemma3:270m", env=env)
    assert removed.returncode == 0, removed.stderr
    assert not (stack.store / "gemma3-270m.gguf").exists()

    missing = run_cli("models", "uninstall", "gemma3:270m", env=env)
    assert missing.returncode == 1 and "not in the store" in missing.stderr
    assert "Traceback" not in missing.stderr

    unauthorised = run_cli("models", "list", env={**env, "PENDRA_API_KEY": "wrong"})
    assert unauthorised.returncode == 1 and "PENDRA_API_KEY" in unauthorised.stderr

    nothing = run_cli("models", "cancel", "gemma3:270m", env=env)
    assert nothing.returncode == 1 and "no install of gemma3:270m is running" in nothing.stderr


def test_the_cli_says_when_the_api_is_unreachable() -> None:
    result = run_cli("models", "list", env={"PENDRA_API_URL": f"http://127.0.0.1:{free_port()}"})
    assert result.returncode == 1
    assert "cannot reach the Pendra API" in result.stderr and "Traceback" not in result.stderr


def test_job_listing_shows_progress(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack("embedded")
    job = api.install(stack.api_url, "gemma3:270m")
    api.wait_job(stack.api_url, job["id"])
    jobs = httpx.get(f"{stack.api_url}/api/jobs", timeout=10).json()["data"]
    assert [(j["id"], j["state"], j["attempts"]) for j in jobs] == [("install:gemma3:270m", "done", 1)]


@pytest.mark.parametrize(
    ("service", "present", "absent"),
    [("inference", "/v1/models", "/api/models"), ("api", "/api/catalogue", None)],
)
def test_pendra_serve_runs_one_service_of_the_stack(
    tmp_path: Path, service: str, present: str, absent: str | None
) -> None:
    env = {
        "PENDRA_MODELS_DIR": str(tmp_path / "models"),
        "PENDRA_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    server = start_server(env, tmp_path / "serve.log", service, ready_path="/health")
    try:
        assert httpx.get(server.base_url + present, timeout=10).status_code == 200
        if absent is not None:
            assert httpx.get(server.base_url + absent, timeout=10).status_code == 404
    finally:
        server.stop()


def test_pendra_serve_refuses_an_unknown_service() -> None:
    result = run_cli("serve", "everything")
    assert result.returncode == 2 and "everything" in result.stderr
