"""`pendra serve`'s all-in-one app: the inference runtime, the management API and an in-process
install queue in one process, with no Redis, no MinIO and no HTTP hop between API and inference.
The routes are the services' own; only the wiring differs from the compose stack."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from pendra_api import management, ollama
from pendra_api.auth import secure
from pendra_api.console import routes as console
from pendra_api.http_metrics import HTTPMetrics
from pendra_api.local_queue import LocalQueue
from pendra_api.management import Management
from pendra_inference.app import InferenceRuntime
from pendra_inference.routes import router as inference_router
from pendra_inference.routes import status_report
from pendra_inference.state import AppState
from pendra_shared.api_errors import install_error_handlers
from pendra_shared.catalogue import Catalogue
from pendra_shared.config import Settings
from pendra_shared.install_metrics import InstallMetrics
from pendra_shared.metrics import ServiceMetrics
from pendra_shared.store import ModelStore

logger = logging.getLogger(__name__)


def console_host(host: str) -> str:
    """The address to open in a browser for a listen address."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class LocalSystem:
    """The console's view of this process's own runtime (the gateway asks over HTTP instead)."""

    def __init__(self, state: AppState, metrics: ServiceMetrics) -> None:
        self.state = state
        self.metrics = metrics

    async def status(self) -> dict[str, Any]:
        return status_report(self.state)

    async def metrics_text(self) -> str:
        return (await self.metrics.render()).decode()


def create_embedded_app(settings: Settings) -> FastAPI:
    # One registry for the process: inference, HTTP and install metrics on the one /metrics
    # (the inference router's).
    metrics = ServiceMetrics()
    runtime = InferenceRuntime(settings, metrics=metrics)
    store = ModelStore.from_settings(settings)
    # A job says `done` only once the registry lists its model (the store watcher would, later).
    queue = LocalQueue(
        settings, store, InstallMetrics(metrics.registry), before_done=runtime.registry.refresh
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await queue.start()
        app.state.pendra = await runtime.start()
        app.state.management = Management(
            Catalogue.load(settings.catalogue_locations),
            store,
            queue,
            LocalSystem(app.state.pendra, metrics),
            allow_hf=bool(settings.allow_hf),  # unset: off for installs asked through the API
            hf_endpoint=settings.hf_endpoint,
        )
        logger.info("console: http://%s:%d/console/", console_host(settings.host), settings.port)
        try:
            yield
        finally:
            await queue.close()
            await runtime.stop()

    app = FastAPI(title="Pendra", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(inference_router)
    app.include_router(management.router)
    app.include_router(ollama.router)
    app.include_router(console.fragments)
    app.include_router(console.pages)
    management.count_active_jobs(app, metrics)
    # Requests are counted around the network guards (`serve_http(measure=around(app))`).
    app.state.http_metrics = HTTPMetrics(metrics)
    secure(app, settings, app.state.http_metrics)
    return app
