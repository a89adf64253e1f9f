"""Job records on a real Redis: the rules the API and the fetcher rely on."""

from __future__ import annotations

import asyncio

from pendra_shared.jobs import Job, JobState
from pendra_shared.jobs_redis import FINISHED_TTL_S, RedisJobs, connect, job_key

from tests.support.engines import RedisServer


def run(redis_server: RedisServer, scenario):  # type: ignore[no-untyped-def]
    async def go():  # type: ignore[no-untyped-def]
        redis = connect(redis_server.url)
        try:
            return await scenario(RedisJobs(redis))
        finally:
            await redis.aclose()

    redis_server.flush()
    return asyncio.run(go())


def test_racing_claims_agree_on_one_job(redis_server: RedisServer) -> None:
    async def scenario(jobs: RedisJobs) -> list[tuple[Job, bool]]:
        return await asyncio.gather(*(jobs.claim(Job.new("gemma3:270m")) for _ in range(12)))

    results = run(redis_server, scenario)
    assert sum(created for _job, created in results) == 1
    assert len({job.run for job, _created in results}) == 1


def test_a_finished_job_gives_way_to_a_new_request(redis_server: RedisServer) -> None:
    async def scenario(jobs: RedisJobs) -> tuple[bool, bool, int]:
        first, _ = await jobs.claim(Job.new("gemma3:270m"))
        await jobs.save(first.finished(JobState.FAILED, error="boom"))
        ttl = await jobs.redis.ttl(job_key(first.id))
        second, created = await jobs.claim(Job.new("gemma3:270m"))
        return created, second.run != first.run, ttl

    created, new_run, ttl = run(redis_server, scenario)
    assert created and new_run
    assert 0 < ttl <= FINISHED_TTL_S  # finished records expire; running ones never do


def test_cancel_ends_a_queued_job_at_once_and_asks_a_running_one_to_stop(redis_server: RedisServer) -> None:
    async def scenario(jobs: RedisJobs) -> tuple[Job | None, bool, Job | None, bool, Job | None]:
        queued, _ = await jobs.claim(Job.new("a:1"))
        cancelled_queued = await jobs.cancel(queued.id)
        running, _ = await jobs.claim(Job.new("b:1"))
        await jobs.save(running.moved(state=JobState.RUNNING))
        await jobs.renew_lease(running.id, "fetcher-1", 30)  # its fetcher is alive
        asked = await jobs.cancel(running.id)
        return (
            cancelled_queued,
            await jobs.cancel_requested(queued.id),
            asked,
            await jobs.cancel_requested(running.id),
            await jobs.cancel("install:nothing:1"),
        )

    cancelled_queued, flag_queued, asked, flag_running, missing = run(redis_server, scenario)
    assert cancelled_queued is not None and cancelled_queued.state == JobState.CANCELLED
    assert flag_queued
    assert asked is not None and asked.state == JobState.RUNNING and flag_running
    assert missing is None


def test_a_run_cannot_overwrite_a_cancel_or_a_newer_request(redis_server: RedisServer) -> None:
    async def scenario(jobs: RedisJobs) -> tuple[bool, bool, bool, JobState]:
        old, _ = await jobs.claim(Job.new("a:1"))
        await jobs.cancel(old.id)  # queued: cancelled at once
        after_cancel = await jobs.save(old.moved(state=JobState.RUNNING))
        new, _ = await jobs.claim(Job.new("a:1"))
        stale = await jobs.save(old.moved(state=JobState.RUNNING))
        own = await jobs.save(new.moved(state=JobState.RUNNING))
        stored = await jobs.get(new.id)
        assert stored is not None and stored.run == new.run
        return after_cancel, stale, own, stored.state

    after_cancel, stale, own, state = run(redis_server, scenario)
    assert (after_cancel, stale, own, state) == (False, False, True, JobState.RUNNING)


def test_cancelling_a_running_job_whose_fetcher_is_gone_ends_it_at_once(redis_server: RedisServer) -> None:
    async def scenario(jobs: RedisJobs) -> Job | None:
        job, _ = await jobs.claim(Job.new("c:1"))
        await jobs.save(job.moved(state=JobState.RUNNING))  # no lease: nobody runs it
        return await jobs.cancel(job.id)

    cancelled = run(redis_server, scenario)
    assert cancelled is not None and cancelled.state == JobState.CANCELLED
