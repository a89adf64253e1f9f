"""`pendra serve`'s all-in-one app: the inference runtime, the management API and an in-process
install queue in one process, with no Redis, no MinIO and no HTTP hop between API and inference.
The routes are the services' own; only the wiring differs from the compose stack."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from pendra_api import management
from pendra_api.auth import secure
from pendra_api.http_metrics import HTTPMetrics
from pendra_api.local_queue import LocalQueue
from pendra_api.management import Management
from pendra_inference.app import InferenceRuntime
from pendra_inference.routes import router as inference_router
from pendra_shared.api_errors import install_error_handlers
from pendra_shared.catalogue import Catalogue
from pendra_shared.config import Settings
from pendra_shared.install_metrics import InstallMetrics
from pendra_shared.metrics import ServiceMetrics
from pendra_shared.store import ModelStore


def create_embedded_app(settings: Settings) -> FastAPI:
    # One registry for the process: inference, HTTP and install metrics on the one /metrics
    # (the inference router's).
    metrics = ServiceMetrics()
    runtime = InferenceRuntime(settings, metrics=metrics)
    store = ModelStore.from_settings(settings)
    queue = LocalQueue(settings, store, InstallMetrics(metrics.registry))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await queue.start()
        app.state.management = Management(Catalogue.load(settings.catalogue_locations), store, queue)
        app.state.pendra = await runtime.start()
        try:
            yield
        finally:
            await queue.close()
            await runtime.stop()

    app = FastAPI(title="Pendra", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(inference_router)
    app.include_router(management.router)
    management.count_active_jobs(app, metrics)
    # Requests are counted around the network guards (`serve_http(measure=around(app))`).
    app.state.http_metrics = HTTPMetrics(metrics)
    secure(app, settings, app.state.http_metrics)
    return app
