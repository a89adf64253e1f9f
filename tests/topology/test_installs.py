"""Installs through the management API, then chat through the OpenAI surface, on both shapes:
compose's processes (api, arq fetcher on real Redis, inference) and `pendra serve` alone."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from pendra_shared.fsutil import sha256_file

from tests.conftest import GEMMA_SHA256, GEMMA_SIZE, gemma_entry
from tests.support import api
from tests.support.httpserver import FileServer
from tests.support.stack import ComposeStack
from tests.topology.conftest import Stack


def test_install_watch_chat_uninstall(stack: Stack, file_server: FileServer) -> None:
    job = api.install(stack.api_url, "gemma3:270m")
    assert job["id"] == "install:gemma3:270m"
    assert job["state"] in ("queued", "running")

    events = api.events(stack.api_url, job["id"])
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"progress"}, names
    done_bytes = [data["done_bytes"] for name, data in events if data["phase"] == "downloading"]
    assert done_bytes == sorted(done_bytes) and done_bytes, "progress never moved forward"
    final = events[-1][1]
    assert final["state"] == "done" and final["done_bytes"] == GEMMA_SIZE == final["total_bytes"]
    assert sha256_file(stack.store / "gemma3-270m.gguf") == GEMMA_SHA256
    assert (stack.store / "gemma3-270m.gguf.meta.json").is_file()

    listed = httpx.get(f"{stack.api_url}/api/models", timeout=10).json()
    assert [(m["name"], m["status"], m["purpose"]) for m in listed["data"]] == [
        ("gemma3:270m", "ready", "chat")
    ]

    api.wait_model(stack.api_url, "gemma3:270m")
    with openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key="none", max_retries=0, timeout=120) as client:
        reply = client.chat.completions.create(
            model="gemma3:270m",
            messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=8,
            temperature=0,
        )
        assert reply.choices[0].message.content
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8
        # The inference service counts the tokens it made (compose: its own port; serve: the one).
        inference = stack.inference_url if isinstance(stack, ComposeStack) else stack.api_url
        metrics = httpx.get(f"{inference}/metrics", timeout=10).text
        tokens = float(reply.usage.completion_tokens)
        counted = f'pendra_generation_tokens_total{{model_name="gemma3:270m"}} {tokens}'
        assert counted in metrics, metrics

        gone = httpx.delete(f"{stack.api_url}/api/models/gemma3:270m", timeout=30)
        assert gone.status_code == 200, gone.text
        assert gone.json() == {
            "id": "gemma3:270m",
            "object": "model",
            "deleted": True,
            "file": "gemma3-270m.gguf",
        }
        assert not (stack.store / "gemma3-270m.gguf").exists()
        assert not (stack.store / "gemma3-270m.gguf.meta.json").exists()
        with pytest.raises(openai.NotFoundError) as err:  # at once, before the store watcher stirs
            client.chat.completions.create(
                model="gemma3:270m", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
        assert err.value.code == "model_not_found"
        api.wait_model(stack.api_url, "gemma3:270m", present=False)

    again = httpx.delete(f"{stack.api_url}/api/models/gemma3:270m", timeout=30)
    assert again.status_code == 404 and again.json()["error"]["code"] == "model_not_found"
    assert [r.path for r in file_server.requests] == ["/gemma.gguf"]


def test_an_embedding_model_answers_as_soon_as_its_install_is_done(stack: Stack) -> None:
    job = api.install(stack.api_url, "gemma-embed:270m")
    assert api.wait_job(stack.api_url, job["id"], poll_s=0.02)["state"] == "done"
    with openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key="none", max_retries=0, timeout=120) as client:
        result = client.embeddings.create(model="gemma-embed:270m", input=["a red apple", "a green pear"])
    assert [len(d.embedding) for d in result.data] == [640, 640]
    assert result.usage.prompt_tokens > 0


def test_the_same_model_asked_twice_at_once_is_one_job(stack: Stack, file_server: FileServer) -> None:
    file_server.faults.throttle_s = 0.0005
    results: list[dict[str, object]] = []
    threads = [
        threading.Thread(target=lambda: results.append(api.install(stack.api_url, "gemma3:270m")))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {r["id"] for r in results} == {"install:gemma3:270m"}
    final = api.wait_job(stack.api_url, "install:gemma3:270m")
    assert final["state"] == "done", final
    assert len(file_server.requests) == 1, file_server.requests
    assert sha256_file(stack.store / "gemma3-270m.gguf") == GEMMA_SHA256


def test_cancel_stops_the_download_and_leaves_nothing(stack: Stack, file_server: FileServer) -> None:
    file_server.faults.throttle_s = 0.01  # about 40 seconds for the whole file
    job = api.install(stack.api_url, "gemma3:270m")
    running = api.wait_job(
        stack.api_url, job["id"], until=lambda j: j["done_bytes"] > 1_000_000 and j["speed_bps"], timeout_s=60
    )
    assert running["state"] == "running" and running["phase"] == "downloading"
    assert running["total_bytes"] == GEMMA_SIZE and 0 < running["speed_bps"] < 100_000_000
    response = httpx.post(f"{stack.api_url}/api/jobs/{job['id']}/cancel", timeout=10)
    assert response.status_code == 200, response.text
    final = api.wait_job(stack.api_url, job["id"], timeout_s=30)
    assert final["state"] == "cancelled", final
    assert list(stack.store.glob("*.gguf")) == []
    assert list((stack.store / ".partial").glob("*.part")) == []
    assert httpx.get(f"{stack.api_url}/api/models", timeout=10).json()["data"] == []
    # A new request after a cancel starts again.
    file_server.faults.throttle_s = 0
    again = api.install(stack.api_url, "gemma3:270m")
    assert api.wait_job(stack.api_url, again["id"])["state"] == "done"


def test_a_checksum_mismatch_fails_at_once_and_keeps_nothing(
    stack: Stack, file_server: FileServer, served_gemma: str, write_catalogue: object, tmp_path: Path
) -> None:
    # The catalogue this stack reads (PENDRA_CATALOGUE) is rewritten with a wrong pin.
    catalogue = Path(stack.extra_env["PENDRA_CATALOGUE"])
    bad = gemma_entry(served_gemma, name="gemma3:270m", gguf_sha256="0" * 64)
    import yaml

    catalogue.write_text(yaml.safe_dump({"models": [bad]}))
    stack.stop()
    stack.start()
    job = api.install(stack.api_url, "gemma3:270m")
    final = api.wait_job(stack.api_url, job["id"])
    assert final["state"] == "failed" and final["error_code"] == "checksum_mismatch", final
    assert "checksum mismatch" in final["error"]
    assert list(stack.store.glob("*.gguf")) == []
    assert list((stack.store / ".partial").glob("*.part")) == []
    assert len(file_server.requests) == 1  # no retry of a permanent failure


def test_bad_requests_get_openai_errors(stack: Stack) -> None:
    base = stack.api_url
    unknown = httpx.post(f"{base}/api/models/install", json={"model": "no-such-model:1b"}, timeout=10)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert "no-such-model" in unknown.json()["error"]["message"]

    bad_name = httpx.post(f"{base}/api/models/install", json={"model": "../etc/passwd"}, timeout=10)
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "model"

    no_body = httpx.post(f"{base}/api/models/install", content=b"{", timeout=10)
    assert no_body.status_code == 400 and no_body.json()["error"]["type"] == "invalid_request_error"

    missing = httpx.get(f"{base}/api/jobs/install:nothing:1b", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"

    images = httpx.post(f"{base}/v1/images/generations", json={"prompt": "a cat"}, timeout=10)
    assert images.status_code == 501 and images.json()["error"]["code"] == "not_supported"

    found = httpx.get(f"{base}/api/catalogue", params={"q": "gemma", "purpose": "chat"}, timeout=10).json()
    assert {e["purpose"] for e in found["data"]} == {"chat"}
    assert {"name": "gemma3:270m", "installed": False}.items() <= next(
        e for e in found["data"] if e["name"] == "gemma3:270m"
    ).items()
    wrong = httpx.get(f"{base}/api/catalogue", params={"purpose": "video"}, timeout=10)
    assert wrong.status_code == 400


def test_network_trouble_past_the_retries_is_retried_as_a_job(stack: Stack, file_server: FileServer) -> None:
    # PENDRA_DOWNLOAD_RETRIES=3: the first try sees four 503s and gives up; the job is tried again
    # after a pause, sees two more, then gets the file.
    file_server.faults.errors_503 = 6
    job = api.install(stack.api_url, "gemma3:270m")
    final = api.wait_job(stack.api_url, job["id"])
    assert final["state"] == "done", final
    assert final["attempts"] == 2
    assert [r.status for r in file_server.requests] == [503] * 6 + [200]
    assert sha256_file(stack.store / "gemma3-270m.gguf") == GEMMA_SHA256


@pytest.mark.parametrize("kind", ["compose", "embedded"])
def test_a_job_cancelled_while_queued_and_asked_for_again_runs_once(
    make_stack: Callable[..., Stack], file_server: FileServer, kind: str
) -> None:
    stack = make_stack(kind, env={"PENDRA_INSTALL_CONCURRENCY": "1"})
    file_server.faults.throttle_s = 0.002
    first = api.install(stack.api_url, "gemma3:270m")
    api.wait_job(stack.api_url, first["id"], until=lambda j: j["state"] == "running")
    queued = api.install(stack.api_url, "gemma-embed:270m")  # waits: the one download slot is taken
    cancelled = httpx.post(f"{stack.api_url}/api/jobs/{queued['id']}/cancel", timeout=10).json()
    assert cancelled["state"] == "cancelled", cancelled
    again = api.install(stack.api_url, "gemma-embed:270m")
    assert again["id"] == queued["id"] and again["run"] != queued["run"] and again["state"] == "queued"
    file_server.faults.throttle_s = 0
    assert api.wait_job(stack.api_url, first["id"])["state"] == "done"
    final = api.wait_job(stack.api_url, again["id"])
    assert final["state"] == "done" and final["attempts"] == 1, final
    assert len(file_server.requests) == 2  # one download per model: the cancelled run never ran
    assert sha256_file(stack.store / "gemma-embed-270m.gguf") == GEMMA_SHA256
