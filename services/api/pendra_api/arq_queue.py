"""The service set's install queue: jobs go to the arq fetcher through Redis; their records (and
progress) are read back from Redis. Redis trouble becomes a 503 for the caller, never a hang."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from arq.connections import ArqRedis
from pendra_shared.api_errors import UpstreamUnavailable
from pendra_shared.catalogue import CatalogueEntry
from pendra_shared.jobs import INSTALL_FUNCTION, QUEUE_NAME, UNINSTALL_FUNCTION, Job
from pendra_shared.jobs_redis import RedisJobs, connection_pool
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

UNINSTALL_WAIT_S = 60.0


class ArqQueue:
    def __init__(self, redis_url: str) -> None:
        self.redis = ArqRedis(connection_pool(redis_url, retries=3), default_queue_name=QUEUE_NAME)
        self.records = RedisJobs(self.redis)

    async def start(self) -> None:
        return None  # connections open on first use, so the API starts even before Redis does

    async def close(self) -> None:
        await self.redis.aclose()

    @contextlib.asynccontextmanager
    async def _redis(self) -> Any:
        try:
            yield
        except (RedisError, OSError) as exc:
            logger.warning("redis: %s", exc)
            raise UpstreamUnavailable(
                "the install queue (Redis) is not reachable; try again shortly"
            ) from None

    async def check(self) -> None:
        async with self._redis():
            await self.redis.ping()

    async def submit(self, entry: CatalogueEntry) -> tuple[Job, bool]:
        async with self._redis():
            job, created = await self.records.claim(Job.new(entry.name, entry.size_bytes))
            if created:
                await self.redis.enqueue_job(
                    INSTALL_FUNCTION, job.id, entry.model_dump(mode="json"), _job_id=job.id
                )
            return job, created

    async def get(self, job_id: str) -> Job | None:
        async with self._redis():
            return await self.records.get(job_id)

    async def jobs(self) -> list[Job]:
        async with self._redis():
            return await self.records.all()

    async def cancel(self, job_id: str) -> Job | None:
        async with self._redis():
            return await self.records.cancel(job_id)

    async def uninstall(self, name: str) -> dict[str, Any]:
        async with self._redis():
            job = await self.redis.enqueue_job(UNINSTALL_FUNCTION, name)
            assert job is not None  # a fresh job id is never taken
            try:
                result: dict[str, Any] = await job.result(timeout=UNINSTALL_WAIT_S, poll_delay=0.1)
            except TimeoutError:
                with contextlib.suppress(RedisError, asyncio.TimeoutError):
                    await job.abort(timeout=0)
                raise UpstreamUnavailable(
                    f"no fetcher answered within {UNINSTALL_WAIT_S:.0f}s; is the fetcher service running?"
                ) from None
            return result
