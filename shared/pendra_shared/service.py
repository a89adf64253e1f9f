"""What every service's entry point shares: logging, settings, a clean exit, and the HTTP server."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from pendra_shared.config import Settings, load_settings
from pendra_shared.errors import PendraError


def run_service(name: str, run: Callable[[Settings], None]) -> None:
    """Run one service until it stops; a Pendra error (bad settings) is one line on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(load_settings())
    except PendraError as exc:
        sys.stderr.write(f"pendra {name}: error: {exc}\n")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def serve_http(app: Any, settings: Settings) -> None:
    """Serve an ASGI app on PENDRA_HOST:PENDRA_PORT until SIGINT or SIGTERM (uvicorn is imported
    here, so the CLI's store commands never load it)."""
    import uvicorn

    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=5)
