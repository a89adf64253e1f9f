"""A vision model installed from the catalogue and used, on both shapes: compose's processes (api,
arq fetcher on real Redis, inference watching the store) and `pendra serve` alone. Its entry pins
a tiny random-weight Qwen3.5 (the real Qwen tokenizer and template) and a `qwen3vl_merger`
projector (an mmproj GGUF) on a local HTTP server; the install fetches and verifies both, the
store holds the pair and the sidecar names the projector, every listing says `vision`, and an
image through the gateway reaches the model (its tokens counted) on the OpenAI and the Ollama
routes. A wrong projector pin fails the job and keeps nothing; an uninstall takes the pair away."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pendra_shared.fsutil import sha256_file
from PIL import Image

from tests.support import api
from tests.support.httpserver import FileServer, link_or_copy
from tests.support.hybrids import write_qwen35_vision
from tests.topology.conftest import Stack

VISION = "qwen-vision:tiny"
BAD_PIN = "qwen-vision:badpin"
WRONG_SHA = "cd" * 32
FILES = ("qwen-vision-tiny.gguf", "qwen-vision-tiny.gguf.meta.json", "qwen-vision-tiny.mmproj.gguf")
NONE = {"reasoning_format": "none", "chat_template_kwargs": {"enable_thinking": False}}


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


@pytest.fixture(scope="module")
def vision_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The model and its projector, written once for the module's stacks."""
    return write_qwen35_vision(tmp_path_factory.mktemp("vision-files"))


@pytest.fixture
def catalogue(
    file_server: FileServer, write_catalogue: Callable[..., Path], vision_files: tuple[Path, Path]
) -> Path:
    """The stack's catalogue (it replaces the topology's Gemma one): the vision pair, pinned, and
    the same pair under another name with a wrong projector pin."""
    model, projector = vision_files
    link_or_copy(model, file_server.root / "qwen.gguf")
    link_or_copy(projector, file_server.root / "mmproj-F16.gguf")
    entry: dict[str, Any] = {
        "name": VISION,
        "purpose": "chat",
        "gguf_url": file_server.url("qwen.gguf"),
        "gguf_sha256": sha256_file(model),
        "size_bytes": model.stat().st_size,
        "mmproj_url": file_server.url("mmproj-F16.gguf"),
        "mmproj_sha256": sha256_file(projector),
        "mmproj_size_bytes": projector.stat().st_size,
    }
    bad = {**entry, "name": BAD_PIN, "mmproj_sha256": WRONG_SHA, "mmproj_size_bytes": None}
    return write_catalogue([entry, bad])


def _store_files(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.is_file())


def _partials(store: Path) -> list[str]:
    """Partial downloads left in the store (lock files are expected)."""
    partial = store / ".partial"
    return sorted(p.name for p in partial.iterdir() if p.suffix != ".lock") if partial.is_dir() else []


def test_a_vision_model_installs_with_its_projector_is_used_and_uninstalled(
    stack: Stack, vision_files: tuple[Path, Path]
) -> None:
    base, store = stack.api_url, stack.store
    model_file, projector_file = vision_files
    both = model_file.stat().st_size + projector_file.stat().st_size

    # The install: one job fetches and verifies the pair.
    job = api.install(base, VISION)
    final = api.wait_job(base, job["id"])
    assert final["state"] == "done", final
    assert final["done_bytes"] == both == final["total_bytes"], final

    # The store holds the model, its sidecar naming the projector, and the projector.
    assert _store_files(store) == list(FILES)
    assert sha256_file(store / FILES[0]) == sha256_file(model_file)
    projector = store / FILES[2]
    assert sha256_file(projector) == sha256_file(projector_file)
    sidecar = json.loads((store / FILES[1]).read_text())
    assert sidecar["projector"]["file"] == FILES[2]
    assert sidecar["projector"]["sha256"] == sha256_file(projector_file)
    assert sidecar["projector"]["size_bytes"] == projector.stat().st_size
    assert _partials(store) == []

    with (
        httpx.Client(base_url=base, timeout=120) as http,
        openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120) as client,
    ):
        # Every listing says `vision`: the management API, the OpenAI cards, Ollama's show.
        listed = http.get("/api/models").json()
        (row,) = listed["data"]
        assert (row["name"], row["status"], row["purpose"]) == (VISION, "ready", "chat")
        assert row["projector"] == FILES[2] and row["projector_problem"] is None
        assert "vision" in row["capabilities"], row
        assert listed["problems"] == []

        api.wait_model(base, VISION)
        cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert "vision" in cards[VISION]["capabilities"], cards
        card = http.get(f"/v1/models/{VISION}")
        assert card.status_code == 200 and "vision" in card.json()["capabilities"], card.text

        shown = http.post("/api/show", json={"model": VISION})
        assert shown.status_code == 200, shown.text
        assert "vision" in shown.json()["capabilities"], shown.json()["capabilities"]
        assert shown.json()["projector_info"]["general.architecture"] == "clip"
        tags = http.get("/api/tags").json()["models"]
        assert [t["name"] for t in tags] == [VISION]

        # An image through the gateway, on the OpenAI route...
        data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
        reply = client.chat.completions.create(
            model=VISION,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url}},
                        {"type": "text", "text": "What is in this picture?"},
                    ],
                }
            ],
            max_tokens=8,
            temperature=0,
            extra_body=NONE,
        )
        assert reply.choices[0].message.content
        usage = reply.usage
        assert usage is not None and usage.prompt_tokens_details is not None
        images = usage.prompt_tokens_details.image_tokens
        assert images is not None and images > 0, usage
        assert usage.prompt_tokens > images

        # ...and on Ollama's, with the same picture as base64.
        chat = http.post(
            "/api/chat",
            json={
                "model": VISION,
                "messages": [
                    {
                        "role": "user",
                        "content": "What is in this picture?",
                        "images": [base64.b64encode(PNG).decode()],
                    }
                ],
                "stream": False,
                "think": False,
                "options": {"temperature": 0, "num_predict": 8},
            },
        )
        assert chat.status_code == 200, chat.text
        body = chat.json()
        assert body["done"] is True and body["message"]["content"]
        assert body["prompt_eval_count"] > images

        # A wrong projector pin: the job fails clearly and the store keeps nothing of it.
        bad = api.install(base, BAD_PIN)
        failed = api.wait_job(base, bad["id"])
        assert failed["state"] == "failed" and failed["error_code"] == "checksum_mismatch", failed
        assert "vision projector" in failed["error"] and WRONG_SHA in failed["error"], failed["error"]
        assert failed["attempts"] == 1, failed  # a permanent failure is not retried
        assert _store_files(store) == list(FILES)  # only the good pair, untouched
        assert _partials(store) == []
        names = [m["name"] for m in http.get("/api/models").json()["data"]]
        assert names == [VISION]

        # The uninstall takes the model, its sidecar and its projector.
        gone = http.delete(f"/api/models/{VISION}")
        assert gone.status_code == 200, gone.text
        assert gone.json() == {"id": VISION, "object": "model", "deleted": True, "file": FILES[0]}
        assert _store_files(store) == []
        assert http.get("/api/models").json()["data"] == []
        assert http.post("/api/show", json={"model": VISION}).status_code == 404
        api.wait_model(base, VISION, present=False)
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(
                model=VISION, messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body=NONE
            )
        assert err.value.code == "model_not_found"
