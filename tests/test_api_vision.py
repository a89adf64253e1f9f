"""Vision models through the API gateway's model routes: a catalogue entry with a projector
installed by the in-process install queue, then listed by `/api/models`, Ollama's `/api/tags` and
`/api/show`. The gateway runs for real on a loopback port (uvicorn in a thread); its store is a
real directory and the catalogue's files come from a local HTTP server."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from pendra_api.app import create_app
from pendra_api.local_queue import LocalQueue
from pendra_shared.config import load_settings
from pendra_shared.store import ModelStore

from tests.support.ggufs import write_gguf
from tests.support.httpserver import FileServer
from tests.support.server import free_port


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def gateway(
    store_dir: Path, file_server: FileServer, write_catalogue: Callable[..., Path]
) -> Iterator[httpx.Client]:
    model = write_gguf(file_server.root / "seer.gguf", tensors=8)
    projector = write_gguf(file_server.root / "mmproj-F16.gguf", arch="clip")
    entry: dict[str, Any] = {
        "name": "seer:1b",
        "purpose": "chat",
        "gguf_url": file_server.url(model.name),
        "gguf_sha256": sha256_of(model),
        "size_bytes": model.stat().st_size,
        "mmproj_url": file_server.url(projector.name),
        "mmproj_sha256": sha256_of(projector),
        "quantization": "F32",
    }
    write_catalogue([entry])
    settings = load_settings()
    app = create_app(settings, queue=LocalQueue(settings, ModelStore.from_settings(settings)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the gateway did not start"
        time.sleep(0.05)
    with httpx.Client(base_url=f"http://127.0.0.1:{server.config.port}", timeout=30) as client:
        yield client
    server.should_exit = True
    thread.join(30)


def test_a_vision_model_installs_and_lists_with_its_projector(gateway: httpx.Client, store_dir: Path) -> None:
    job = gateway.post("/api/models/install", json={"model": "seer:1b"}).json()
    deadline = time.monotonic() + 60
    while job["state"] not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
        job = gateway.get(f"/api/jobs/{job['id']}").json()
    assert job["state"] == "done", job
    both = (store_dir / "seer-1b.gguf").stat().st_size + (store_dir / "seer-1b.mmproj.gguf").stat().st_size
    assert job["done_bytes"] == job["total_bytes"] == both
    write_gguf(store_dir / "stray-mmproj.gguf", arch="clip")

    listing = gateway.get("/api/models").json()
    (model,) = listing["data"]
    assert (model["name"], model["status"], model["projector"]) == ("seer:1b", "ready", "seer-1b.mmproj.gguf")
    assert model["projector_problem"] is None and "vision" in model["capabilities"]
    assert any(p.startswith("stray-mmproj.gguf is a vision projector") for p in listing["problems"])

    (tag,) = gateway.get("/api/tags").json()["models"]
    assert tag["name"] == "seer:1b" and tag["details"]["families"] == ["llama", "clip"]
    shown = gateway.post("/api/show", json={"model": "seer:1b"}).json()
    assert shown["capabilities"] == ["completion", "vision"]
    assert shown["projector_info"]["general.architecture"] == "clip"

    (store_dir / "seer-1b.mmproj.gguf").unlink()  # gone: a text model again, with the reason
    (model,) = gateway.get("/api/models").json()["data"]
    assert model["status"] == "ready" and model["projector"] is None
    assert "seer-1b.mmproj.gguf is missing" in model["projector_problem"]
    assert "vision" not in gateway.post("/api/show", json={"model": "seer:1b"}).json()["capabilities"]
    assert "projector_info" not in gateway.post("/api/show", json={"model": "seer:1b"}).json()
