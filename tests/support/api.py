"""A small client for Pendra's management API, as the console uses it."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx


def install(base_url: str, model: str, **kwargs: Any) -> dict[str, Any]:
    response = httpx.post(f"{base_url}/api/models/install", json={"model": model}, timeout=30, **kwargs)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    assert response.headers["location"] == f"/api/jobs/{job['id']}"
    return job


def job(base_url: str, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{base_url}/api/jobs/{job_id}", timeout=10)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def wait_job(
    base_url: str, job_id: str, until: Any = None, timeout_s: float = 120, poll_s: float = 0.1
) -> dict[str, Any]:
    """Poll until `until(job)` (default: the job is in a final state)."""
    until = until or (lambda j: j["state"] in ("done", "failed", "cancelled"))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = job(base_url, job_id)
        if until(current):
            return current
        time.sleep(poll_s)
    raise AssertionError(f"job {job_id} did not get there in {timeout_s}s: {current}")


def events(base_url: str, job_id: str, timeout_s: float = 120) -> list[tuple[str, dict[str, Any]]]:
    """Follow the job's server-sent events until the server closes the stream."""
    received: list[tuple[str, dict[str, Any]]] = []
    name = "message"
    timeout = httpx.Timeout(10, read=timeout_s)
    with httpx.stream("GET", f"{base_url}/api/jobs/{job_id}/events", timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                received.append((name, json.loads(line[len("data: ") :])))
                name = "message"
    return received


def wait_model(base_url: str, model: str, present: bool = True, timeout_s: float = 20) -> None:
    """Wait until the OpenAI model list (through the API) does or does not show `model`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = httpx.get(f"{base_url}/v1/models", timeout=10)
        if response.status_code == 200:
            ids = {m["id"] for m in response.json()["data"]}
            if (model in ids) == present:
                return
        time.sleep(0.2)
    raise AssertionError(f"{model} {'never appeared in' if present else 'stayed in'} /v1/models")
