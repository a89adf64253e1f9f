"""`python -m pendra_fetcher.health`: the container healthcheck. Exits 0 when a fetcher's arq worker
has written its health record to Redis within the last health-check interval, 1 otherwise."""

from __future__ import annotations

import asyncio
import dataclasses
import sys

from arq.worker import async_check_health
from pendra_shared.config import load_settings
from pendra_shared.jobs import QUEUE_NAME

from pendra_fetcher.worker import redis_settings


def check(redis_url: str) -> int:
    settings = dataclasses.replace(redis_settings(redis_url), conn_retries=0)
    try:
        return asyncio.run(async_check_health(settings, queue_name=QUEUE_NAME))
    except Exception as exc:  # Redis unreachable: unhealthy, said in one line
        sys.stderr.write(f"fetcher health: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(check(load_settings().redis_url))
