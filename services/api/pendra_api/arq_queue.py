"""The service set's install queue: jobs go to the arq fetcher through Redis; their records (and
progress) are read back from Redis. Redis trouble becomes a 503 for the caller, never a hang.
arq stores jobs and results as JSON (`pendra_shared.queue_codec`), never as pickle; Redis's URL
appears in logs only with its password hidden."""

from __future__ import annotations

import contextlib
import logging
from datetime import timedelta
from typing import Any

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.jobs import DeserializationError
from pendra_shared.api_errors import UpstreamUnavailable
from pendra_shared.catalogue import CatalogueEntry
from pendra_shared.install_metrics import JobMetrics
from pendra_shared.jobs import (
    INSTALL_FUNCTION,
    QUEUE_NAME,
    UNINSTALL_FUNCTION,
    Job,
    JobState,
    queue_job_id,
)
from pendra_shared.jobs_redis import RedisJobs, connection_pool, lease_key, redacted
from pendra_shared.queue_codec import dumps, loads
from pendra_shared.sidecar import now_utc
from redis.exceptions import AuthenticationError, RedisError

logger = logging.getLogger(__name__)

UNINSTALL_WAIT_S = 60.0
# A queued job may wait this long for a fetcher; arq drops it after that.
QUEUED_FOR_AT_MOST = timedelta(days=7)
# A job record younger than this is never judged lost: it may be between its claim and its enqueue.
LOST_AFTER_S = 15.0


class ArqQueue:
    def __init__(self, redis_url: str, metrics: JobMetrics | None = None) -> None:
        self.redis = ArqRedis(
            connection_pool(redis_url, retries=3),
            job_serializer=dumps,
            job_deserializer=loads,
            default_queue_name=QUEUE_NAME,
        )
        self.records = RedisJobs(self.redis, metrics=metrics)
        self.where = redacted(redis_url)

    async def start(self) -> None:
        return None  # connections open on first use, so the API starts even before Redis does

    async def close(self) -> None:
        await self.redis.aclose(close_connection_pool=True)

    @contextlib.asynccontextmanager
    async def _redis(self) -> Any:
        try:
            yield
        except AuthenticationError as exc:  # a wrong or missing password: no retry will cure it
            logger.error(
                "Redis at %s refused the password (%s): PENDRA_REDIS_URL must carry the password "
                "Redis was started with (compose: PENDRA_REDIS_PASSWORD in .env)",
                self.where,
                exc,
            )
            raise UpstreamUnavailable(
                "the install queue (Redis) refused the gateway's password; the operator must check "
                "PENDRA_REDIS_PASSWORD",
                code="queue_auth_failed",
            ) from None
        except (RedisError, OSError) as exc:
            logger.warning("Redis at %s: %s", self.where, exc)
            raise UpstreamUnavailable(
                "the install queue (Redis) is not reachable; try again shortly"
            ) from None

    async def check(self) -> None:
        async with self._redis():
            await self.redis.ping()

    async def submit(self, entry: CatalogueEntry) -> tuple[Job, bool]:
        async with self._redis():
            new = Job.new(entry.name, entry.total_size_bytes)
            await self._unless_lost(await self.records.get(new.id))  # a lost job must not block it
            job, created = await self.records.claim(new)
            if created:
                try:
                    await self.redis.enqueue_job(
                        INSTALL_FUNCTION,
                        job.id,
                        job.run,
                        entry.model_dump(mode="json"),
                        _job_id=queue_job_id(job),
                        _expires=QUEUED_FOR_AT_MOST,
                    )
                except (RedisError, OSError):
                    # Claimed but never queued: say so now rather than leave it waiting for nothing.
                    with contextlib.suppress(RedisError, OSError):
                        await self.records.save(
                            job.finished(
                                JobState.FAILED, error="could not queue the job", error_code="job_lost"
                            )
                        )
                    raise
            return job, created

    async def get(self, job_id: str) -> Job | None:
        async with self._redis():
            return await self._unless_lost(await self.records.get(job_id))

    async def jobs(self) -> list[Job]:
        async with self._redis():
            return [j for j in [await self._unless_lost(j) for j in await self.records.all()] if j]

    async def _unless_lost(self, job: Job | None) -> Job | None:
        """`job`, or, when nothing in the queue will ever finish it (no queued or running run, no
        fetcher's lease: Redis lost data, an enqueue failed), the job marked failed, so that it
        no longer blocks a new install of its model."""
        if job is None or job.final or (now_utc() - job.updated_at).total_seconds() < LOST_AFTER_S:
            return job
        queue_id = queue_job_id(job)
        keys = (job_key_prefix + queue_id, in_progress_key_prefix + queue_id, lease_key(job.id))
        if await self.redis.exists(*keys):
            return job
        logger.warning("%s: no queued or running run holds it; marking it failed", job.id)
        lost = job.finished(
            JobState.FAILED,
            error="no queued or running fetcher run holds this job any more; install the model again",
            error_code="job_lost",
        )
        if await self.records.save(lost):  # refused when it just finished or was asked for again
            return lost
        return await self.records.get(job.id)

    async def cancel(self, job_id: str) -> Job | None:
        async with self._redis():
            return await self.records.cancel(job_id)

    async def uninstall(self, name: str) -> dict[str, Any]:
        async with self._redis():
            # Expiring with the wait: a fetcher that comes back later must not act on an answer
            # the client already got as a 503.
            job = await self.redis.enqueue_job(UNINSTALL_FUNCTION, name, _expires=UNINSTALL_WAIT_S)
            assert job is not None  # a fresh job id is never taken
            try:
                result: dict[str, Any] = await job.result(timeout=UNINSTALL_WAIT_S, poll_delay=0.1)
            except TimeoutError:
                raise UpstreamUnavailable(
                    f"no fetcher answered within {UNINSTALL_WAIT_S:.0f}s; is the fetcher service running?"
                ) from None
            except (RedisError, OSError):
                raise
            except DeserializationError:
                # Not what a fetcher writes: something else wrote to Redis. Never unpickled.
                logger.error("the result of %s in Redis is not Pendra's JSON; it was not read", job.job_id)
                raise UpstreamUnavailable(
                    f"the fetcher's answer for {name} could not be read; see the gateway's log",
                    code="invalid_queue_result",
                ) from None
            except Exception as exc:  # the fetcher's run failed (stopped mid-way, say): `JobFailed`
                logger.warning("uninstall of %s failed in the fetcher: %r", name, exc)
                raise UpstreamUnavailable(f"the fetcher could not uninstall {name}: {exc}") from None
            return result
