"""Prometheus metrics, as every Pendra service exposes them on `/metrics`.

Each process keeps one `ServiceMetrics`: a registry of its own (so two apps in one process, as in
tests, never share counters) and the coroutines that refresh gauges just before a scrape (the
schedulers' queue and KV-cache figures, the install queue's job states). `pendra serve` passes one
`ServiceMetrics` to every part it runs, so its single `/metrics` holds them all.

The names, types, labels and help texts are documented in the README's metrics table, and a test
compares that table with what the services expose.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest, make_wsgi_app

from pendra_shared.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

logger = logging.getLogger(__name__)

# The `_created` series prometheus-client adds beside each counter and histogram double a scrape's
# size and mean nothing on a dashboard.
disable_created_metrics()  # type: ignore[no-untyped-call]

MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), the reference operators know.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# Short operations (an HTTP hop, a model load, a verify): 5 ms to 20 minutes.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
)  # fmt: skip


def token_buckets(max_len: int = 1_000_000) -> tuple[int, ...]:
    """vLLM's 1-2-5 series up to `max_len` (its `build_1_2_5_buckets`)."""
    out: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_len:
                return tuple(out)
            out.append(value)
        exponent += 1


TOKEN_BUCKETS = token_buckets()

Refresher = Callable[[], Awaitable[None]]


class ServiceMetrics:
    """One process's registry, and the refreshers run before each scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._refreshers: list[Refresher] = []

    def on_scrape(self, refresher: Refresher) -> None:
        self._refreshers.append(refresher)

    async def render(self) -> bytes:
        for refresh in self._refreshers:
            try:
                await refresh()
            except Exception as exc:  # a gauge that cannot be read must not cost the whole scrape
                logger.warning("refreshing metrics failed: %s: %s", type(exc).__name__, exc)
        return generate_latest(self.registry)


class _MetricsServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up the fetcher's exit


class _MetricsServer6(_MetricsServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # a scrape every 15 s is not news
        pass


def metrics_wsgi_app(metrics: ServiceMetrics) -> WSGIApplication:
    """`/metrics` (prometheus-client's exposition, compressed when asked) and `/health`; 404 for
    anything else."""
    exposition = make_wsgi_app(metrics.registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            scraped: Iterable[bytes] = exposition(environ, start_response)
            return scraped
        status, body = ("200 OK", b'{"status":"ok"}') if path == "/health" else ("404 Not Found", b"")
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        start_response(status, headers)
        return [body]

    return app


def serve_metrics(metrics: ServiceMetrics, host: str, port: int) -> WSGIServer | None:
    """Serve `metrics` on http://host:port/metrics (and `/health`) from a thread: for a process
    with no HTTP server of its own, the fetcher. Its registry must need no refreshers, which run
    on an event loop. Port 0: none. Stop it with `shutdown()` and `server_close()`."""
    if port == 0:
        return None
    server_class = _MetricsServer6 if ":" in host else _MetricsServer  # an IPv6 address, or not
    try:
        server = make_server(host, port, metrics_wsgi_app(metrics), server_class, handler_class=_QuietHandler)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    shown = f"[{host}]" if ":" in host else host
    logger.info("metrics on http://%s:%d/metrics", shown, port)
    return server
