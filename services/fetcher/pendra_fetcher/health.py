"""`python -m pendra_fetcher.health`: the container healthcheck. Exits 0 when this fetcher's arq
worker has written its health record to Redis recently, 1 otherwise."""

from __future__ import annotations

import sys

from arq.constants import health_check_key_suffix
from arq.worker import check_health
from pendra_shared.config import load_settings
from pendra_shared.jobs import QUEUE_NAME

from pendra_fetcher.worker import redis_settings

if __name__ == "__main__":
    settings = load_settings()
    sys.exit(check_health(redis_settings(settings.redis_url), QUEUE_NAME + health_check_key_suffix))
