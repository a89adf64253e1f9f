"""The inference service's FastAPI application and its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from pendra_shared.config import Settings
from pendra_shared.store import ModelStore

from pendra_inference.chat import ChatService
from pendra_inference.embeddings import EmbeddingService
from pendra_inference.errors import install_error_handlers
from pendra_inference.registry import EngineFactory, ModelRegistry
from pendra_inference.routes import router
from pendra_inference.state import AppState
from pendra_inference.watcher import watch_store

logger = logging.getLogger(__name__)


def create_app(settings: Settings, engine_factory: EngineFactory | None = None) -> FastAPI:
    store = ModelStore(settings.models_dir)
    registry = ModelRegistry(settings, store, *(() if engine_factory is None else (engine_factory,)))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = AppState(
            registry, ChatService(registry), EmbeddingService(registry, settings.max_embedding_inputs)
        )
        app.state.pendra = state
        await registry.refresh()
        state.ready = True
        stop = asyncio.Event()
        tasks = [asyncio.create_task(watch_store(registry, stop)), asyncio.create_task(registry.run_reaper())]
        for name in filter(None, (n.strip() for n in settings.preload.split(","))):
            model = await registry.find(name)
            async with registry.use(model.name, model.purpose or "chat", keep_alive=-1):
                logger.info("preloaded %s", name)
        try:
            yield
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await registry.close()

    app = FastAPI(title="Pendra inference", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(router)
    return app
