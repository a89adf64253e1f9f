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


def serve_http(
    app: Any, settings: Settings, *, authenticated: bool, measure: Callable[[Any], Any] | None = None
) -> None:
    """Serve an ASGI app on PENDRA_HOST:PENDRA_PORT until SIGINT or SIGTERM, behind Pendra's
    network guards (`pendra_shared.http_guard`). `authenticated` says whether the app checks
    PENDRA_API_KEYS; one that does not, or has no keys, refuses a non-loopback address unless
    PENDRA_ALLOW_OPEN. `measure` wraps the guarded app: the HTTP metrics, which count the guards'
    answers too. uvicorn is imported here, so the CLI's store commands never load it."""
    from pendra_shared.http_guard import check_exposure, guard
    from pendra_shared.http_server import serve

    check_exposure(settings, authenticated=authenticated)
    guarded, draining = guard(app, settings, authenticated=authenticated)
    serve(measure(guarded) if measure is not None else guarded, draining, settings)
