"""`/v1/*` on the gateway: forwarded to the inference service with one shared `httpx.AsyncClient`
(to the endpoint `routing.Router` picks, where there are several).

Bytes pass through as they come (no buffering, no re-encoding), so a streamed completion reaches
the client token by token. When the client goes away, Starlette stops the stream and the
response's background task closes the upstream request, which makes the inference service stop
generating. An endpoint that refuses the connection, or closes it before answering, is skipped
for the next one; when none can be reached the answer is a 503 with Retry-After. One that dies
in the middle of an event stream ends it with an error event and `[DONE]`, not a silent cut.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pendra_shared.api_errors import NotFound, UpstreamUnavailable, stream_error_end
from pendra_shared.metrics import DURATION_BUCKETS, ServiceMetrics
from prometheus_client import Counter, Gauge, Histogram
from starlette.background import BackgroundTask

from pendra_api.http_metrics import route_label
from pendra_api.routing import Endpoint, Route, Router

logger = logging.getLogger(__name__)

router = APIRouter()

# Request headers worth forwarding; the rest (authorization, cookies, hop-by-hop) stay here.
FORWARD_REQUEST = ("content-type", "accept", "x-request-id", "openai-organization", "user-agent")
# Response headers that describe one hop, not the content.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "te", "trailer"}
)


def upstream_client(base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        # No read timeout: a long prompt on a slow host may take minutes before its first token.
        timeout=httpx.Timeout(connect=5.0, read=None, write=60.0, pool=30.0),
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
        headers={"Accept-Encoding": "identity"},
    )


class UpstreamMetrics:
    def __init__(self, metrics: ServiceMetrics) -> None:
        self.latency = Histogram(
            "pendra_api_upstream_latency_seconds",
            "Time until the inference service's response headers.",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=metrics.registry,
        )
        self.unavailable = Counter(
            "pendra_api_upstream_unavailable",
            "503s answered because the inference service could not be reached.",
            ["route"],
            registry=metrics.registry,
        )
        self.unavailable.labels("/v1/chat/completions")  # from zero, so its rate shows the first one
        self.routed = Counter(
            "pendra_api_routed_requests",
            "Requests sent to an inference endpoint, by why it was chosen: prefix (it holds the "
            "conversation), model (it has the model loaded, with room), least_loaded, only (one "
            "endpoint configured), or retried (the first choice could not be reached).",
            ["reason"],
            registry=metrics.registry,
        )
        self.endpoints = Gauge(
            "pendra_api_inference_endpoints",
            "Inference endpoints the gateway knows, up (its /status answers) or down.",
            ["state"],
            registry=metrics.registry,
        )

    def count_endpoints(self, router: Router) -> None:
        up = sum(e.up for e in router.endpoints.values())
        self.endpoints.labels("up").set(up)
        self.endpoints.labels("down").set(len(router.endpoints) - up)


# The inference service's routes outside /v1 that the gateway passes on as they are.
PASSED = {
    "/rerank": ["POST"],
    "/tokenize": ["POST"],
    "/detokenize": ["POST"],
    # Ollama's model-running routes (pendra_inference.ollama); its store routes are the gateway's.
    "/api/chat": ["POST"],
    "/api/generate": ["POST"],
    "/api/embed": ["POST"],
    "/api/embeddings": ["POST"],
    "/api/ps": ["GET"],
}


@router.api_route("/v1/{path:path}", methods=["GET", "POST", "DELETE"], include_in_schema=False)
async def forward(path: str, request: Request) -> StreamingResponse:
    if any(part in (".", "..") for part in path.split("/")):
        # httpx would resolve them and reach a path outside /v1 on the inference service.
        raise NotFound(f"no route for /v1/{path}")
    return await _pass(request, f"/v1/{path}")


def _passer(path: str) -> Callable[[Request], Awaitable[StreamingResponse]]:
    async def passed(request: Request) -> StreamingResponse:
        return await _pass(request, path)

    return passed


for _path, _methods in PASSED.items():
    router.add_api_route(_path, _passer(_path), methods=_methods, include_in_schema=False)


async def _pass(request: Request, path: str) -> StreamingResponse:
    """The request to the inference service, its answer's bytes back as they come."""
    client: httpx.AsyncClient = request.app.state.upstream
    router: Router = request.app.state.router
    metrics: UpstreamMetrics = request.app.state.upstream_metrics
    label = route_label(request.scope)
    headers = {k: v for k in FORWARD_REQUEST if (v := request.headers.get(k)) is not None}
    body = await request.body()
    route = router.route(body, path)
    started = time.monotonic()
    dropped = 0
    for endpoint in route.endpoints:
        upstream = client.build_request(
            request.method, endpoint.url + path, params=request.query_params, headers=headers, content=body
        )
        router.sent(route, endpoint)
        try:
            response = await client.send(upstream, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # Refused: the request never reached it, the next endpoint may serve it.
            router.ended(route, endpoint)
            router.unreachable(endpoint)
            logger.warning("inference service unreachable at %s: %s", endpoint.url, exc)
            continue
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            # Closed before an answer: a kept-alive connection to a process that has gone (then
            # the request never ran), or one that died of this very request. Sent on once, and
            # only when the endpoint now refuses connections: gone, not busy.
            router.ended(route, endpoint)
            logger.warning("inference service at %s closed the connection: %s", endpoint.url, exc)
            if dropped or not await _refuses(client, endpoint):
                break
            dropped += 1
            router.unreachable(endpoint)
            continue
        except BaseException as exc:  # a timeout, or the client went away: nothing is in flight
            router.ended(route, endpoint)
            if not isinstance(exc, httpx.TransportError):
                raise
            logger.warning("inference service at %s failed: %s", endpoint.url, exc)
            break
        router.answered(route, endpoint, response.status_code)
        metrics.latency.labels(label).observe(time.monotonic() - started)
        metrics.routed.labels(route.reason if endpoint is route.endpoints[0] else "retried").inc()
        end = _Ending(response, router, route, endpoint)
        return StreamingResponse(
            relay(response, end),
            status_code=response.status_code,
            headers={k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP},
            background=BackgroundTask(end),
        )
    metrics.unavailable.labels(label).inc()
    raise UpstreamUnavailable(
        "the inference service is not reachable (starting or restarting?); retry shortly"
    )


async def _refuses(client: httpx.AsyncClient, endpoint: Endpoint) -> bool:
    try:
        await client.get(f"{endpoint.url}/health", timeout=1.0)
    except (httpx.ConnectError, httpx.ConnectTimeout):
        return True
    except httpx.HTTPError:
        return False
    return False


class _Ending:
    """Closes the upstream response and ends the request's count once, whichever comes first:
    the relay's end (a cut stream, a client gone) or the response's background task."""

    def __init__(self, response: httpx.Response, router: Router, route: Route, endpoint: Endpoint) -> None:
        self.response, self.router, self.route, self.endpoint = response, router, route, endpoint
        self.done = False

    async def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            await self.response.aclose()
        finally:
            self.router.ended(self.route, self.endpoint)


async def relay(
    response: httpx.Response, end: Callable[[], Awaitable[None]] | None = None
) -> AsyncIterator[bytes]:
    """The upstream bytes as they come; if the inference service goes away mid-stream, an event
    stream ends the way a client can read (an error event, then `[DONE]`). `end` runs however the
    relay ends (Starlette skips the background task when the stream raises)."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.TransportError as exc:
        logger.warning("inference service went away mid-response: %s", type(exc).__name__)
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            raise  # a cut JSON body must not look complete: the client sees the connection drop
        message = "the inference service stopped before this response finished; retry it"
        yield b"\n\n" + stream_error_end(UpstreamUnavailable(message))  # after a possibly cut event
    finally:
        if end is not None:
            await end()
