"""The fetcher: an arq worker that installs and uninstalls models in the shared store.

Jobs carry the catalogue entry the API resolved, so the fetcher installs exactly what the client
asked for. Progress goes to the job record in Redis as it comes. Network trouble is retried inside
the installer (resuming from the bytes on disk) and then by arq (`Retry` with a growing delay); a
checksum mismatch fails at once. A running job holds a lease in Redis that it renews; when a
fetcher dies (killed, host lost), its lease runs out and any fetcher, the restarted one included,
takes the job over and resumes the download where it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from functools import partial
from typing import Any

from arq import Retry, func
from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix
from arq.worker import Worker
from pendra_shared.catalogue import CatalogueEntry
from pendra_shared.config import Settings
from pendra_shared.errors import ModelNotFound, PendraError
from pendra_shared.install import Installer
from pendra_shared.jobs import (
    INSTALL_FUNCTION,
    MAX_TRIES,
    QUEUE_NAME,
    UNINSTALL_FUNCTION,
    JobState,
    retry_delay_s,
    run_install_job,
)
from pendra_shared.jobs_redis import RedisJobs, connect, retrying
from pendra_shared.sources import Sources
from pendra_shared.store import ModelStore
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pendra_fetcher.fetch import Fetch
from pendra_fetcher.mirror import S3Mirror

logger = logging.getLogger(__name__)

INSTALL_TIMEOUT_S = 24 * 3600  # a very large model on a slow line; stalls are caught by read timeouts
# arq marks a running job "in progress" for its timeout plus ten seconds.
IN_PROGRESS_MS = (INSTALL_TIMEOUT_S + 10) * 1000


SLOT_WAIT_S = 2.0  # a queued install finding every download slot busy goes back to the queue this long
WAITING = "waiting for a free download slot"


async def install_model(ctx: dict[str, Any], job_id: str, run: str, entry_data: dict[str, Any]) -> str:
    """One run of an install job. Redis trouble sends the run back to the queue (its progress so
    far is on disk); a stale run (the job was asked for again since) does nothing."""
    try:
        return await _install(ctx, job_id, run, CatalogueEntry.model_validate(entry_data))
    except (RedisConnectionError, RedisTimeoutError) as exc:
        logger.warning("%s: Redis trouble (%s); the job goes back to the queue", job_id, exc)
        raise Retry(defer=5) from exc


async def _install(ctx: dict[str, Any], job_id: str, run: str, entry: CatalogueEntry) -> str:
    settings: Settings = ctx["settings"]
    jobs: RedisJobs = ctx["jobs"]
    fetch: Fetch = ctx["fetch"]
    job = await jobs.get(job_id)
    if job is None or job.run != run:
        logger.info("%s: run %s was replaced by a newer request; skipping it", job_id, run)
        return "superseded"
    if job.state in (JobState.DONE, JobState.FAILED):
        return job.state.value  # this run finished before arq could record it (Redis was away)
    if job.state == JobState.CANCELLED or await jobs.cancel_requested(job_id):
        await asyncio.to_thread(fetch.installer.discard_partial, entry)
        if not job.final:
            await jobs.save(job.finished(JobState.CANCELLED, message="cancelled before it ran"))
        return JobState.CANCELLED.value
    slots: asyncio.Semaphore = ctx["slots"]
    if slots.locked():
        # Every download slot is busy: back to the queue, so waiting installs hold no worker slot
        # (uninstalls still run) and another fetcher may take this one.
        if job.message != WAITING:
            await jobs.save(job.moved(message=WAITING))
        raise Retry(defer=SLOT_WAIT_S)
    owner = ctx["owner"]

    async def heartbeat() -> None:
        await jobs.renew_lease(job_id, owner, settings.job_lease_s)

    async with slots:
        await heartbeat()
        job = await run_install_job(job, partial(fetch.install, entry), jobs, heartbeat=heartbeat)
    if job.state == JobState.RETRYING:
        if job.attempts < MAX_TRIES:
            delay = retry_delay_s(job.attempts, settings.download_backoff_s)
            await jobs.save(
                job.moved(message=f"retrying in {delay:.0f}s (try {job.attempts + 1} of {MAX_TRIES})")
            )
            raise Retry(defer=delay)
        job = job.finished(JobState.FAILED, message=f"gave up after {MAX_TRIES} tries")
        await jobs.save(job)
    return job.state.value


async def uninstall_model(ctx: dict[str, Any], name: str) -> dict[str, Any]:
    store: ModelStore = ctx["store"]
    try:
        model = await asyncio.to_thread(store.uninstall, name)
    except ModelNotFound as exc:
        return {"ok": False, "code": "model_not_found", "message": str(exc)}
    except PendraError as exc:
        return {"ok": False, "code": "store_conflict", "message": str(exc)}
    return {"ok": True, "model": model.name, "file": model.file_name}


async def take_over_orphans(jobs: RedisJobs, lease_s: float) -> list[str]:
    """Release jobs whose fetcher died: arq still marks them in progress, but no live fetcher has
    renewed their lease for longer than `lease_s`."""
    redis = jobs.redis
    released = []
    for raw in await redis.zrange(QUEUE_NAME, 0, -1):
        queue_id = raw.decode()
        if not queue_id.startswith("install:"):
            continue  # uninstalls are short and hold no lease
        job_id = queue_id.rpartition("@")[0]
        marker = in_progress_key_prefix + queue_id
        ttl_ms = await redis.pttl(marker)
        if ttl_ms < 0 or await jobs.has_lease(job_id):
            continue
        if IN_PROGRESS_MS - ttl_ms < lease_s * 1000:
            continue  # just picked up; its fetcher has not taken the lease yet
        if await redis.delete(marker):
            logger.warning("%s: its fetcher stopped renewing the lease; taking the job over", job_id)
            released.append(queue_id)
    return released


async def _watch_orphans(jobs: RedisJobs, lease_s: float) -> None:
    while True:
        try:
            await take_over_orphans(jobs, lease_s)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            logger.warning("looking for orphaned jobs failed: %s", exc)
        await asyncio.sleep(max(lease_s / 3, 0.5))


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    store = ModelStore(settings.models_dir)
    store.ensure()
    sources = Sources(settings.download_timeout_s)
    mirror = None
    if settings.mirror_url:
        mirror = S3Mirror(
            settings.mirror_url,
            settings.mirror_access_key,
            settings.mirror_secret_key,
            settings.download_timeout_s,
        )
        try:
            await asyncio.to_thread(mirror.ensure_bucket)
        except Exception as exc:
            logger.warning("the %s is not reachable yet: %s", mirror, exc)
        sources.register("s3", mirror)
        logger.info("using the %s", mirror)
    installer = Installer(
        store, sources, retries=settings.download_retries, backoff_s=settings.download_backoff_s
    )
    jobs = RedisJobs(connect(settings.redis_url, retries=60), patience_s=300)
    ctx.update(
        store=store,
        jobs=jobs,
        fetch=Fetch(installer, mirror),
        slots=asyncio.Semaphore(settings.install_concurrency),
        owner=f"{socket.gethostname()}:{os.getpid()}",
    )
    await take_over_orphans(jobs, settings.job_lease_s)
    ctx["orphan_watch"] = asyncio.create_task(_watch_orphans(jobs, settings.job_lease_s))
    logger.info("fetcher ready: store %s, %d install(s) at once", store.root, settings.install_concurrency)


async def shutdown(ctx: dict[str, Any]) -> None:
    task = ctx.get("orphan_watch")
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    jobs: RedisJobs | None = ctx.get("jobs")
    if jobs is not None:
        await jobs.redis.aclose()


class WorkerSettings:
    """arq's settings for the fetcher; `redis_settings` and `max_jobs` come from Pendra's settings
    in `run()`."""

    functions = [
        # Tries are counted in the job record (download attempts); arq's count also grows with
        # slot waits, restarts and takeovers, so it must never be what ends a job.
        func(
            install_model,
            name=INSTALL_FUNCTION,
            timeout=INSTALL_TIMEOUT_S,
            keep_result=0,
            max_tries=1_000_000,
        ),
        func(uninstall_model, name=UNINSTALL_FUNCTION, timeout=120, keep_result=300, max_tries=1),
    ]
    queue_name = QUEUE_NAME
    on_startup = startup
    on_shutdown = shutdown
    max_tries = 1
    poll_delay = 0.2
    retry_jobs = True
    health_check_interval = 10


def redis_settings(url: str) -> RedisSettings:
    """arq's connection settings, riding out a Redis restart instead of dying on it."""
    return dataclasses.replace(
        RedisSettings.from_dsn(url),
        conn_retries=30,
        conn_retry_delay=1,
        retry=retrying(60),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


class ResilientWorker(Worker):
    """arq's worker, riding out Redis outages: a failed poll is logged and tried again rather than
    ending the process (running downloads carry on meanwhile)."""

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            logger.warning("polling the queue failed (%s); trying again", exc)
            await self._recount_slots()
            await asyncio.sleep(1.0)

    async def _recount_slots(self) -> None:
        """arq takes a worker slot before it talks to Redis and gives it back only on success; after
        a failed poll, count the slots again from the jobs really running, so none leaks."""
        running = sum(not task.done() for task in self.tasks.values())
        self.job_counter = running
        self.sem = asyncio.BoundedSemaphore(self.max_jobs + 1)
        for _ in range(running):  # each running job gives its slot back when it ends
            await self.sem.acquire()


def create_worker(settings: Settings) -> Worker:
    return ResilientWorker(
        functions=WorkerSettings.functions,
        queue_name=WorkerSettings.queue_name,
        on_startup=WorkerSettings.on_startup,
        on_shutdown=WorkerSettings.on_shutdown,
        max_tries=WorkerSettings.max_tries,
        poll_delay=WorkerSettings.poll_delay,
        retry_jobs=WorkerSettings.retry_jobs,
        health_check_interval=WorkerSettings.health_check_interval,
        redis_settings=redis_settings(settings.redis_url),
        max_jobs=settings.install_concurrency + 4,  # room for uninstalls beside running downloads
        ctx={"settings": settings},
    )


def run(settings: Settings) -> None:
    """Run the fetcher until SIGINT or SIGTERM; running installs stop and resume on the next start."""
    create_worker(settings).run()
