"""The gateway's and the fetcher's metrics on compose's processes (real Redis, a real S3 mirror):
what an operator reads off them after installs, refused keys, odd paths, a stream and an
inference service that went away."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GEMMA_SIZE, gemma_entry
from tests.support.engines import S3Server
from tests.support.stack import ComposeStack
from tests.topology.conftest import Stack

KEY = "service-metrics-key-7f3a"
AUTH = {"Authorization": f"Bearer {KEY}"}


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(url: str, name: str, **labels: str) -> float:
    return scrape(url).get((name, frozenset(labels.items())), 0.0)


def wait(stack: ComposeStack, job_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 120
    while True:
        job: dict[str, object] = httpx.get(
            f"{stack.api_url}/api/jobs/{job_id}", headers=AUTH, timeout=10
        ).json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def install(stack: ComposeStack, model: str) -> dict[str, object]:
    r = httpx.post(f"{stack.api_url}/api/models/install", json={"model": model}, headers=AUTH, timeout=30)
    assert r.status_code == 202, r.text
    return wait(stack, r.json()["id"])


def test_installs_downloads_and_the_gateway_on_compose(
    make_stack: Callable[..., Stack], s3_server: S3Server, served_gemma: str
) -> None:
    stack = make_stack("compose", s3=s3_server, env={"PENDRA_API_KEYS": KEY})
    assert isinstance(stack, ComposeStack)
    fetcher, gateway = stack.fetcher_url, stack.api_url

    # An install from upstream: every byte counted once, as upstream; one verify; one job done.
    assert install(stack, "gemma3:270m")["state"] == "done"
    assert value(fetcher, "pendra_install_download_bytes_total", source="upstream") == GEMMA_SIZE
    assert value(fetcher, "pendra_install_download_seconds_total", source="upstream") > 0
    assert value(fetcher, "pendra_install_verify_seconds_count") == 1
    assert value(fetcher, "pendra_install_jobs_total", state="done", error_code="") == 1
    assert value(fetcher, "pendra_install_downloads_running") == 0

    # Uninstalled and installed again: this time from the mirror the first install filled.
    assert httpx.delete(f"{gateway}/api/models/gemma3:270m", headers=AUTH, timeout=60).status_code == 200
    assert install(stack, "gemma3:270m")["state"] == "done"
    assert value(fetcher, "pendra_install_download_bytes_total", source="mirror") == GEMMA_SIZE
    assert value(fetcher, "pendra_install_download_bytes_total", source="upstream") == GEMMA_SIZE
    assert value(fetcher, "pendra_install_jobs_total", state="done", error_code="") == 2

    # A wrong pin fails, counted with its error code.
    catalogue = Path(stack.extra_env["PENDRA_CATALOGUE"])
    bad = gemma_entry(served_gemma, name="broken:1b", gguf_sha256="0" * 64)
    entries = yaml.safe_load(catalogue.read_text())["models"] + [bad]
    catalogue.write_text(yaml.safe_dump({"models": entries}))
    stack.services["api"].stop()
    stack.start_service("api")
    assert install(stack, "broken:1b")["error_code"] == "checksum_mismatch"
    assert value(fetcher, "pendra_install_jobs_total", state="failed", error_code="checksum_mismatch") == 1

    # The gateway: route templates, never the names or paths clients sent.
    httpx.get(f"{gateway}/api/models/some-secret-name", headers=AUTH, timeout=10)
    httpx.get(f"{gateway}/v1/not-a-real-endpoint/../x", headers=AUTH, timeout=10)
    httpx.get(f"{gateway}/no/such/route/at/all", headers=AUTH, timeout=10)
    text = httpx.get(f"{gateway}/metrics", timeout=10).text
    assert "some-secret-name" not in text and "not-a-real-endpoint" not in text and "no/such" not in text
    routes = {
        dict(labels)["route"] for name, labels in scrape(gateway) if name == "pendra_api_requests_total"
    }
    assert {"/api/models/install", "/api/jobs/{job_id}", "/api/models/{name}", "unmatched"} <= routes, routes
    assert (
        value(gateway, "pendra_api_requests_total", route="/api/models/install", method="POST", status="202")
        == 1  # since the gateway restarted
    )
    assert value(gateway, "pendra_install_jobs_active", state="running") == 0

    # Refused keys are counted by reason; no key ever reaches /metrics.
    httpx.get(f"{gateway}/v1/models", timeout=10)
    httpx.get(f"{gateway}/v1/models", headers={"Authorization": "Bearer wrong-key-123"}, timeout=10)
    httpx.get(f"{gateway}/v1/models", headers={"Authorization": "Basic abc"}, timeout=10)
    for reason in ("missing", "invalid", "malformed"):
        assert value(gateway, "pendra_api_auth_failures_total", reason=reason) == 1, reason
    assert value(gateway, "pendra_api_requests_total", route="/v1/models", method="GET", status="401") == 3
    text = httpx.get(f"{gateway}/metrics", timeout=10).text
    assert KEY not in text and "wrong-key-123" not in text

    # A chat stream is an open stream while it runs, and the upstream's latency is timed.
    deadline = time.monotonic() + 30
    while "gemma3:270m" not in httpx.get(f"{gateway}/v1/models", headers=AUTH, timeout=10).text:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    body = {
        "model": "gemma3:270m",
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 200,
        "stream": True,
    }
    opened = threading.Event()
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        for _line in r.iter_lines():
            if not opened.is_set():
                opened.set()
                assert value(gateway, "pendra_api_streams_open") == 1
                break
    deadline = time.monotonic() + 10
    while value(gateway, "pendra_api_streams_open") != 0:
        assert time.monotonic() < deadline, "the stream stayed counted after the client left"
        time.sleep(0.1)
    assert value(gateway, "pendra_api_upstream_latency_seconds_count", route="/v1/chat/completions") >= 1

    # Inference gone: the 503s are counted as upstream unavailable.
    stack.services["inference"].stop()
    down = httpx.post(f"{gateway}/v1/chat/completions", json=body, headers=AUTH, timeout=30)
    assert down.status_code == 503
    assert value(gateway, "pendra_api_upstream_unavailable_total", route="/v1/chat/completions") == 1
    assert (
        value(gateway, "pendra_api_requests_total", route="/v1/chat/completions", method="POST", status="503")
        == 1
    )
