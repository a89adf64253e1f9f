"""What stands between the network and every Pendra HTTP service, as plain ASGI middleware.

    guard(app, settings, authenticated=...)
    ├── Draining      on SIGTERM: new requests 503; running ones finish, or end with an error event
    ├── HostAllowList bound to loopback without keys: only local Host names (DNS rebinding)
    └── BodyLimit     bodies past PENDRA_MAX_BODY_BYTES: 413, read no further than the limit

`check_exposure` refuses to start a server that anyone on the network could use: a non-loopback
address with no API keys, unless PENDRA_ALLOW_OPEN says so. The connection's receive deadline
lives in the HTTP protocol itself (`pendra_shared.http_server`), because a client that never
finishes its headers never reaches the app.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pendra_shared.api_errors import APIError, stream_error_end
from pendra_shared.config import Settings
from pendra_shared.errors import ConfigError

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health", "/metrics"})
LOCAL_SUFFIXES = (".localhost", ".local", ".internal")


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class HostNotAllowed(APIError):
    status = 403
    type = "invalid_request_error"
    code = "host_not_allowed"


class ShuttingDown(APIError):
    status = 503
    type = "server_error"
    code = "shutting_down"


async def send_error(
    send: Send, error: APIError, *, close: bool = False, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """Answer with `error`'s OpenAI-style body, from plain ASGI middleware (before any app)."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += extra
    if error.status == 503:
        headers.append((b"retry-after", b"5"))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


# -- exposure -------------------------------------------------------------------------------------


def exposure_address(settings: Settings) -> str:
    """The address clients reach this server at: PENDRA_PUBLISHED (compose publishes the
    container's port on the host) or else PENDRA_HOST."""
    published = settings.published.strip()
    if not published:
        return settings.host
    if published.startswith("["):  # [::1]:8080
        return published[1 : published.index("]")] if "]" in published else published
    host, sep, _port = published.rpartition(":")
    if not sep or not host:  # "8080": docker publishes on every interface
        return "0.0.0.0"
    return host


def is_loopback(address: str) -> bool:
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings, *, authenticated: bool) -> None:
    """Refuse to serve an unauthenticated API beyond this machine, unless the operator says so."""
    address = exposure_address(settings)
    if is_loopback(address) or authenticated or settings.allow_open:
        return
    raise ConfigError(
        f"refusing to listen on {address} without API keys: anyone who reaches it could use and "
        "manage this server. Set PENDRA_API_KEYS, listen on 127.0.0.1, or set PENDRA_ALLOW_OPEN=1 "
        "if a proxy or network policy guards it."
    )


# -- middleware -----------------------------------------------------------------------------------


class BodyLimit:
    """Refuses a body past `limit` bytes with 413: by its Content-Length before the app runs, or,
    for a chunked body, as the app reads it. Nothing is read ahead, so a request the app refuses
    first (no API key) never has its body read at all."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(
            f"the request body is larger than this server accepts ({self.limit} bytes, PENDRA_MAX_BODY_BYTES)"
        )
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await send_error(send, too_large, close=True)
            return
        received = 0
        refused = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    refused = True
                    if not started:
                        await send_error(send, too_large, close=True)
                    return {"type": "http.disconnect"}  # the app stops reading; its answer is ours
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:  # the app's own failure; one over the limit has been answered
                raise


def host_allowed(host: str, extra: list[str]) -> bool:
    """Ollama's rule: loopback and private addresses, localhost, *.local, *.internal, this
    machine's own name, and what PENDRA_ALLOWED_HOSTS adds."""
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.rstrip(".").lower()
    if not name:
        return False
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return address.is_loopback or address.is_private or address.is_unspecified
    if name == "localhost" or name.endswith(LOCAL_SUFFIXES) or name in extra:
        return True
    own = socket.gethostname().lower()
    return name == own or name == own.split(".")[0]


class HostAllowList:
    """Against DNS rebinding: a page on attacker.example whose name now resolves to 127.0.0.1
    reaches this server with `Host: attacker.example`, which is refused with 403."""

    def __init__(self, app: ASGIApp, extra: list[str]) -> None:
        self.app = app
        self.extra = extra

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = _header(scope, b"host")
            # HTTP/1.0 may send no Host at all; a browser always sends one.
            if host is not None and not host_allowed(host.decode("latin-1"), self.extra):
                await send_error(
                    send,
                    HostNotAllowed(
                        "this server answers only to local host names; add the name to "
                        "PENDRA_ALLOWED_HOSTS to reach it by that name"
                    ),
                    close=True,
                )
                return
        await self.app(scope, receive, send)


class Draining:
    """Graceful shutdown. `begin()` (on SIGTERM) makes new requests a 503 with Retry-After; the
    requests already running go on. `abort()` (when PENDRA_SHUTDOWN_TIMEOUT_S is up) cancels those
    still running: an event stream gets an error event and `[DONE]`, a response not yet started
    gets the 503."""

    # The scope key under which an app finds `stopping`: an endless stream (the console's job
    # events) ends itself when it is set rather than holding the shutdown to its timeout.
    SCOPE_KEY = "pendra.stopping"

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.draining = False
        self.stopping = asyncio.Event()
        self.running: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        self.draining = True
        self.stopping.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def abort(self) -> None:
        tasks = list(self.running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.draining and scope["path"] not in OPEN_PATHS:
            await send_error(send, ShuttingDown("the server is shutting down; retry shortly"), close=True)
            return
        scope[self.SCOPE_KEY] = self.stopping
        started = False
        stream = False
        finished = False

        async def tracked_send(message: Message) -> None:
            nonlocal started, stream, finished
            if message["type"] == "http.response.start":
                started = True
                content_type = dict(message.get("headers", ())).get(b"content-type", b"")
                stream = bytes(content_type).startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        task = asyncio.current_task()
        assert task is not None
        self.running.add(task)
        self._idle.clear()
        try:
            await self.app(scope, receive, tracked_send)
        except asyncio.CancelledError:
            if not self.draining or finished:
                raise
            # Shutdown ran out of time for this request: end it the way a client can read.
            task.uncancel()
            message = "the server shut down before this response finished; retry it"
            if not started:
                await send_error(send, ShuttingDown(message), close=True)
            elif stream:
                body = stream_error_end(ShuttingDown(message))
                await send({"type": "http.response.body", "body": body, "more_body": False})
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.running.discard(task)
            if not self.running:
                self._idle.set()


def guard(app: ASGIApp, settings: Settings, *, authenticated: bool) -> tuple[ASGIApp, Draining]:
    """Wrap an app in Pendra's network guards, outermost first: draining, the Host allow-list
    (only where it applies), the body limit."""
    guarded: ASGIApp = BodyLimit(app, settings.max_body_bytes)
    if is_loopback(exposure_address(settings)) and not authenticated:
        guarded = HostAllowList(guarded, settings.allowed_host_list)
    draining = Draining(guarded)
    return draining, draining
