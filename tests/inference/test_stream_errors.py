"""An error after a stream has begun arrives as an error event, then [DONE]."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pendra_inference.chat import ChatService
from pendra_inference.engine import Piece
from pendra_inference.protocol import ChatCompletionRequest
from pendra_inference.registry import ModelRegistry
from pendra_shared.config import load_settings
from pendra_shared.store import ModelStore

from tests.support.openai_schemas import validate


def test_failure_mid_stream_is_an_error_event(
    tmp_path: Path, gemma_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path / "models")
    store.import_file(gemma_path, name="chat:1")
    registry = ModelRegistry(load_settings(models_dir=store.root, n_ctx=512), store)
    service = ChatService(registry)

    async def not_disconnected() -> bool:
        return False

    async def scenario() -> list[str]:
        request = ChatCompletionRequest.model_validate(
            {
                "model": "chat:1",
                "stream": True,
                "max_tokens": 20,
                "messages": [{"role": "user", "content": "Hello"}],
            }
        )
        events = await service.stream(request, not_disconnected)
        async with registry.use("chat:1", "chat") as loaded:
            real = loaded.engine.generate

            # llama.cpp failing after the first token (a decode error on a real machine).
            def failing(*args: Any, **kwargs: Any) -> Iterator[Piece]:
                stream = real(*args, **kwargs)
                yield next(stream)
                raise RuntimeError("llama_decode returned -3")

            monkeypatch.setattr(loaded.engine, "generate", failing)
        out = [event async for event in events]
        await asyncio.sleep(0.1)
        await registry.close()
        return out

    events = asyncio.run(scenario())
    assert events[-1] == "data: [DONE]\n\n"
    error = json.loads(events[-2].removeprefix("data: "))
    validate(error, "ErrorResponse")
    assert "llama_decode returned -3" in error["error"]["message"]
    first = json.loads(events[0].removeprefix("data: "))
    assert first["choices"][0]["delta"]["role"] == "assistant"
