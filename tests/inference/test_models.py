"""/v1/models, refused endpoints, probes, and the store watched while the server runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from pendra_shared.store import ModelStore

from tests.inference.conftest import CHAT, GEMMA_EMBED
from tests.support.hybrids import write_qwen35
from tests.support.openai_schemas import validate
from tests.support.server import ServerProcess

HELLO = [{"role": "user", "content": "Hi"}]


def wait_for(predicate: Callable[[], bool], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def model_ids(client: openai.OpenAI) -> set[str]:
    return {m.id for m in client.models.list().data}


def test_models_list_and_retrieve(client: openai.OpenAI, server: ServerProcess) -> None:
    raw = httpx.get(f"{server.base_url}/v1/models").json()
    validate(raw, "ListModelsResponse")
    by_id = {m["id"]: m for m in raw["data"]}
    assert {CHAT, GEMMA_EMBED} <= set(by_id)
    assert by_id[CHAT]["owned_by"] == "pendra" and by_id[CHAT]["purpose"] == "chat"
    assert by_id[GEMMA_EMBED]["purpose"] == "embedding"
    one = httpx.get(f"{server.base_url}/v1/models/{CHAT}").json()
    validate(one, "Model")
    assert client.models.retrieve(CHAT).id == CHAT
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("ghost:1")
    assert missing.value.code == "model_not_found"


def test_models_carry_what_their_chat_template_can_do(
    client: openai.OpenAI, server: ServerProcess, served_store: Path, tmp_path: Path
) -> None:
    """`capabilities` (Ollama's words) from each model's chat template and purpose: Gemma's knows
    neither tools nor thinking, Qwen3.5's both."""
    store = ModelStore(served_store)
    store.import_file(write_qwen35(tmp_path / "qwen35.gguf"), name="qwen35:tiny", purpose="chat")
    try:
        wait_for(lambda: "qwen35:tiny" in model_ids(client))
        by_id = {m["id"]: m for m in httpx.get(f"{server.base_url}/v1/models").json()["data"]}
        assert by_id[CHAT]["capabilities"] == ["completion"]
        assert by_id[GEMMA_EMBED]["capabilities"] == ["embedding"]
        assert {"completion", "tools", "thinking"} <= set(by_id["qwen35:tiny"]["capabilities"])
        one = httpx.get(f"{server.base_url}/v1/models/qwen35:tiny").json()
        assert one["capabilities"] == by_id["qwen35:tiny"]["capabilities"]
    finally:
        store.uninstall("qwen35:tiny")
    wait_for(lambda: "qwen35:tiny" not in model_ids(client))


def test_invalid_files_are_not_listed(client: openai.OpenAI, served_store: Path) -> None:
    (served_store / "broken.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    time.sleep(1)
    assert "broken" not in model_ids(client)
    (served_store / "broken.gguf").unlink()


@pytest.mark.parametrize(
    "path",
    [
        "/v1/images/generations",
        "/v1/audio/transcriptions",
        "/v1/audio/speech",
        "/v1/audio/translations",
        "/v1/images/edits",
    ],
)
def test_unsupported_endpoints_answer_501(server: ServerProcess, path: str) -> None:
    response = httpx.post(f"{server.base_url}{path}", json={"model": CHAT, "prompt": "a cat"})
    assert response.status_code == 501
    validate(response.json(), "ErrorResponse")
    assert "not supported by the Pendra backend" in response.json()["error"]["message"]


def test_openai_client_sees_501_for_images(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.images.generate(model=CHAT, prompt="a cat")
    assert info.value.status_code == 501 and info.value.code == "not_supported"


def test_probes_and_unknown_routes(server: ServerProcess) -> None:
    assert httpx.get(f"{server.base_url}/health").json()["status"] == "ok"
    ready = httpx.get(f"{server.base_url}/ready").json()
    assert ready["status"] == "ready" and ready["models"] >= 2
    missing = httpx.get(f"{server.base_url}/v1/nothing")
    assert missing.status_code == 404
    validate(missing.json(), "ErrorResponse")
    bad_json = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert bad_json.status_code == 400
    validate(bad_json.json(), "ErrorResponse")


def test_drop_in_use_and_remove_without_restart(
    client: openai.OpenAI, served_store: Path, gemma_path: Path
) -> None:
    store = ModelStore(served_store)
    store.import_file(gemma_path, name="dropped:v1")
    wait_for(lambda: "dropped:v1" in model_ids(client))
    reply = client.chat.completions.create(model="dropped:v1", messages=HELLO, max_tokens=3)
    assert reply.choices[0].message.content is not None
    store.uninstall("dropped:v1")
    wait_for(lambda: "dropped:v1" not in model_ids(client))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="dropped:v1", messages=HELLO, max_tokens=3)


def test_a_half_written_file_is_never_served(
    client: openai.OpenAI, served_store: Path, gemma_path: Path
) -> None:
    data = gemma_path.read_bytes()
    target = served_store / "copying.gguf"
    with target.open("wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
        time.sleep(1.5)
        assert "copying" not in model_ids(client)
        with pytest.raises(openai.BadRequestError, match="invalid GGUF: truncated"):
            client.chat.completions.create(model="copying", messages=HELLO, max_tokens=2)
        fh.write(data[len(data) // 2 :])
    wait_for(lambda: "copying" in model_ids(client))
    reply = client.chat.completions.create(model="copying", messages=HELLO, max_tokens=2)
    assert reply.choices[0].message.content is not None
    target.unlink()
    wait_for(lambda: "copying" not in model_ids(client))


def test_a_replaced_file_is_reloaded(
    client: openai.OpenAI, served_store: Path, server: ServerProcess, gemma_path: Path, tmp_path: Path
) -> None:
    store = ModelStore(served_store)
    store.import_file(gemma_path, name="swap:v1")
    wait_for(lambda: "swap:v1" in model_ids(client))
    client.chat.completions.create(model="swap:v1", messages=HELLO, max_tokens=2)
    # Replace the file in place the way an install does (new file, os.replace).
    store.uninstall("swap:v1")
    store.import_file(gemma_path, name="swap:v1", purpose="embedding")
    wait_for(
        lambda: any(
            m.id == "swap:v1" and getattr(m, "purpose", None) == "embedding"
            for m in client.models.list().data
        )
    )
    embedded = client.embeddings.create(model="swap:v1", input="hello", encoding_format="float")
    assert len(embedded.data[0].embedding) == 640
    assert "swap:v1 changed" in server.log()  # the watcher's poll or its rescan, whichever came first
    store.uninstall("swap:v1")
