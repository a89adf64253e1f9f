"""The model-server protocol of the Gateway API Inference Extension, as its endpoint picker reads a
real `pendra serve`: the series its flags name (deploy/kubernetes/components/inference-gateway)
are gauges with no labels but the adapter labels it fixes, scraped as Prometheus text, and their
values follow real load: requests running and waiting, the KV cache in use, and which models are
loaded or loading for waiting requests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.inference.conftest import CHAT, GEMMA_EMBED
from tests.inference.test_metrics import NO_END
from tests.support.picker import PICKER_METRICS, loaded_in, picker_metrics, picker_scrape
from tests.support.server import ServerProcess, start_server

PARALLEL = 2


@pytest.fixture(scope="module")
def two_sequences(served_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    env = {
        "PENDRA_MODELS_DIR": str(served_store),
        "PENDRA_N_CTX": "1024",
        "PENDRA_PARALLEL": str(PARALLEL),
        "PENDRA_KEEP_ALIVE": "-1",
        "HOME": str(served_store.parent),
    }
    proc = start_server(env, log)
    yield proc
    proc.stop()


def scrape(server: ServerProcess) -> dict[str, Any]:
    return picker_scrape(server.base_url)


def test_the_picker_is_configured_to_read_these_series() -> None:
    assert picker_metrics() == PICKER_METRICS


def test_an_idle_server(two_sequences: ServerProcess) -> None:
    now = scrape(two_sequences)
    assert now["waiting"] == 0 and now["running"] == 0 and now["kv_usage"] == 0
    assert now["lora"]["max_lora"] == "3"  # PENDRA_MAX_LOADED_MODELS' default
    assert abs(now["lora_time"] - time.time()) < 60


def test_the_values_follow_real_load(two_sequences: ServerProcess) -> None:
    body = {
        "model": CHAT,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 900,  # each reserves most of a sequence: two run, the third waits
        "logit_bias": NO_END,
        "stream": True,
    }
    url = f"{two_sequences.base_url}/v1/chat/completions"
    leave = threading.Event()

    def client() -> None:  # reads its stream until told to leave
        with httpx.stream("POST", url, json=body, timeout=120) as r:
            for _ in r.iter_lines():
                if leave.is_set():
                    return

    clients = [threading.Thread(target=client) for _ in range(PARALLEL + 1)]
    for c in clients:
        c.start()
    try:
        deadline = time.monotonic() + 60
        while (now := scrape(two_sequences))["waiting"] < 1 or now["running"] < PARALLEL:
            assert time.monotonic() < deadline, now
            time.sleep(0.05)
        assert now["running"] == PARALLEL
        assert now["waiting"] == 1
        assert 0 < now["kv_usage"] <= 1
        assert loaded_in(now["lora"], "running_lora_adapters") == {CHAT}
    finally:
        leave.set()
        for c in clients:
            c.join()
    deadline = time.monotonic() + 30  # the clients left: their requests end
    while ((now := scrape(two_sequences))["running"] or now["waiting"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert now["running"] == 0 and now["waiting"] == 0


def test_a_model_loading_for_a_waiting_request_is_a_waiting_adapter(two_sequences: ServerProcess) -> None:
    seen: list[dict[str, Any]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(scrape(two_sequences))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        r = httpx.post(
            f"{two_sequences.base_url}/v1/embeddings", json={"model": GEMMA_EMBED, "input": "hi"}, timeout=120
        )
        assert r.status_code == 200
    finally:
        done.set()
        watcher.join()
    loading = [s for s in seen if GEMMA_EMBED in loaded_in(s["lora"], "waiting_lora_adapters")]
    assert loading, "no scrape saw the embedding model loading"
    assert all(s["waiting"] >= 1 for s in loading)  # its request waits for it
    # ... and it is listed as running too, so the picker sends the next requests to this one load
    assert all(GEMMA_EMBED in loaded_in(s["lora"], "running_lora_adapters") for s in loading)
    assert GEMMA_EMBED in loaded_in(scrape(two_sequences)["lora"], "running_lora_adapters")
    assert loaded_in(scrape(two_sequences)["lora"], "waiting_lora_adapters") == set()
