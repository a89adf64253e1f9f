"""The model registry in-process with real llama.cpp: loading, LRU eviction, keep-alive, options."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pendra_inference.registry import ModelRegistry, parse_keep_alive
from pendra_shared.api_errors import ModelNotFoundError, WrongPurpose
from pendra_shared.config import load_settings
from pendra_shared.sidecar import sidecar_path
from pendra_shared.store import ModelStore


@pytest.fixture
def store(tmp_path: Path, gemma_path: Path) -> ModelStore:
    store = ModelStore(tmp_path / "models")
    store.import_file(gemma_path, name="chat-a:1")
    store.import_file(gemma_path, name="embed-b:1", purpose="embedding")
    return store


def registry(store: ModelStore, **settings: object) -> ModelRegistry:
    return ModelRegistry(load_settings(models_dir=store.root, n_ctx=512, **settings), store)


def test_keep_alive_durations() -> None:
    assert parse_keep_alive("5m", None) == 300
    assert parse_keep_alive("30s", None) == 30
    assert parse_keep_alive("1h", None) == 3600
    assert parse_keep_alive("250ms", None) == 0.25
    assert parse_keep_alive(0, None) == 0
    assert parse_keep_alive("-1", 5.0) is None
    assert parse_keep_alive(None, 5.0) == 5.0
    with pytest.raises(ValueError, match="duration"):
        parse_keep_alive("soon", None)


def test_lru_eviction_keep_alive_and_purpose(store: ModelStore) -> None:
    async def scenario() -> None:
        reg = registry(store, max_loaded_models=1)
        try:
            async with reg.use("chat-a:1", "chat") as loaded:
                assert loaded.engine.n_ctx == 512
            assert reg.loaded_names() == ["chat-a:1"]
            async with reg.use("embed-b:1", "embedding"):
                pass
            assert reg.loaded_names() == ["embed-b:1"]  # the idle chat model made room
            with pytest.raises(WrongPurpose, match="served on /v1/embeddings"):
                async with reg.use("embed-b:1", "chat"):
                    pass
            with pytest.raises(ModelNotFoundError):
                async with reg.use("ghost:1", "chat"):
                    pass
            async with reg.use("embed-b:1", "embedding", keep_alive=0):
                pass
            assert reg.loaded_names() == []  # keep_alive 0: unloaded right after the request
            async with reg.use("chat-a:1", "chat", keep_alive="200ms"):
                pass
            await asyncio.sleep(0.3)
            await reg.reap_idle()
            assert reg.loaded_names() == []
        finally:
            await reg.close()

    asyncio.run(scenario())


def test_busy_models_are_not_evicted(store: ModelStore) -> None:
    async def scenario() -> None:
        reg = registry(store, max_loaded_models=1)
        try:
            async with reg.use("chat-a:1", "chat"):
                from pendra_shared.api_errors import Unavailable

                with pytest.raises(Unavailable, match="busy"):
                    async with reg.use("embed-b:1", "embedding"):
                        pass
                assert reg.loaded_names() == ["chat-a:1"]
        finally:
            await reg.close()

    asyncio.run(scenario())


def test_budget_and_sidecar_options(store: ModelStore) -> None:
    reg = registry(store, memory_budget_bytes=10_000)
    model = store.find("chat-a:1")
    config, memory = reg.engine_config(model)
    assert memory > model.size_bytes and config.n_gpu_layers == 0 and config.n_ctx == 512
    reg.gpu = True  # this machine has no GPU; the default for a GPU build is every layer
    assert reg.engine_config(model)[0].n_gpu_layers == -1

    async def scenario() -> None:
        from pendra_shared.api_errors import Unavailable

        with pytest.raises(Unavailable, match="memory budget"):
            async with reg.use("chat-a:1", "chat"):
                pass

    asyncio.run(scenario())

    path = sidecar_path(model.path)
    text = path.read_text().replace('"options": {}', '"options": {"n_ctx": 256, "n_gpu_layers": 0}')
    path.write_text(text)
    overridden = ModelStore(store.root).find("chat-a:1")
    assert reg.engine_config(overridden)[0].n_ctx == 256
    assert reg.engine_config(overridden)[0].n_gpu_layers == 0
    embed = store.find("embed-b:1")
    cfg = reg.engine_config(embed)[0]
    assert cfg.embedding and cfg.pooling == 1 and cfg.n_batch == cfg.n_ubatch == cfg.n_ctx
