"""`pendra serve`: run the inference service (for now; the API and fetcher join it later)."""

from __future__ import annotations

import logging
from typing import Any

import typer
from pendra_shared.config import load_settings


def serve(
    host: str | None = typer.Option(None, help="Listen address (default: PENDRA_HOST, 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Listen port (default: PENDRA_PORT, 8080)."),
    preload: list[str] = typer.Option([], "--preload", help="Load this model at start (repeatable)."),
) -> None:
    """Serve the store's chat and embedding models on an OpenAI-compatible API."""
    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if preload:
        overrides["preload"] = ",".join(preload)
    settings = load_settings(**overrides)

    import uvicorn
    from pendra_inference.app import create_app

    root = logging.getLogger()
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=5,
    )
