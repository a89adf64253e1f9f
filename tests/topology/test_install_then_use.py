"""A finished install answers at once, on both shapes: once its job says `done`, the very next
`/v1/models` lists the model, `/v1/models/{id}` shows it and the very next request naming it is
served, not a 404. In `pendra serve` the job is not reported done before the registry knows the
model; in compose (the fetcher writes the store, inference watches it) the inference service
scans the store again when the store directory changed since its last scan, and when a request
names a model it has not seen, without waiting for its watcher."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pendra_inference.gguf_writer import LlamaShape, write_llama_gguf
from pendra_shared.fsutil import sha256_file

from tests.support import api
from tests.support.httpserver import FileServer
from tests.topology.conftest import Stack

# Twenty fresh models, so twenty installs the inference service has never seen: the store
# watcher's rescan lagged the job's `done` by 15-60 ms, which some round of twenty showed.
ROUNDS = 20
TINY = LlamaShape(n_embd=64, n_layer=1, n_head=2, n_head_kv=2, n_ff=128, n_vocab=320, context=512)


def model_name(round_: int) -> str:
    return f"tiny-{'chat' if round_ % 2 == 0 else 'embed'}:r{round_}"


@pytest.fixture
def catalogue(file_server: FileServer, write_catalogue: Callable[..., Path]) -> Path:
    """The stack's catalogue (it replaces the topology's Gemma one): `ROUNDS` names for one small
    llama, chat and embedding by turns, so each install is quick and each is a new model."""
    path = write_llama_gguf(file_server.root / "tiny.gguf", TINY, name="tiny")
    entries: list[dict[str, Any]] = [
        {
            "name": model_name(r),
            "purpose": "chat" if r % 2 == 0 else "embedding",
            "gguf_url": file_server.url("tiny.gguf"),
            "gguf_sha256": sha256_file(path),
            "size_bytes": path.stat().st_size,
        }
        for r in range(ROUNDS)
    ]
    return write_catalogue(entries)


def test_a_model_is_listed_and_served_as_soon_as_its_install_is_done(stack: Stack) -> None:
    base = stack.api_url
    with (
        httpx.Client(base_url=base, timeout=60) as http,
        openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60) as client,
    ):
        for round_ in range(ROUNDS):
            name = model_name(round_)
            job = api.install(base, name)
            final = api.wait_job(base, job["id"], poll_s=0.005)
            assert final["state"] == "done", final

            listed = http.get("/v1/models")
            assert listed.status_code == 200, listed.text
            ids = [m["id"] for m in listed.json()["data"]]
            assert name in ids, f"round {round_}: {name} is done but /v1/models lists {ids}"
            card = http.get(f"/v1/models/{name}")
            assert card.status_code == 200, f"round {round_}: /v1/models/{name}: {card.text}"

            # A request naming it, on the OpenAI and the Ollama routes by turns.
            if round_ % 4 == 0:
                reply = client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=1
                )
                assert reply.choices[0].finish_reason in ("length", "stop")
            elif round_ % 4 == 1:
                result = client.embeddings.create(model=name, input="a red apple")
                assert len(result.data[0].embedding) == TINY.n_embd
            elif round_ % 4 == 2:
                loaded = http.post("/api/generate", json={"model": name, "prompt": "", "stream": False})
                assert loaded.status_code == 200, f"round {round_}: /api/generate: {loaded.text}"
                assert loaded.json()["done"] is True
            else:
                embedded = http.post("/api/embed", json={"model": name, "input": "a red apple"})
                assert embedded.status_code == 200, f"round {round_}: /api/embed: {embedded.text}"
                assert len(embedded.json()["embeddings"][0]) == TINY.n_embd
