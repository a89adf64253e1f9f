"""Real Prometheus, configured from deploy/prometheus, scraping compose's processes while chat,
embeddings and installs go through the API: every panel of Pendra's Grafana dashboard and every
recording rule returns data, with values that mean what the panel says."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.conftest import gemma_entry
from tests.support import api
from tests.support.prometheus import Prometheus, finite, panel_queries, values
from tests.support.stack import ComposeStack
from tests.test_monitoring_files import recording_rules
from tests.topology.conftest import Stack


def positive(v: list[float]) -> bool:
    return all(x > 0 for x in v)


def at_least_zero(v: list[float]) -> bool:
    return all(x >= 0 for x in v)


# What each panel's values must be while chat and embeddings run (by title; default: >= 0).
EXPECT: dict[str, Callable[[list[float]], bool]] = {
    "Output tokens/s": positive,
    "Input tokens/s": positive,
    "Decode speed (one stream)": lambda v: all(1 < x < 10_000 for x in v),
    "Time to first token": positive,
    "Inter-token latency": positive,
    "End-to-end latency": positive,
    "Requests/s by status": positive,
    "5xx ratio": lambda v: all(0 <= x <= 1 for x in v),
    "KV-cache usage": lambda v: all(0 <= x <= 1 for x in v),
    "Loaded models": lambda v: v == [2.0],
    "Model memory": positive,
    "Finished requests by reason": at_least_zero,
    "Installs in progress": lambda v: len(v) == 3 and at_least_zero(v),
    "Install failures by error code": lambda v: len(v) > 1 and sorted(v)[-2:] == [0.0, 1.0],
}


@pytest.fixture
def with_broken_entry(catalogue: Path, served_gemma: str) -> Path:
    """The test catalogue plus an entry whose pin is wrong, for the failures panel."""
    entries = yaml.safe_load(catalogue.read_text())["models"]
    entries.append(gemma_entry(served_gemma, name="broken:1b", gguf_sha256="0" * 64))
    catalogue.write_text(yaml.safe_dump({"models": entries}))
    return catalogue


def traffic(base: str, stop: threading.Event) -> None:
    """Chat (streamed and not) and embeddings, back to back, until `stop`."""
    with openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=2, timeout=120) as client:
        while not stop.is_set():
            messages: Any = [{"role": "user", "content": "Name a colour."}]
            client.chat.completions.create(model="gemma3:270m", messages=messages, max_tokens=8)
            for _ in client.chat.completions.create(
                model="gemma3:270m", messages=messages, max_tokens=8, stream=True
            ):
                pass
            client.embeddings.create(model="gemma-embed:270m", input=["a line", "another line"])


def test_every_dashboard_panel_returns_data_on_a_running_stack(
    make_stack: Callable[..., Stack], with_broken_entry: Path, tmp_path: Path
) -> None:
    stack = make_stack("compose")
    assert isinstance(stack, ComposeStack)
    targets = {
        "api": f"127.0.0.1:{stack.api_port}",
        "inference": f"127.0.0.1:{stack.inference_port}",
        "fetcher": f"127.0.0.1:{stack.fetcher_port}",
    }
    prometheus = Prometheus(tmp_path / "prometheus", targets).start()
    try:
        deadline = time.monotonic() + 30
        while prometheus.targets_up() != {"api": True, "inference": True, "fetcher": True}:
            assert time.monotonic() < deadline, prometheus.targets_up()
            time.sleep(0.5)

        for model in ("gemma3:270m", "gemma-embed:270m"):
            assert api.wait_job(stack.api_url, api.install(stack.api_url, model)["id"])["state"] == "done"
        broken = api.wait_job(stack.api_url, api.install(stack.api_url, "broken:1b")["id"])
        assert broken["error_code"] == "checksum_mismatch"
        api.wait_model(stack.api_url, "gemma3:270m")
        api.wait_model(stack.api_url, "gemma-embed:270m")

        stop = threading.Event()
        runner = threading.Thread(target=traffic, args=(stack.api_url, stop), daemon=True)
        runner.start()
        try:
            # Every target of every panel (a panel may hold several: p50, p95, p99) and every rule.
            checks = panel_queries() + [(f"rule {record}", record) for record in recording_rules()]
            pending = dict(enumerate(checks))
            results: dict[int, list[float]] = {}
            deadline = time.monotonic() + 60
            while pending and time.monotonic() < deadline:
                for index, (title, expr) in list(pending.items()):
                    result = prometheus.query(expr)
                    if finite(result) and EXPECT.get(title, at_least_zero)(values(result)):
                        results[index] = values(result)
                        del pending[index]
                time.sleep(1)
        finally:
            stop.set()
            runner.join(60)
        assert not pending, "\n".join(
            f"panel {title!r}: {expr} -> {prometheus.query(expr)}" for title, expr in pending.values()
        )
        assert len(results) == len(checks)
        # The installs in the counters: three ended, two done with every byte counted.
        done = prometheus.query('sum(pendra_install_jobs_total{state="done"})')
        assert values(done) == [2.0]
        downloaded = values(prometheus.query("sum(pendra_install_download_bytes_total)"))
        assert downloaded and downloaded[0] >= 2 * 250_000_000
        assert all(math.isfinite(x) for v in results.values() for x in v)
    finally:
        prometheus.stop()
        if httpx.get(f"{stack.api_url}/health", timeout=5).status_code != 200:
            print(stack.logs())
