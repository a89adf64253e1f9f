"""The install queue the management routes talk to: arq over Redis in the service set
(`ArqQueue`), or in-process in `pendra serve` (`LocalQueue`). Both keep the same `Job` records and
the same semantics: one job per variant, progress as it comes, cancel that removes the partial file.
"""

from __future__ import annotations

from typing import Any, Protocol

from pendra_shared.catalogue import CatalogueEntry
from pendra_shared.jobs import Job


class InstallQueue(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def check(self) -> None:
        """Raise `UpstreamUnavailable` when the queue cannot take work."""

    async def submit(self, entry: CatalogueEntry) -> tuple[Job, bool]:
        """Queue an install; returns the job and whether it is new (False: already under way)."""

    async def get(self, job_id: str) -> Job | None: ...

    async def jobs(self) -> list[Job]: ...

    async def cancel(self, job_id: str) -> Job | None: ...

    async def uninstall(self, name: str) -> dict[str, Any]:
        """Remove a model from the store: `{"ok": True, "model", "file"}` or
        `{"ok": False, "code", "message"}`."""
