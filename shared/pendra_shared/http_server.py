"""Pendra's HTTP server: uvicorn with a receive deadline on every connection and a draining
shutdown. Imported only by `serve_http`, so the CLI's store commands never load uvicorn.

- **Receive deadline** (`PENDRA_RECEIVE_TIMEOUT_S`): a connection has that long to deliver a whole
  request, headers and body, from its first byte (or from connecting); past it, it is closed.
  uvicorn has none (its keep-alive timer stops at the first byte), so a client sending one header
  byte every few seconds would hold a connection, and its memory, forever.
- **Shutdown** (SIGTERM or SIGINT): new requests get 503 at once while the running ones go on for
  up to `PENDRA_SHUTDOWN_TIMEOUT_S`; those still running then end with an error event; the
  process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pendra_shared.config import Settings
from pendra_shared.http_guard import Draining

logger = logging.getLogger(__name__)


class DeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline from a request's first byte to its last."""

    receive_timeout_s = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        if getattr(self, "_deadline", None) is None:
            self._deadline = self.loop.call_later(self.receive_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            logger.info("closing a connection that sent no complete request in %ss", self.receive_timeout_s)
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._receiving = True
        if self.cycle is None or self.cycle.response_complete:
            self._arm()
        # else: a request pipelined behind one still responding, whose deadline would cut that
        # response; its clock starts when that response completes (below).

    def on_message_complete(self) -> None:
        self._receiving = False
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if getattr(self, "_receiving", False) and not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class DrainingServer(uvicorn.Server):
    """Stops in two steps: drain (503 to new requests, wait for running ones), then uvicorn's own
    shutdown. Exits 0 on the signal it handled instead of re-raising it."""

    def __init__(self, config: uvicorn.Config, draining: Draining, timeout_s: float) -> None:
        super().__init__(config)
        self.draining = draining
        self.timeout_s = timeout_s
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is not None or self.should_exit:
            self.should_exit = True
            self.force_exit = True
            return
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(self._start_drain, sig)

    def _start_drain(self, sig: int) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain(sig))

    async def _drain(self, sig: int) -> None:
        name = signal.Signals(sig).name
        running = len(self.draining.running)
        logger.info(
            "%s: draining %d running request(s) for up to %ss; new requests get 503",
            name,
            running,
            self.timeout_s,
        )
        self.draining.begin()
        if not await self.draining.wait_idle(self.timeout_s):
            logger.warning("shutdown timeout: ending %d request(s) still running", len(self.draining.running))
            await self.draining.abort()
        self.should_exit = True


def serve(app: Any, draining: Draining, settings: Settings) -> None:
    protocol = type("Protocol", (DeadlineProtocol,), {"receive_timeout_s": settings.receive_timeout_s})
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        http=protocol,
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(config, draining, settings.shutdown_timeout_s)
    server.run()
