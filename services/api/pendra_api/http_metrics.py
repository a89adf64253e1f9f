"""The gateway's HTTP metrics: requests by route template, method and status, the time to a
response's headers, event streams open, and API keys refused.

A pure ASGI middleware (never buffering a stream) that `serve_http` puts around the network guards
(`around(app)`), so it counts their 413s, 403s and draining 503s as well as the key check's 401s.
The route label is the matched route's template, never the raw path: `/api/models/{name}`, the
OpenAI path under `/v1` when it is one Pendra knows (`/v1/models/{model_id}`, as the inference
service names it), `/v1/{path}` for any other, `unmatched` when no route matches, so clients cannot
grow the label set.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from pendra_shared.metrics import DURATION_BUCKETS, ServiceMetrics
from prometheus_client import Counter, Gauge, Histogram
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The `/v1` paths clients use, forwarded by the gateway's catch-all route under their own name.
KNOWN_V1 = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/responses",
        "/v1/rerank",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/variations",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/v1/audio/speech",
    }
)
PROXY_TEMPLATE = "/v1/{path:path}"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_CONVERTER = re.compile(r"\{(\w+):\w+\}")


class HTTPMetrics:
    def __init__(self, metrics: ServiceMetrics) -> None:
        r = metrics.registry
        self.requests = Counter(
            "pendra_api_requests",
            "Requests answered, by route template (`/api/models/{name}`; the OpenAI path under `/v1`; "
            "`unmatched`).",
            ["route", "method", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "pendra_api_request_duration_seconds",
            "Time until the response's headers were sent.",
            ["route", "method"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.streams = Gauge(
            "pendra_api_streams_open", "Event streams being sent (chat streams, job progress).", registry=r
        )
        self.auth_failures = Counter(
            "pendra_api_auth_failures",
            "Requests refused for their API key: missing, invalid or malformed (the key itself is never "
            "recorded).",
            ["reason"],
            registry=r,
        )


def _template(routes: Any, scope: Scope, prefix: str = "") -> str | None:
    """The template of the first route whose path matches (FastAPI keeps an included router's
    routes inside it, with the prefix it was included under)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            extra = str(getattr(getattr(route, "include_context", None), "prefix", "") or "")
            if scope["path"].startswith(extra):
                found = _template(
                    inner.routes, {**scope, "path": scope["path"][len(extra) :]}, prefix + extra
                )
                if found is not None:
                    return found
            continue
        match, _child = route.matches(scope)
        if match != Match.NONE and getattr(route, "path", None) is not None:
            return prefix + str(route.path)
    return None


def route_label(scope: Scope) -> str:
    """The route template of a request that has been routed, or found by matching it now (a
    request refused before routing, by the key check, say)."""
    template = getattr(scope.get("route"), "path", None)
    if template is None:
        app = scope.get("app")
        template = _template(getattr(getattr(app, "router", None), "routes", ()), scope)
    if template is None:
        return "unmatched"
    if template == PROXY_TEMPLATE:
        path = scope["path"]
        if path in KNOWN_V1:
            return str(path)
        return "/v1/models/{model_id}" if path.startswith("/v1/models/") else "/v1/{path}"
    return _CONVERTER.sub(r"{\1}", template)


def method_label(scope: Scope) -> str:
    method = str(scope["method"])
    return method if method in METHODS else "other"


class HTTPMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: HTTPMetrics, owner: Any) -> None:
        self.app = app
        self.metrics = metrics
        self.owner = owner  # the FastAPI app, for matching requests a guard answered before routing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500  # what the server answers when the app raises before its headers
        route: str | None = None
        streaming = False

        def label() -> str:
            scope.setdefault("app", self.owner)
            return route_label(scope)

        async def measured_send(message: Message) -> None:
            nonlocal status, route, streaming
            if message["type"] == "http.response.start":
                status = message["status"]
                route = label()
                self.metrics.duration.labels(route, method_label(scope)).observe(time.monotonic() - started)
                headers = dict(message.get("headers", ()))
                if headers.get(b"content-type", b"").startswith(b"text/event-stream"):
                    streaming = True
                    self.metrics.streams.inc()
            await send(message)

        try:
            await self.app(scope, receive, measured_send)
        finally:
            if streaming:  # ended, the client left, or it failed: no longer open
                self.metrics.streams.dec()
            self.metrics.requests.labels(route or label(), method_label(scope), str(status)).inc()


def around(app: Any) -> Callable[[ASGIApp], ASGIApp]:
    """The HTTP metrics middleware of `app` (created with `app.state.http_metrics`), for
    `serve_http(..., measure=around(app))`."""
    metrics: HTTPMetrics = app.state.http_metrics
    return lambda inner: HTTPMetricsMiddleware(inner, metrics, app)
