"""`pendra serve`'s install queue: asyncio tasks in this process running the same job code as the
arq fetcher (`pendra_shared.jobs.run_install_job`), with the same retry, progress and cancel rules,
and no Redis. A finished install is reported `done` only after `before_done` (the inference
registry's rescan, in `pendra serve`) has run: whoever sees `done` can use the model at once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from pendra_shared.catalogue import CatalogueEntry
from pendra_shared.config import Settings
from pendra_shared.install import Installer
from pendra_shared.install_metrics import InstallMetrics
from pendra_shared.jobs import WAITING, Job, JobState, next_try, run_install_job, uninstall_outcome
from pendra_shared.store import ModelStore
from prometheus_client import CollectorRegistry

logger = logging.getLogger(__name__)


class LocalQueue:
    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        metrics: InstallMetrics | None = None,
        before_done: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """`before_done`: awaited when an install has finished, before its job says `done`."""
        self.settings = settings
        self.before_done = before_done
        self.store = store
        # Without a process registry (a queue of its own, in tests), metrics nobody scrapes.
        self.metrics = metrics or InstallMetrics(CollectorRegistry())
        self.installer = Installer.from_settings(store, settings, metrics=metrics)
        self._jobs: dict[str, Job] = {}
        self._cancels: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(settings.install_concurrency)

    async def start(self) -> None:
        await asyncio.to_thread(self.store.ensure)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()  # interrupts the download; its partial file stays for the next start
        await asyncio.gather(*tasks, return_exceptions=True)

    async def check(self) -> None:
        return None

    # JobSink
    async def save(self, job: Job) -> bool:
        if not self._takes(job):
            return False
        if job.state == JobState.DONE and self.before_done is not None:
            try:
                await self.before_done()
            except Exception:
                logger.exception("%s: the step before reporting it done failed", job.id)
            if not self._takes(job):
                return False
        self._jobs[job.id] = job
        if job.final:
            self.metrics.ended(job)
        return True

    def _takes(self, job: Job) -> bool:
        """False when the record was cancelled, or replaced by a newer request: this run's news
        is old news."""
        current = self._jobs.get(job.id)
        return current is None or not (current.final or current.run != job.run)

    async def cancel_requested(self, job_id: str) -> bool:
        return job_id in self._cancels

    async def submit(self, entry: CatalogueEntry) -> tuple[Job, bool]:
        job = Job.new(entry.name, entry.total_size_bytes)
        existing = self._jobs.get(job.id)
        if existing is not None and not existing.final:
            return existing, False
        self._jobs[job.id] = job
        self._cancels.discard(job.id)
        task = asyncio.create_task(self._run(job.id, job.run, entry), name=job.id)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job, True

    async def _run(self, job_id: str, run: str, entry: CatalogueEntry) -> None:
        while True:
            waiting = self._jobs[job_id]
            if self._slots.locked() and waiting.run == run:
                await self.save(waiting.moved(message=WAITING))
            async with self._slots:
                job = self._jobs[job_id]
                if job.run != run:
                    return  # cancelled while it waited, and asked for again since
                if job.final:  # cancelled while it waited
                    await asyncio.to_thread(self.installer.discard_partial, entry, False)
                    return
                with self.metrics.running.track_inprogress():
                    result = await run_install_job(
                        job,
                        partial(self.installer.install, entry),
                        self,
                        interrupted="interrupted by a shutdown; install it again to resume where it stopped",
                    )
            if result is None or result.state != JobState.RETRYING:
                return
            result, delay = next_try(result, self.settings.download_backoff_s)
            await self.save(result)
            if delay is None:
                return
            self.metrics.retried(result)
            await asyncio.sleep(delay)  # holding no download slot

    async def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    async def jobs(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.created_at)

    async def cancel(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        if job is None or job.final:
            return job
        if job.state in (JobState.QUEUED, JobState.RETRYING):
            job = job.finished(JobState.CANCELLED, message="cancelled before it ran")
            self._jobs[job_id] = job
            self.metrics.ended(job)
            return job
        self._cancels.add(job_id)
        return job

    async def uninstall(self, name: str) -> dict[str, Any]:
        return await asyncio.to_thread(uninstall_outcome, self.store, name)
