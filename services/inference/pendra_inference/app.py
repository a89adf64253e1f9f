"""The inference service's FastAPI application, and the runtime it starts and stops.

`InferenceRuntime` owns the model registry, the store watcher and the idle reaper; `create_app`
wraps it in the service's own app, and `pendra serve` starts the same runtime inside its
all-in-one app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from pendra_shared.api_errors import install_error_handlers
from pendra_shared.config import Settings
from pendra_shared.http_guard import check_exposure
from pendra_shared.metrics import ServiceMetrics
from pendra_shared.service import serve_http
from pendra_shared.store import ModelStore

from pendra_inference.chat import ChatService
from pendra_inference.completions import CompletionService
from pendra_inference.doctor import preflight
from pendra_inference.embeddings import EmbeddingService
from pendra_inference.engine import LlamaEngine
from pendra_inference.metrics import InferenceMetrics
from pendra_inference.registry import EngineFactory, ModelRegistry
from pendra_inference.rerank import RerankService
from pendra_inference.responses import ResponseService
from pendra_inference.routes import router
from pendra_inference.state import AppState
from pendra_inference.tokens import TokenService
from pendra_inference.watcher import watch_store

logger = logging.getLogger(__name__)


class InferenceRuntime:
    def __init__(
        self,
        settings: Settings,
        engine_factory: EngineFactory | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        """`metrics`: the process's registry, when the runtime shares it (`pendra serve`)."""
        self.settings = settings
        store = ModelStore.from_settings(settings)
        inference_metrics = InferenceMetrics(metrics)
        self.registry = ModelRegistry(
            settings, store, engine_factory or LlamaEngine, metrics=inference_metrics
        )
        chat = ChatService(self.registry)
        self.state = AppState(
            self.registry,
            chat,
            EmbeddingService(self.registry, settings.max_embedding_inputs),
            inference_metrics,
            TokenService(self.registry),
            CompletionService(chat),
            RerankService(self.registry),
            ResponseService(chat),
        )
        inference_metrics.service.on_scrape(self._refresh_metrics)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> AppState:
        registry = self.registry
        await registry.refresh()
        self.state.ready = True
        self._tasks = [
            asyncio.create_task(watch_store(registry, self._stop)),
            asyncio.create_task(registry.run_reaper()),
        ]
        for name in filter(None, (n.strip() for n in self.settings.preload.split(","))):
            model = await registry.find(name)
            async with registry.use(model.name, model.purpose or "chat", keep_alive=-1):
                logger.info("preloaded %s", name)
        return self.state

    async def _refresh_metrics(self) -> None:
        registry = self.registry
        self.state.metrics.set_loaded(
            registry.report(), registry.loading, registry.settings.max_loaded_models
        )

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.registry.close()


def create_app(settings: Settings, engine_factory: EngineFactory | None = None) -> FastAPI:
    runtime = InferenceRuntime(settings, engine_factory)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pendra = await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(title="Pendra inference", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(router)
    return app


def run(settings: Settings) -> None:
    """Check that llama.cpp runs on this host, then run the inference service until SIGINT or
    SIGTERM."""
    check_exposure(settings, authenticated=False)  # before the self-check's wait
    preflight(settings)
    serve_http(create_app(settings), settings, authenticated=False)
