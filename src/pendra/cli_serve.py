"""`pendra serve [all|api|fetcher|inference]`: everything in one process (the default), or one
service of the compose stack, exactly as its container runs it."""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any

import typer
from pendra_shared.config import load_settings


class Service(StrEnum):
    ALL = "all"
    API = "api"
    FETCHER = "fetcher"
    INFERENCE = "inference"


def serve(
    service: Service = typer.Argument(
        Service.ALL, help="all: API, inference and installs in one process; or one service of the stack."
    ),
    host: str | None = typer.Option(None, help="Listen address (default: PENDRA_HOST, 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Listen port (default: PENDRA_PORT, 8080)."),
    preload: list[str] = typer.Option([], "--preload", help="Load this model at start (repeatable)."),
) -> None:
    """Serve the store's models on an OpenAI-compatible API, with model management under /api."""
    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if preload:
        overrides["preload"] = ",".join(preload)
    settings = load_settings(**overrides)

    root = logging.getLogger()
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
    if service == Service.FETCHER:
        from pendra_fetcher.worker import run as run_fetcher

        run_fetcher(settings)
        return
    if service == Service.API:
        from pendra_api.app import run as run_api

        run_api(settings)
        return
    if service == Service.INFERENCE:
        from pendra_inference.app import run as run_inference

        run_inference(settings)
        return

    from pendra_api.http_metrics import around
    from pendra_inference.doctor import preflight
    from pendra_shared.http_guard import check_exposure
    from pendra_shared.service import serve_http

    from pendra.embedded import create_embedded_app

    check_exposure(settings, authenticated=bool(settings.api_key_list))  # before the self-check's wait
    preflight(settings)
    app = create_embedded_app(settings)
    serve_http(app, settings, authenticated=bool(settings.api_key_list), measure=around(app))
