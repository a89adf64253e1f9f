"""The API gateway's FastAPI application: `/v1/*` proxied to the inference service, `/api/*` for
model management over the arq install queue, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pendra_shared.api_errors import APIError, install_error_handlers
from pendra_shared.catalogue import Catalogue
from pendra_shared.config import Settings
from pendra_shared.install_metrics import JobMetrics
from pendra_shared.metrics import MEDIA_TYPE, ServiceMetrics
from pendra_shared.service import serve_http
from pendra_shared.store import ModelStore

from pendra_api import management, ollama, proxy
from pendra_api.arq_queue import ArqQueue
from pendra_api.auth import secure
from pendra_api.console import routes as console
from pendra_api.console.system import UpstreamSystem
from pendra_api.http_metrics import HTTPMetrics, around
from pendra_api.management import Management
from pendra_api.queue import InstallQueue
from pendra_api.routing import Router

logger = logging.getLogger(__name__)


def create_app(settings: Settings, queue: InstallQueue | None = None) -> FastAPI:
    metrics = ServiceMetrics()
    http_metrics = HTTPMetrics(metrics)
    upstream_metrics = proxy.UpstreamMetrics(metrics)

    async def count_endpoints() -> None:
        router = getattr(app.state, "router", None)
        if router is not None:
            upstream_metrics.count_endpoints(router)

    metrics.on_scrape(count_endpoints)
    job_metrics = JobMetrics(metrics.registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        install_queue = queue or ArqQueue(settings.redis_url, job_metrics)
        await install_queue.start()
        urls = settings.inference_urls
        app.state.upstream = proxy.upstream_client(urls[0])
        app.state.router = Router(urls, resolve=settings.inference_resolve, poll_s=settings.inference_poll_s)
        await app.state.router.start()
        app.state.management = Management(
            Catalogue.load(settings.catalogue_locations),
            ModelStore.from_settings(settings),
            install_queue,
            UpstreamSystem(app.state.upstream),
            allow_hf=bool(settings.allow_hf),  # unset: off for installs asked through the API
            hf_endpoint=settings.hf_endpoint,
        )
        app.state.upstream_metrics = upstream_metrics
        logger.info(
            "gateway ready: inference at %s, queue %s", settings.inference_url, type(install_queue).__name__
        )
        try:
            yield
        finally:
            await app.state.router.close()
            await app.state.upstream.aclose()
            await install_queue.close()

    app = FastAPI(title="Pendra API", version="0.1.0", lifespan=lifespan)
    app.state.http_metrics = http_metrics  # counted around the network guards: see run()
    management.count_active_jobs(app, metrics)
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """Ready when the install queue answers; the inference service's state is reported too."""
        body: dict[str, Any] = {"status": "ready", "queue": "ok"}
        try:
            await request.app.state.management.queue.check()
        except APIError as exc:
            body.update(status="unavailable", queue=exc.message)
        body["inference"] = await inference_ready(request.app.state.upstream, request.app.state.router)
        status = 200 if body["status"] == "ready" else 503
        return JSONResponse(body, status_code=status, headers={"Retry-After": "5"} if status == 503 else None)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_route() -> Response:
        return Response(await metrics.render(), media_type=MEDIA_TYPE)

    app.include_router(management.router)
    app.include_router(ollama.router)
    app.include_router(console.fragments)
    app.include_router(console.pages)
    app.include_router(proxy.router)
    secure(app, settings, http_metrics)
    return app


async def inference_ready(client: httpx.AsyncClient, router: Router) -> str:
    """ "ok" when an inference endpoint is ready, else what the first one answered (all asked at
    once, within the probe's second)."""

    async def ask(url: str) -> str:
        try:
            upstream = await client.get(f"{url}/ready", timeout=0.8)
        except httpx.TransportError:
            return "unreachable"
        return "ok" if upstream.status_code == 200 else f"HTTP {upstream.status_code}"

    answers = await asyncio.gather(*(ask(e.url) for e in list(router.endpoints.values())))
    return "ok" if "ok" in answers else (answers[0] if answers else "unreachable")


def run(settings: Settings) -> None:
    """Run the gateway until SIGINT or SIGTERM."""
    app = create_app(settings)
    serve_http(app, settings, authenticated=bool(settings.api_key_list), measure=around(app))
