"""Job records in Redis, shared by the API (which creates, reads and cancels them) and the fetcher
(which runs them and writes their progress).

    pendra:job:<id>          the Job as JSON
    pendra:jobs              the set of job ids, for listing
    pendra:job:<id>:cancel   present when a client asked to cancel
    pendra:job:<id>:lease    present while a live fetcher runs the job (expires when it dies)

Only the API and the fetcher import this module; the CLI's store commands never load Redis. Their
Redis URL carries Redis's password: anything logged or shown names it through `redacted`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from pendra_shared.install_metrics import JobMetrics
from pendra_shared.jobs import Job, JobState

logger = logging.getLogger(__name__)

T = TypeVar("T")

JOBS_SET = "pendra:jobs"
FINISHED_TTL_S = 7 * 24 * 3600
CANCEL_TTL_S = 24 * 3600


def job_key(job_id: str) -> str:
    return f"pendra:job:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"pendra:job:{job_id}:cancel"


def lease_key(job_id: str) -> str:
    return f"pendra:job:{job_id}:lease"


def redacted(url: str) -> str:
    """`url` fit for a log line or an error message: a password in it (`redis://:PASSWORD@host`
    or `?password=`) shown as `***`."""
    try:
        parts = urlsplit(url)
        if not parts.scheme:
            return "(a Redis URL without a scheme)"
        netloc = parts.netloc
        if parts.password is not None:
            netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*")
        return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
    except ValueError:
        return "(a Redis URL that does not parse)"


def retrying(retries: int) -> Retry:
    """Retry policy for Redis commands: `retries` tries with backoff capped at one second. The
    fetcher rides out a Redis restart with many; the API answers 503 quickly with few."""
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), retries)


def connection_pool(url: str, retries: int = 3) -> aioredis.ConnectionPool:
    """A pool whose commands retry through short outages (see `retrying`)."""
    return aioredis.ConnectionPool.from_url(
        url,
        retry=retrying(retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        socket_connect_timeout=2,
        socket_timeout=10,  # a paused or half-open Redis is an error, not a hang
    )


def connect(url: str, retries: int = 3) -> aioredis.Redis:
    return aioredis.Redis.from_pool(connection_pool(url, retries))  # closing it closes its pool


class RedisJobs:
    """Job records for one Redis database. With `patience_s`, `save` keeps trying that long
    through a Redis outage (the fetcher must not lose a job's final state)."""

    def __init__(
        self, redis: aioredis.Redis, patience_s: float = 0.0, metrics: JobMetrics | None = None
    ) -> None:
        self.redis = redis
        self.patience_s = patience_s
        self.metrics = metrics  # told of each final record this process writes

    async def get(self, job_id: str) -> Job | None:
        raw = await self.redis.get(job_key(job_id))
        return Job.model_validate_json(raw) if raw is not None else None

    async def save(self, job: Job) -> bool:
        """Store `job` unless the stored record is finished or belongs to another run (a cancel
        or a newer request got there first). Returns whether it was stored."""
        deadline = time.monotonic() + self.patience_s
        while True:
            try:
                saved = await self._save(job)
                if saved and job.final and self.metrics is not None:
                    self.metrics.ended(job)
                return saved
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if time.monotonic() >= deadline:
                    raise
                logger.warning("saving %s: %s; trying again", job.id, exc)
                await asyncio.sleep(0.5)

    async def _update(self, job_id: str, step: Callable[[Pipeline, Job | None], Awaitable[T]]) -> T:
        """Run `step` on the stored record under WATCH, again whenever another writer got in
        between: `step` reads what it needs, then queues its writes after `pipe.multi()` (or
        writes nothing), and returns the answer."""
        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(job_key(job_id))
                    raw = await pipe.get(job_key(job_id))
                    answer = await step(pipe, Job.model_validate_json(raw) if raw is not None else None)
                    if pipe.explicit_transaction:
                        await pipe.execute()
                    else:
                        await pipe.unwatch()
                    return answer
                except WatchError:
                    continue

    async def _save(self, job: Job) -> bool:
        async def step(pipe: Pipeline, stored: Job | None) -> bool:
            if stored is not None and (stored.final or stored.run != job.run):
                return False
            pipe.multi()
            pipe.set(job_key(job.id), job.model_dump_json(), ex=FINISHED_TTL_S if job.final else None)
            pipe.sadd(JOBS_SET, job.id)
            if job.final:
                pipe.delete(cancel_key(job.id), lease_key(job.id))
            return True

        return await self._update(job.id, step)

    async def all(self) -> list[Job]:
        members: set[bytes] = await self.redis.smembers(JOBS_SET)  # type: ignore[misc]
        ids = sorted(m.decode() for m in members)
        if not ids:
            return []
        raws = await self.redis.mget([job_key(i) for i in ids])
        gone = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
        if gone:
            await self.redis.srem(JOBS_SET, *gone)  # type: ignore[misc]
        return sorted(
            (Job.model_validate_json(raw) for raw in raws if raw is not None), key=lambda j: j.created_at
        )

    async def claim(self, job: Job) -> tuple[Job, bool]:
        """Store `job` unless an unfinished job with its id exists. Returns the job in force and
        whether it is the new one; two callers racing get the same job."""

        async def step(pipe: Pipeline, stored: Job | None) -> tuple[Job, bool]:
            if stored is not None and not stored.final:
                return stored, False
            pipe.multi()
            pipe.set(job_key(job.id), job.model_dump_json())
            pipe.sadd(JOBS_SET, job.id)
            pipe.delete(cancel_key(job.id))
            return job, True

        return await self._update(job.id, step)

    async def cancel(self, job_id: str) -> Job | None:
        """Ask for `job_id` to stop. A job still queued is cancelled here and now, and so is a
        running one whose fetcher is gone (no lease; the fetcher that takes it over finds it
        cancelled and removes its partial file); a running one is stopped by its fetcher, which
        sees the request within a second."""

        async def step(pipe: Pipeline, job: Job | None) -> tuple[Job | None, bool]:
            if job is None or job.final:
                return job, False
            await pipe.watch(lease_key(job_id))
            orphaned = job.state == JobState.RUNNING and not await pipe.exists(lease_key(job_id))
            pipe.multi()
            pipe.set(cancel_key(job_id), b"1", ex=CANCEL_TTL_S)
            if job.state in (JobState.QUEUED, JobState.RETRYING) or orphaned:
                said = "cancelled (its fetcher was gone)" if orphaned else "cancelled before it ran"
                job = job.finished(JobState.CANCELLED, message=said)
                pipe.set(job_key(job_id), job.model_dump_json(), ex=FINISHED_TTL_S)
                return job, True
            return job, False

        job, ended = await self._update(job_id, step)
        if ended and job is not None and self.metrics is not None:
            self.metrics.ended(job)
        return job

    async def cancel_requested(self, job_id: str) -> bool:
        return bool(await self.redis.exists(cancel_key(job_id)))

    async def renew_lease(self, job_id: str, owner: str, ttl_s: float) -> None:
        await self.redis.set(lease_key(job_id), owner.encode(), px=max(int(ttl_s * 1000), 1))

    async def release_lease(self, job_id: str, owner: str) -> None:
        """Give the lease up at once (a clean stop), so the next fetcher need not wait it out."""
        if await self.redis.get(lease_key(job_id)) == owner.encode():
            await self.redis.delete(lease_key(job_id))

    async def has_lease(self, job_id: str) -> bool:
        return bool(await self.redis.exists(lease_key(job_id)))
