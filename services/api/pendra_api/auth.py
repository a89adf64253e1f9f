"""Bearer-token API keys and CORS for the gateway.

With `PENDRA_API_KEYS` set, every request but `/health`, `/ready`, `/metrics` and the console's
page shells and assets (`/`, `/console/...`: they hold no data; the data they show comes from
`/api`, with the key) needs `Authorization: Bearer <key>`; the token is compared with every key
in constant time, so timing tells nothing about which key or how much of it matched. CORS sits
outside the check, so browser preflights are answered without a key.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import FastAPI
from pendra_shared.api_errors import Unauthorized
from pendra_shared.config import Settings
from pendra_shared.http_guard import send_error
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from pendra_api.http_metrics import HTTPMetrics

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/", "/console"})
OPEN_PREFIXES = ("/console/",)


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def key_matches(token: bytes, keys: list[bytes]) -> bool:
    """Compares SHA-256 digests, so the time taken depends on neither a key's length nor which key
    matched (no early exit)."""
    digest = hashlib.sha256(token).digest()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(digest, hashlib.sha256(key).digest())
    return matched


class BearerAuth:
    def __init__(self, app: ASGIApp, keys: list[str], metrics: HTTPMetrics | None = None) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        sent = [value for name, value in scope["headers"] if name == b"authorization"]
        header = sent[0] if len(sent) == 1 else b""
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and key_matches(token.strip(), self.keys):
            await self.app(scope, receive, send)
            return
        # More than one Authorization header is refused: proxies disagree on which one counts.
        problem = "missing bearer token" if not sent else "invalid API key"
        if self.metrics is not None:
            reason = "missing" if not sent else "invalid" if scheme.lower() == b"bearer" else "malformed"
            self.metrics.auth_failures.labels(reason).inc()
        error = Unauthorized(f"{problem}: send Authorization: Bearer <one of PENDRA_API_KEYS>")
        await send_error(send, error, extra=((b"www-authenticate", b"Bearer"),))


def secure(app: FastAPI, settings: Settings, metrics: HTTPMetrics | None = None) -> None:
    """Add the API-key check (when keys are set) and CORS (when origins are set); with `metrics`,
    refused keys are counted (the requests themselves by `http_metrics.around`, outside both)."""
    if settings.api_key_list:
        app.add_middleware(BearerAuth, keys=settings.api_key_list, metrics=metrics)
    origins = settings.cors_origin_list
    if origins:  # added last, so it runs first
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],  # the openai SDK in a browser sends its own x-stainless-* headers
            allow_credentials="*" not in origins,
            max_age=600,
        )
