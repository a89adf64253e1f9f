"""Which inference endpoint serves a request, when the gateway has several (PENDRA_INFERENCE_URL
lists them, or names a headless Service whose pods PENDRA_INFERENCE_RESOLVE finds again as they
come and go). Small on purpose: it reads each endpoint's own `/status`, it is not an endpoint
picker (deploy/kubernetes/components/inference-gateway plugs in the real one).

For a request naming a model, in order:
1. **its conversation**: the endpoint that served the longest prefix of this prompt (the same
   messages, or the same leading blocks of a prompt string) still holds it in its prefix cache;
   kept unless that endpoint has requests waiting for the model;
2. **the model**: of the endpoints that have it loaded (or are loading it, or were just sent it),
   the least loaded one with room (fewer than two requests waiting for the model, fewer than
   twice its sequences in flight from here), preferring those below its sequences;
3. **the least loaded** endpoint, preferring one with a free model slot: the model is loaded
   there, as many replicas as its traffic needs.

An endpoint is up while its `/status` answers (polled every PENDRA_INFERENCE_POLL_S); one that
refuses a connection is down at once and the request goes to the next candidate, so a stopped
replica costs no request. Load is the larger of what the endpoint reported and what this gateway
has in flight there.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

logger = logging.getLogger(__name__)

# The routes whose prompt a later request may extend (the rest are routed by model and load).
PROMPT_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/api/chat", "/api/generate"}
)
BLOCK_CHARS = 512  # a prompt string's prefix is matched a block at a time
REMEMBERED_PREFIXES = 65_536
ASSUMED_LOADING_S = 30.0  # a model sent to an endpoint counts as there until its /status says so
DOWN_AFTER_FAILED_POLLS = 2  # polls that fail other than by a refused connection
MIN_ROOM = 2  # an endpoint where this many requests wait for a model has no room for more


@dataclass
class Endpoint:
    url: str
    up: bool = False
    loaded: set[str] = field(default_factory=set)
    loading: set[str] = field(default_factory=set)
    waiting: dict[str, int] = field(default_factory=dict)  # per model, as reported
    running: dict[str, int] = field(default_factory=dict)  # per model, as reported
    parallel: dict[str, int] = field(default_factory=dict)  # per chat model: the sequences it was sized for
    total_running: int = 0  # as reported, every model
    server_waiting: int = 0  # as reported: queued, or waiting for a model to load
    max_loaded: int = 0
    failed_polls: int = 0
    in_flight: collections.Counter[str] = field(default_factory=collections.Counter)  # sent here, by model
    sent: dict[str, float] = field(default_factory=dict)  # model: when a request for it was sent here

    def load(self) -> int:
        return max(self.total_running + self.server_waiting, sum(self.in_flight.values()))

    def holds(self, model: str, now: float) -> bool:
        """The model is loaded there, or loading: as reported, or as this gateway knows it (its
        requests for it are there, or one was answered lately)."""
        return (
            model in self.loaded
            or model in self.loading
            or self.in_flight[model] > 0
            or now - self.sent.get(model, -ASSUMED_LOADING_S) < ASSUMED_LOADING_S
        )

    def has_room(self, model: str) -> bool:
        """Fewer than two requests wait for the model there (a request waits once the model's
        cache or sequences are all taken; one seen waiting may have just arrived), as last
        reported, or none of this gateway's requests for it is still there (the report is older
        than that); and this gateway has fewer than twice the model's sequences in flight there
        (a burst, before the next report shows its queue). Requests waiting for the model to load
        are not a lack of room: loading it elsewhere too would not be sooner."""
        mine = self.in_flight[model]
        cap = self.parallel.get(model, 0)
        if cap and mine >= 2 * cap:
            return False
        return self.waiting.get(model, 0) < MIN_ROOM or mine == 0

    def under_capacity(self, model: str) -> bool:
        """Fewer of the model's requests there than the sequences it was sized for (its
        `parallel`: past that, each one more slows all of them), counting this gateway's own in
        flight and what the endpoint last reported (other gateways' too)."""
        cap = self.parallel.get(model, 0)
        busy = max(self.in_flight[model], self.running.get(model, 0) + self.waiting.get(model, 0))
        return cap == 0 or busy < cap

    def free_slot(self, now: float) -> bool:
        """Room for one more model (those just sent here count: the report may not show them)."""
        recent = {m for m, at in self.sent.items() if now - at < ASSUMED_LOADING_S} | set(self.in_flight)
        return self.max_loaded == 0 or len(self.loaded | self.loading | recent) < self.max_loaded

    def read(self, status: dict[str, Any]) -> None:
        loaded = status.get("loaded", [])
        self.loaded = {m["name"] for m in loaded}
        self.loading = set(status.get("loading", []))
        self.waiting = {m["name"]: int(m.get("waiting", 0)) for m in loaded}
        self.running = {m["name"]: int(m.get("running", 0)) for m in loaded}
        self.parallel = {m["name"]: int(m.get("parallel", 0)) for m in loaded}
        self.total_running = int(status.get("requests_running", 0))
        self.server_waiting = int(status.get("requests_waiting", 0))
        self.max_loaded = int(status.get("max_loaded_models", 0))
        self.up = True


@dataclass(frozen=True)
class Route:
    """Where a request goes, in order of preference, and why the first was chosen."""

    endpoints: list[Endpoint]
    reason: str  # prefix, model, least_loaded or only
    model: str | None
    keys: list[bytes]


class Router:
    def __init__(
        self,
        urls: Iterable[str],
        resolve: bool = False,
        poll_s: float = 0.5,
        client: httpx.AsyncClient | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.configured = [u.rstrip("/") for u in urls]
        self.resolve = resolve
        self.poll_s = poll_s
        self.endpoints: dict[str, Endpoint] = {u: Endpoint(u, up=True) for u in self.configured}
        self._prefixes: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(max(2.0, 2 * poll_s)))
        self._task: asyncio.Task[None] | None = None
        self._resolver = resolver or _addresses
        self._resolved: dict[str, list[str]] = {}  # configured URL: the addresses it gave last
        logging.getLogger("httpx").addFilter(_quiet_polls)  # twice a second per endpoint: not news

    @property
    def single(self) -> bool:
        """One fixed endpoint: every request goes there, nothing to poll."""
        return len(self.configured) == 1 and not self.resolve

    async def start(self) -> None:
        if not self.single:
            await self.poll()
            self._task = asyncio.create_task(self._poll_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()

    # -- what the endpoints say --------------------------------------------------------------

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll()
            except Exception:  # noqa: BLE001 - the next poll tries again
                logger.exception("polling the inference endpoints failed")

    async def poll(self) -> None:
        if self.resolve:
            await self._resolve()
        await asyncio.gather(*(self._poll(e) for e in list(self.endpoints.values())))

    async def _poll(self, endpoint: Endpoint) -> None:
        """Read the endpoint's `/status`: a refused connection marks it down at once, other
        failures (a slow answer from a busy endpoint) only the second time in a row."""
        try:
            r = await self._client.get(f"{endpoint.url}/status")
            r.raise_for_status()
            was_up = endpoint.up
            endpoint.read(r.json())
            endpoint.failed_polls = 0
            if not was_up:
                logger.info("inference endpoint %s is up", endpoint.url)
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
            endpoint.failed_polls += 1
            refused = isinstance(exc, httpx.ConnectError)
            if endpoint.up and (refused or endpoint.failed_polls >= DOWN_AFTER_FAILED_POLLS):
                logger.warning("inference endpoint %s is down: %s", endpoint.url, exc)
                endpoint.up = False

    async def _resolve(self) -> None:
        """Each configured URL's host resolved to its addresses (a headless Service: one per ready
        pod); endpoints that went away are forgotten, new ones polled before they are used."""
        found: dict[str, None] = {}
        for url in self.configured:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                addresses = await self._resolver(parts.hostname or "", port)
            except OSError as exc:  # (cluster DNS hiccups: keep what this name gave last time)
                logger.warning("resolving %s failed: %s", parts.hostname, exc)
                addresses = self._resolved.get(url, [])
            self._resolved[url] = addresses
            for ip in addresses:
                host = f"[{ip}]" if ":" in ip else ip
                found[urlunsplit((parts.scheme, f"{host}:{port}", parts.path, "", ""))] = None
        for url in found:
            if url not in self.endpoints:
                self.endpoints[url] = Endpoint(url)
                logger.info("inference endpoint %s found", url)
        for url in list(self.endpoints):
            if url not in found:
                del self.endpoints[url]
                logger.info("inference endpoint %s gone", url)

    # -- choosing ----------------------------------------------------------------------------

    def route(self, body: bytes, path: str = "") -> Route:
        endpoints = list(self.endpoints.values())
        if self.single:
            return Route(endpoints, "only", None, [])
        model, keys = request_facts(body)
        if path not in PROMPT_PATHS:
            keys = []  # (embeddings and the rest: no cache to come back to)
        up = [e for e in endpoints if e.up] or endpoints  # none up: try them all the same
        now = time.monotonic()
        if model is None:
            return Route(sorted(random.sample(up, len(up)), key=Endpoint.load), "least_loaded", None, [])
        first: Endpoint | None = None
        reason = "least_loaded"
        for key in reversed(keys):
            url = self._prefixes.get(key)
            held = self.endpoints.get(url) if url else None
            if held is not None and held.up and held.holds(model, now) and held.has_room(model):
                first, reason = held, "prefix"
                break
        if first is None:
            # Where the model is: below its sequences if one is, else where it does not queue.
            holding = [e for e in up if e.holds(model, now) and e.has_room(model)]
            holding = [e for e in holding if e.under_capacity(model)] or holding
            if holding:  # (ties broken at random, here and below)
                first, reason = min(random.sample(holding, len(holding)), key=Endpoint.load), "model"

        # A free model slot first: loading the model where another must go would move that one's
        # traffic to a load elsewhere in turn.
        def rank(e: Endpoint) -> tuple[bool, int, bool]:
            return (not e.free_slot(now), e.load(), not e.holds(model, now))

        rest = sorted(random.sample(up, len(up)), key=rank)
        order = [first] if first is not None else []
        order += [e for e in rest if e is not first]
        order += [e for e in endpoints if e not in order]  # down ones last: they may be back
        if logger.isEnabledFor(logging.DEBUG):  # (the list is built only for a debug log)
            loads = ", ".join(f"{e.url} load {e.load()}" for e in up)
            logger.debug("%s for %s: %s (%s)", reason, model, order[0].url, loads)
        return Route(order, reason, model, keys)

    def sent(self, route: Route, endpoint: Endpoint) -> None:
        """The request goes to `endpoint`: in flight there until `ended`."""
        if route.model is not None:
            endpoint.in_flight[route.model] += 1

    def answered(self, route: Route, endpoint: Endpoint, status: int) -> None:
        """`endpoint` took the request (a 2xx): the model is there, or loading, and the prompt's
        prefixes will be in its cache."""
        if route.model is None or not 200 <= status < 300:
            return
        endpoint.sent[route.model] = time.monotonic()
        for key in route.keys:
            self._prefixes[key] = endpoint.url
            self._prefixes.move_to_end(key)
        while len(self._prefixes) > REMEMBERED_PREFIXES:
            self._prefixes.popitem(last=False)

    def ended(self, route: Route, endpoint: Endpoint) -> None:
        if route.model is not None:
            endpoint.in_flight[route.model] -= 1
            if endpoint.in_flight[route.model] <= 0:
                del endpoint.in_flight[route.model]

    def unreachable(self, endpoint: Endpoint) -> None:
        if self.single:
            return  # (nothing polls it back up; the next request tries it all the same)
        if endpoint.up:
            logger.warning("inference endpoint %s refused a request: down until it answers", endpoint.url)
        endpoint.up = False


Resolver = Callable[[str, int], Awaitable[list[str]]]


def _quiet_polls(record: logging.LogRecord) -> bool:
    """httpx's INFO line for each `/status` poll left out of the log."""
    args = record.args
    if record.levelno > logging.INFO or not isinstance(args, tuple) or len(args) < 2:
        return True
    return not str(args[1]).endswith("/status")


async def _addresses(host: str, port: int) -> list[str]:
    """The host's addresses, as the system resolver gives them (cluster DNS in a pod)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(address[0]) for *_, address in infos))


def request_facts(body: bytes) -> tuple[str | None, list[bytes]]:
    """The model a JSON request names, and keys of its prompt's prefixes, shortest first: one per
    message (chat, Ollama's chat, Responses' items) or per block of a prompt string."""
    try:
        doc = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return None, []
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), str):
        return None, []
    model: str = doc["model"]
    parts: list[str] = []
    for name in ("system", "instructions"):
        if isinstance(doc.get(name), str):
            parts.append(doc[name])
    for name in ("messages", "input", "prompt"):
        value = doc.get(name)
        if isinstance(value, list) and value and not all(isinstance(v, str) for v in value):
            parts += [json.dumps(item, sort_keys=True) for item in value]
        elif isinstance(value, str):
            parts += [value[i : i + BLOCK_CHARS] for i in range(0, len(value), BLOCK_CHARS)]
    digest = hashlib.blake2b(model.encode(), digest_size=16)
    keys = []
    for part in parts:
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
        keys.append(digest.copy().digest())
    return model, keys
