"""The fetcher: an arq worker that installs and uninstalls models in the shared store.

Jobs carry the catalogue entry the API resolved, so the fetcher installs exactly what the client
asked for. Progress goes to the job record in Redis as it comes. Network trouble is retried inside
the installer (resuming from the bytes on disk) and then by arq (`Retry` with a growing delay); a
checksum mismatch fails at once. A running job holds a lease in Redis that it renews; when a
fetcher dies (killed, host lost), its lease runs out and any fetcher, the restarted one included,
takes the job over and resumes the download where it stopped.

arq reads jobs and writes results as JSON (`pendra_shared.queue_codec`), never as pickle: a job
that is not Pendra's JSON is logged and failed without running anything. A Redis that refuses the
password in PENDRA_REDIS_URL stops the fetcher at once with a message saying so; the URL is only
ever logged with its password hidden.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import AsyncIterator
from functools import partial
from typing import Any
from urllib.parse import unquote

from arq import Retry, func
from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix
from arq.worker import Worker, get_kwargs
from pendra_shared.catalogue import CatalogueEntry
from pendra_shared.config import Settings
from pendra_shared.errors import ConfigError
from pendra_shared.install import Installer
from pendra_shared.install_metrics import InstallMetrics
from pendra_shared.jobs import (
    INSTALL_FUNCTION,
    QUEUE_NAME,
    UNINSTALL_FUNCTION,
    WAITING,
    JobState,
    next_try,
    run_install_job,
    uninstall_outcome,
)
from pendra_shared.jobs_redis import RedisJobs, connect, redacted, retrying
from pendra_shared.metrics import ServiceMetrics, serve_metrics
from pendra_shared.queue_codec import dumps, loads
from pendra_shared.sources import Sources
from pendra_shared.store import ModelStore
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pendra_fetcher.fetch import Fetch
from pendra_fetcher.mirror import S3Mirror

logger = logging.getLogger(__name__)

INSTALL_TIMEOUT_S = 24 * 3600  # a very large model on a slow line; stalls are caught by read timeouts
# arq marks a running job "in progress" for its timeout plus ten seconds.
IN_PROGRESS_MS = (INSTALL_TIMEOUT_S + 10) * 1000


SLOT_WAIT_S = 2.0  # a queued install finding every download slot busy goes back to the queue this long


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
        # Without waiting: a lock held means another run is at work and owns the partial file.
        await asyncio.to_thread(fetch.installer.discard_partial, entry, False)
        if not job.final:
            await jobs.save(job.finished(JobState.CANCELLED, message="cancelled before it ran"))
        return JobState.CANCELLED.value
    if await jobs.has_lease(job_id):
        # A live fetcher still runs it (its lease lapsed during a Redis outage and the job was
        # released early): leave it to that one.
        raise Retry(defer=settings.job_lease_s)
    slots: asyncio.Semaphore = ctx["slots"]
    if slots.locked():
        # Every download slot is busy: back to the queue, so waiting installs hold no worker slot
        # (uninstalls still run) and another fetcher may take this one.
        if job.message != WAITING:
            await jobs.save(job.moved(message=WAITING))
        raise Retry(defer=SLOT_WAIT_S)
    owner: str = ctx["owner"]
    running: set[str] = ctx["running"]
    metrics: InstallMetrics = ctx["metrics"]
    async with slots, _lease(jobs, job_id, owner, settings.job_lease_s):
        running.add(job_id)
        try:
            with metrics.running.track_inprogress():
                result = await run_install_job(job, partial(fetch.install, entry), jobs)
        finally:
            running.discard(job_id)
    if result is None:
        return "superseded"
    if result.state == JobState.RETRYING:
        result, delay = next_try(result, settings.download_backoff_s)
        await jobs.save(result)
        if delay is not None:
            metrics.retried(result)
            raise Retry(defer=delay)
    return result.state.value


@contextlib.asynccontextmanager
async def _lease(jobs: RedisJobs, job_id: str, owner: str, lease_s: float) -> AsyncIterator[None]:
    """Hold the job's lease while the body runs, renewed on its own schedule (never behind a slow
    progress save); given up at once when the run ends."""

    async def renew() -> None:
        while True:
            try:
                await jobs.renew_lease(job_id, owner, lease_s)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                logger.warning("%s: renewing the lease failed: %s", job_id, exc)
            await asyncio.sleep(lease_s / 3)

    await jobs.renew_lease(job_id, owner, lease_s)
    task = asyncio.create_task(renew())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError, asyncio.CancelledError):
            await asyncio.shield(jobs.release_lease(job_id, owner))


async def uninstall_model(ctx: dict[str, Any], name: str) -> dict[str, Any]:
    return await asyncio.to_thread(uninstall_outcome, ctx["store"], name)


async def take_over_orphans(
    jobs: RedisJobs,
    lease_s: float,
    mine: set[str] | frozenset[str] = frozenset(),
    metrics: InstallMetrics | None = None,
) -> list[str]:
    """Release jobs whose fetcher died: arq still marks them in progress, but no live fetcher has
    renewed their lease for longer than `lease_s`. Jobs this fetcher runs (`mine`) are never
    released, whatever their lease says."""
    redis = jobs.redis
    released = []
    for raw in await redis.zrange(QUEUE_NAME, 0, -1):
        queue_id = raw.decode()
        if not queue_id.startswith("install:"):
            continue  # uninstalls are short and hold no lease
        job_id = queue_id.rpartition("@")[0]
        if job_id in mine:
            continue
        marker = in_progress_key_prefix + queue_id
        ttl_ms = await redis.pttl(marker)
        if ttl_ms < 0 or await jobs.has_lease(job_id):
            continue
        if IN_PROGRESS_MS - ttl_ms < lease_s * 1000:
            continue  # just picked up; its fetcher has not taken the lease yet
        if await redis.delete(marker):
            logger.warning("%s: its fetcher stopped renewing the lease; taking the job over", job_id)
            released.append(queue_id)
            if metrics is not None:
                metrics.takeovers.inc()
    return released


async def _watch_orphans(jobs: RedisJobs, lease_s: float, mine: set[str], metrics: InstallMetrics) -> None:
    while True:
        try:
            await take_over_orphans(jobs, lease_s, mine, metrics)
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
    service_metrics = ServiceMetrics()
    metrics = InstallMetrics(service_metrics.registry)
    installer = Installer.from_settings(store, settings, sources, metrics=metrics)
    jobs = RedisJobs(connect(settings.redis_url, retries=60), patience_s=300, metrics=metrics)
    ctx.update(
        store=store,
        jobs=jobs,
        fetch=Fetch(installer, mirror),
        slots=asyncio.Semaphore(settings.install_concurrency),
        running=set(),
        owner=f"{socket.gethostname()}:{os.getpid()}",
        metrics=metrics,
        metrics_server=serve_metrics(service_metrics, settings.host, settings.fetcher_port),
    )
    await take_over_orphans(jobs, settings.job_lease_s, metrics=metrics)
    ctx["orphan_watch"] = asyncio.create_task(
        _watch_orphans(jobs, settings.job_lease_s, ctx["running"], metrics)
    )
    logger.info(
        "fetcher ready: store %s, queue at %s, %d install(s) at once",
        store.root,
        redacted(settings.redis_url),
        settings.install_concurrency,
    )


async def shutdown(ctx: dict[str, Any]) -> None:
    task = ctx.get("orphan_watch")
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    jobs: RedisJobs | None = ctx.get("jobs")
    if jobs is not None:
        await jobs.redis.aclose()
    server = ctx.get("metrics_server")
    if server is not None:
        server.shutdown()
        server.server_close()


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
    # JSON, never arq's default pickle: whoever can write to Redis must not run code here.
    job_serializer = dumps
    job_deserializer = loads
    on_startup = startup
    on_shutdown = shutdown
    max_tries = 1
    poll_delay = 0.2
    retry_jobs = True
    health_check_interval = 10


def redis_settings(url: str) -> RedisSettings:
    """arq's connection settings, riding out a Redis restart instead of dying on it. The user name
    and password are percent-decoded, as redis-py decodes them for Pendra's own connections."""
    parsed = RedisSettings.from_dsn(url)
    return dataclasses.replace(
        parsed,
        username=unquote(parsed.username) if parsed.username else None,
        password=unquote(parsed.password) if parsed.password else None,
        conn_retries=30,
        conn_retry_delay=1,
        retry=retrying(60),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


class ResilientWorker(Worker):
    """arq's worker, riding out Redis outages: a failed poll is logged and tried again rather than
    ending the process (running downloads carry on meanwhile). A wrong password is no outage: it
    ends the start at once, in words (`ConfigError`)."""

    def __init__(self, *, redis_url: str, **kwargs: Any) -> None:
        super().__init__(redis_settings=redis_settings(redis_url), **kwargs)
        self.redis_url = redis_url

    async def main(self) -> None:
        if self._pool is None:
            await check_password(self.redis_url)
        try:
            await super().main()
        except AuthenticationError as exc:  # Redis came up after the check, with another password
            raise refused(self.redis_url, exc) from None

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            logger.warning("polling the queue failed (%s); trying again", exc)
            await asyncio.sleep(1.0)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        try:
            await super().start_jobs(job_ids)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            # arq took a worker slot for the job it was starting and, failing before that job's
            # task existed, never gives it back: give it back here, exactly once.
            self.job_counter -= 1
            self.sem.release()
            raise


async def check_password(url: str) -> None:
    """Raise `ConfigError` when Redis refuses the password in `url` (wrong, missing, or given to a
    Redis that has none). Anything else, such as Redis not being up yet, is left to arq's retries."""
    client = connect(url, retries=0)
    try:
        await client.ping()
    except AuthenticationError as exc:
        raise refused(url, exc) from None
    except (RedisError, OSError):
        pass
    finally:
        await client.aclose()


def refused(url: str, exc: AuthenticationError) -> ConfigError:
    return ConfigError(
        f"Redis at {redacted(url)} refused the password ({exc}); PENDRA_REDIS_URL must carry the "
        "password Redis was started with (compose: PENDRA_REDIS_PASSWORD in .env)"
    )


def create_worker(settings: Settings) -> Worker:
    # The class's settings, read the way arq's own create_worker reads them.
    kwargs: dict[str, Any] = dict(get_kwargs(dict(vars(WorkerSettings))))
    return ResilientWorker(
        **kwargs,
        redis_url=settings.redis_url,
        max_jobs=settings.install_concurrency + 4,  # room for uninstalls beside running downloads
        ctx={"settings": settings},
    )


def run(settings: Settings) -> None:
    """Run the fetcher until SIGINT or SIGTERM; running installs stop and resume on the next start."""
    create_worker(settings).run()
