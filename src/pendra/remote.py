"""The CLI's client for a running Pendra API (`PENDRA_API_URL`): `pendra models` acts through it
when it is set, so installs land on the server's store and show the server's job progress."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
from pendra_shared.config import Settings
from pendra_shared.errors import PendraError


class RemoteError(PendraError):
    """The API refused a request or could not be reached."""


class RemoteAPI:
    def __init__(self, settings: Settings) -> None:
        self.base_url = settings.api_url.rstrip("/")
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=httpx.Timeout(30.0))

    def close(self) -> None:
        self.client.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise RemoteError(
                f"cannot reach the Pendra API at {self.base_url} (PENDRA_API_URL): {exc}"
            ) from None
        if response.is_success:
            return response.json()
        raise RemoteError(self._problem(response))

    def _problem(self, response: httpx.Response) -> str:
        try:
            message = str(response.json()["error"]["message"])
        except (ValueError, KeyError, TypeError):
            message = response.text[:200] or response.reason_phrase
        if response.status_code == 401:
            message += " (set PENDRA_API_KEY)"
        return f"{self.base_url}: {message}"

    def events(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """A job's server-sent events until its final one."""
        timeout = httpx.Timeout(30.0, read=None)
        try:
            with self.client.stream("GET", f"/api/jobs/{job_id}/events", timeout=timeout) as response:
                if not response.is_success:
                    response.read()
                    raise RemoteError(self._problem(response))
                name = "message"
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        name = line[len("event: ") :]
                    elif line.startswith("data: "):
                        yield name, json.loads(line[len("data: ") :])
                        name = "message"
        except httpx.TransportError as exc:
            raise RemoteError(f"lost the Pendra API at {self.base_url}: {exc}") from None
