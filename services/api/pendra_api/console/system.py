"""What the console learns from the inference side: its status (build, device, memory budget,
loaded models) and the counters of its `/metrics` that the overview draws (tokens and requests).

The gateway asks the inference service over HTTP (`UpstreamSystem`); `pendra serve` reads its own
runtime (`pendra.embedded`). Both answer the same `SystemProbe`.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import httpx
from pendra_shared.api_errors import UpstreamUnavailable
from prometheus_client.parser import text_string_to_metric_families

STATUS_TTL_S = 2.0  # one search keystroke after another need not each ask the inference service

# The overview's live figures: sums over every model of these families (counters' `_total` samples).
COUNTERS = {
    "pendra_generation_tokens": "generation_tokens",
    "pendra_prompt_tokens": "prompt_tokens",
    "pendra_requests": "requests",
}
GAUGES = {"pendra_requests_running": "running", "pendra_requests_waiting": "waiting"}


class SystemProbe(Protocol):
    async def status(self) -> dict[str, Any]:
        """The inference service's `/status`; raises UpstreamUnavailable when it cannot say."""

    async def metrics_text(self) -> str:
        """The inference service's `/metrics` exposition."""


class UpstreamSystem:
    """The inference service of the compose stack, asked through the gateway's shared client."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self._cached: tuple[float, dict[str, Any]] | None = None

    async def _get(self, path: str) -> httpx.Response:
        try:
            response = await self.client.get(path, timeout=5.0)
        except httpx.TransportError:
            raise UpstreamUnavailable("the inference service is unreachable") from None
        if response.status_code != 200:
            raise UpstreamUnavailable(f"the inference service answered HTTP {response.status_code}")
        return response

    async def status(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < STATUS_TTL_S:
            return self._cached[1]
        body: dict[str, Any] = (await self._get("/status")).json()
        self._cached = (now, body)
        return body

    async def metrics_text(self) -> str:
        return (await self._get("/metrics")).text


def totals(exposition: str) -> dict[str, float]:
    """Token and request totals over every model, and requests running and waiting now."""
    result = dict.fromkeys([*COUNTERS.values(), *GAUGES.values()], 0.0)
    for family in text_string_to_metric_families(exposition):
        if family.name in COUNTERS:
            key = COUNTERS[family.name]
            result[key] += sum(s.value for s in family.samples if s.name.endswith("_total"))
        elif family.name in GAUGES:
            result[GAUGES[family.name]] += sum(s.value for s in family.samples)
    return result
