"""An error after a stream has begun arrives as an error event, then [DONE]."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from pendra_inference.chat import ChatService
from pendra_inference.protocol import ChatCompletionRequest
from pendra_inference.registry import ModelRegistry
from pendra_shared.config import load_settings
from pendra_shared.store import ModelStore

from tests.support.openai_schemas import validate


def chat_service(tmp_path: Path, gemma_path: Path) -> tuple[ModelRegistry, ChatService]:
    """The chat service in this process, over a store holding Gemma as `chat:1`."""
    store = ModelStore(tmp_path / "models")
    store.import_file(gemma_path, name="chat:1")
    registry = ModelRegistry(load_settings(models_dir=store.root, n_ctx=512), store)
    return registry, ChatService(registry)


async def not_disconnected() -> bool:
    return False


def test_failure_mid_stream_is_an_error_event(
    tmp_path: Path, gemma_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, service = chat_service(tmp_path, gemma_path)

    async def scenario() -> tuple[list[str], list[str]]:
        request = ChatCompletionRequest.model_validate(
            {
                "model": "chat:1",
                "stream": True,
                "max_tokens": 20,
                "messages": [{"role": "user", "content": "Hello"}],
            }
        )
        async with registry.use("chat:1", "chat") as loaded:
            scheduler = loaded.runner
            real = scheduler._decode
            calls = [0]

            # llama.cpp failing after the first token (a decode error on a real machine).
            def failing() -> None:
                calls[0] += 1
                if calls[0] > 2:
                    raise RuntimeError("llama_decode returned -3")
                real()

            monkeypatch.setattr(scheduler, "_decode", failing)
            events = await service.stream(request, not_disconnected)
            out = [event async for event in events]
            # The scheduler survives: the next request is served.
            monkeypatch.setattr(scheduler, "_decode", real)
            again = await service.stream(request, not_disconnected)
            after = [event async for event in again]
        await asyncio.sleep(0.1)
        await registry.close()
        return out, after

    events, after = asyncio.run(scenario())
    assert after[-1] == "data: [DONE]\n\n" and "error" not in after[-2]
    assert events[-1] == "data: [DONE]\n\n"
    error = json.loads(events[-2].removeprefix("data: "))
    validate(error, "ErrorResponse")
    assert "llama_decode returned -3" in error["error"]["message"]
    first = json.loads(events[0].removeprefix("data: "))
    assert first["choices"][0]["delta"]["role"] == "assistant"


def test_a_stream_never_read_is_ended_by_close(tmp_path: Path, gemma_path: Path) -> None:
    """A client gone before the first byte: the response never starts its events, and the
    response's background task (`close()`) releases the model, stops the generation and counts an
    abort, as reading to the end would have."""
    registry, service = chat_service(tmp_path, gemma_path)

    async def scenario() -> tuple[int, int, float]:
        request = ChatCompletionRequest.model_validate(
            {
                "model": "chat:1",
                "stream": True,
                "max_tokens": 400,
                "messages": [{"role": "user", "content": "Hi"}],
            }
        )
        events = await service.stream(request, not_disconnected)
        (loaded,) = registry.loaded_models()
        held = loaded.in_flight
        await events.close()
        await events.close()  # idempotent: the background task after a stream read to its end
        for _ in range(100):
            await asyncio.sleep(0.05)
            if loaded.in_flight == 0 and loaded.runner.stats().running == 0:
                break
        aborts = service.metrics.requests.labels("chat:1", "chat", "abort")._value.get()
        result = (held, loaded.in_flight + loaded.runner.stats().running, aborts)
        await registry.close()
        return result

    held, still, aborts = asyncio.run(scenario())
    assert held == 1  # the stream held the model ...
    assert still == 0  # ... and close() let it go and stopped the generation
    assert aborts == 1
