"""The gateway's and the fetcher's metrics on compose's processes (real Redis, a real S3 mirror):
what an operator reads off them after installs (retried, from the mirror, cancelled, failed),
refused keys, odd paths, a body too large, streams and an inference service that went away."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GEMMA_SIZE, gemma_entry
from tests.support.engines import S3Server
from tests.support.httpserver import FileServer
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


def start(stack: ComposeStack, model: str) -> str:
    r = httpx.post(f"{stack.api_url}/api/models/install", json={"model": model}, headers=AUTH, timeout=30)
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


def install(stack: ComposeStack, model: str) -> dict[str, object]:
    return wait(stack, start(stack, model))


def idle(fetcher: str) -> bool:
    return value(fetcher, "pendra_install_downloads_running") == 0


def until(check: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_installs_downloads_and_the_gateway_on_compose(
    make_stack: Callable[..., Stack], s3_server: S3Server, served_gemma: str, file_server: FileServer
) -> None:
    env = {"PENDRA_API_KEYS": KEY, "PENDRA_INSTALL_CONCURRENCY": "1"}
    stack = make_stack("compose", s3=s3_server, env=env)
    assert isinstance(stack, ComposeStack)
    fetcher, gateway = stack.fetcher_url, stack.api_url
    assert httpx.get(f"{fetcher}/health", timeout=10).json() == {"status": "ok"}
    assert httpx.get(f"{fetcher}/other", timeout=10).status_code == 404

    # An install from upstream that met network trouble past the downloader's retries
    # (PENDRA_DOWNLOAD_RETRIES=3: four 503s end a try): one job retry; every byte counted once,
    # as upstream; one verify; one job done.
    file_server.faults.errors_503 = 6
    assert install(stack, "gemma3:270m")["state"] == "done"
    assert value(fetcher, "pendra_install_retries_total", error_code="download_interrupted") == 1
    assert value(fetcher, "pendra_install_download_bytes_total", source="upstream") == GEMMA_SIZE
    assert value(fetcher, "pendra_install_download_seconds_total", source="upstream") > 0
    assert value(fetcher, "pendra_install_verify_seconds_count") == 1
    assert value(fetcher, "pendra_install_jobs_total", state="done", error_code="") == 1
    until(lambda: idle(fetcher), "a finished download still counted")  # its record is written first

    # Uninstalled and installed again: this time from the mirror the first install filled.
    assert httpx.delete(f"{gateway}/api/models/gemma3:270m", headers=AUTH, timeout=60).status_code == 200
    assert install(stack, "gemma3:270m")["state"] == "done"
    assert value(fetcher, "pendra_install_download_bytes_total", source="mirror") == GEMMA_SIZE
    assert value(fetcher, "pendra_install_download_seconds_total", source="mirror") > 0
    assert value(fetcher, "pendra_install_download_bytes_total", source="upstream") == GEMMA_SIZE
    assert value(fetcher, "pendra_install_jobs_total", state="done", error_code="") == 2

    # Two entries the mirror cannot have (wrong pins), so they come from the slow upstream.
    catalogue = Path(stack.extra_env["PENDRA_CATALOGUE"])
    broken = gemma_entry(served_gemma, name="broken:1b", gguf_sha256="0" * 64)
    spare = gemma_entry(served_gemma, name="spare:1b", gguf_sha256="1" * 64)
    entries = yaml.safe_load(catalogue.read_text())["models"] + [broken, spare]
    catalogue.write_text(yaml.safe_dump({"models": entries}))
    stack.services["api"].stop()
    stack.start_service("api")

    # One running (holding the one download slot), one queued behind it: the gateway's gauge
    # reads them off the job records; a job's event stream is an open stream while followed.
    file_server.faults.throttle_s = 0.01
    running = start(stack, "broken:1b")
    until(lambda: value(fetcher, "pendra_install_downloads_running") == 1, "the download never ran")
    queued = start(stack, "spare:1b")
    until(lambda: value(gateway, "pendra_install_jobs_active", state="queued") == 1, "nothing queued")
    assert value(gateway, "pendra_install_jobs_active", state="running") == 1
    assert value(gateway, "pendra_install_jobs_active", state="retrying") == 0
    url = f"{gateway}/api/jobs/{running}/events"
    with httpx.stream("GET", url, headers=AUTH, timeout=30) as events:
        assert events.status_code == 200
        lines = events.iter_lines()  # kept: a dropped iterator closes the connection
        assert next(lines).startswith("event: ")
        assert value(gateway, "pendra_api_streams_open") == 1
    until(lambda: value(gateway, "pendra_api_streams_open") == 0, "the job's stream stayed counted")

    # Cancelled: the queued job by the gateway (it writes that final record), the running one
    # by the fetcher (it stops the download and writes it).
    for job_id in (queued, running):
        r = httpx.post(f"{gateway}/api/jobs/{job_id}/cancel", headers=AUTH, timeout=10)
        assert r.status_code == 200, r.text
        assert wait(stack, job_id)["state"] == "cancelled"
    assert value(gateway, "pendra_install_jobs_total", state="cancelled", error_code="") == 1
    assert value(fetcher, "pendra_install_jobs_total", state="cancelled", error_code="") == 1
    until(lambda: idle(fetcher), "a cancelled download still counted")
    until(lambda: value(gateway, "pendra_install_jobs_active", state="queued") == 0, "still queued")

    # A wrong pin fails, counted with its error code.
    file_server.faults.throttle_s = 0
    assert install(stack, "broken:1b")["error_code"] == "checksum_mismatch"
    assert value(fetcher, "pendra_install_jobs_total", state="failed", error_code="checksum_mismatch") == 1

    # The gateway: route templates, never the names or paths clients sent.
    httpx.get(f"{gateway}/api/models/some-secret-name", headers=AUTH, timeout=10)
    httpx.get(f"{gateway}/v1/models/secret-model-id", headers=AUTH, timeout=10)
    assert httpx.get(f"{gateway}/v1/secret-endpoint-xyz", headers=AUTH, timeout=10).status_code == 404
    httpx.post(f"{gateway}/v1/secret/deeper/path", headers=AUTH, timeout=10)
    httpx.get(f"{gateway}/no/such/route/at/all", headers=AUTH, timeout=10)
    text = httpx.get(f"{gateway}/metrics", timeout=10).text
    for raw in ("some-secret-name", "secret-model-id", "secret-endpoint", "secret/deeper", "no/such"):
        assert raw not in text, raw
    routes = {
        dict(labels)["route"] for name, labels in scrape(gateway) if name == "pendra_api_requests_total"
    }
    expected = {
        "/api/models/install",
        "/api/jobs/{job_id}",
        "/api/jobs/{job_id}/cancel",
        "/api/jobs/{job_id}/events",
        "/api/models/{name}",
        "/v1/models/{model_id}",
        "/v1/{path}",
        "unmatched",
    }
    assert expected <= routes, routes
    assert (
        value(gateway, "pendra_api_requests_total", route="/api/models/install", method="POST", status="202")
        == 3  # since the gateway restarted
    )
    assert value(gateway, "pendra_api_requests_total", route="/v1/{path}", method="GET", status="404") == 1
    assert value(gateway, "pendra_api_request_duration_seconds_count", route="/v1/{path}", method="POST") == 1

    # A body past PENDRA_MAX_BODY_BYTES (8 MiB) is refused by the network guard, before the app:
    # counted all the same, under its route.
    big = httpx.post(f"{gateway}/v1/chat/completions", content=b"x" * (9 << 20), headers=AUTH, timeout=30)
    assert big.status_code == 413
    assert (
        value(gateway, "pendra_api_requests_total", route="/v1/chat/completions", method="POST", status="413")
        == 1
    )

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
    until(
        lambda: "gemma3:270m" in httpx.get(f"{gateway}/v1/models", headers=AUTH, timeout=10).text, "no model"
    )
    body = {
        "model": "gemma3:270m",
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 200,  # about 4 s: still streaming when it is scraped
        "stream": True,
    }
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert value(gateway, "pendra_api_streams_open") == 1
    until(
        lambda: value(gateway, "pendra_api_streams_open") == 0,
        "the stream stayed counted after the client left",
    )
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
