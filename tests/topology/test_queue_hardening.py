"""The install queue against a hostile or misconfigured Redis, with compose's processes on a real
Redis that has a password (hardening F2, F-2, F-7, F-8, C16).

Jobs and results are JSON; a pickle planted in Redis is refused by the fetcher and by the API
without running. A wrong or missing password is said in words, and no log shows the password.
Redis gone at enqueue is a 503; a paused fetcher's job is taken over without a second write of
its file; an uninstall during an install is refused until the install is cancelled.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from pendra_api.arq_queue import ArqQueue
from pendra_fetcher.worker import redis_settings
from pendra_shared.catalogue import CatalogueEntry
from pendra_shared.fsutil import sha256_file
from pendra_shared.jobs import QUEUE_NAME, UNINSTALL_FUNCTION, queue_job_id
from pendra_shared.jobs_redis import connection_pool, redacted
from pendra_shared.queue_codec import EXCEPTION_KEY, JobFailed, dumps, loads

from tests.conftest import GEMMA_SHA256, gemma_entry
from tests.shared.test_queue_codec import NOW_MS, planted_job
from tests.support import api
from tests.support.engines import RedisServer
from tests.support.httpserver import FileServer
from tests.support.stack import ComposeStack, Service
from tests.topology.conftest import FAST, Stack

# In the bundled catalogue: a name the API resolves without any file server.
BUNDLED_MODEL = "qwen3:0.6b"


def _until(check: Callable[[], Any], what: str, timeout_s: float = 30, every_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"{what} did not happen within {timeout_s}s")


def _pool(url: str) -> ArqRedis:
    """A client that speaks to the queue as the API does (JSON, never pickle)."""
    return ArqRedis(
        connection_pool(url), job_serializer=dumps, job_deserializer=loads, default_queue_name=QUEUE_NAME
    )


@pytest.fixture
def services(tmp_path: Path, redis_server: RedisServer) -> Iterator[Callable[..., ComposeStack]]:
    """Single services from compose.yaml (`stack.start_service`) on the session's Redis, or on
    another Redis; no inference, no S3."""
    made: list[ComposeStack] = []

    def make(redis: RedisServer = redis_server, env: dict[str, str] | None = None) -> ComposeStack:
        redis.flush()
        stack = ComposeStack(tmp_path / f"stack-{len(made)}", redis, None, extra_env={**FAST, **(env or {})})
        stack.store.mkdir(parents=True)
        made.append(stack)
        return stack

    yield make
    for stack in made:
        stack.stop()


def _assert_no_password(service: Service, *passwords: str) -> None:
    log = service.log()
    for password in passwords:
        assert password not in log, f"{service.name} logged a Redis password"


# -- F2 / F-7: pickle is never read ------------------------------------------------------------


def test_what_the_api_enqueues_is_stored_as_json(redis_server: RedisServer) -> None:
    redis_server.flush()
    entry = CatalogueEntry.model_validate(gemma_entry("https://models.example/gemma.gguf"))

    async def submit() -> tuple[str, bytes | None]:
        queue = ArqQueue(redis_server.url)
        try:
            job, created = await queue.submit(entry)
            assert created
            return queue_job_id(job), await queue.redis.get(job_key_prefix + queue_job_id(job))
        finally:
            await queue.close()

    queue_id, raw = asyncio.run(submit())
    assert raw is not None
    stored = json.loads(raw)  # JSON, not a pickle
    job_id, run = queue_id.split("@")
    assert stored["f"] == "install_model" and stored["a"] == [job_id, run, entry.model_dump(mode="json")]


def test_a_pickled_job_in_the_queue_is_refused_and_the_fetcher_goes_on(
    services: Callable[..., ComposeStack], redis_server: RedisServer, tmp_path: Path
) -> None:
    stack = services()
    fetcher = stack.start_service("fetcher")
    marker = tmp_path / "the-fetcher-ran-a-pickle"
    with redis_server.client() as client:
        # The queue entry and the job body, as arq's enqueue writes them, the body a pickle.
        client.set(job_key_prefix + "planted", planted_job(marker))
        client.zadd(QUEUE_NAME, {"planted": NOW_MS})
        _until(lambda: "deserializing job planted failed" in fetcher.log(), "the fetcher refusing the job")
        assert "DeserializationError" in fetcher.log()
        # The run is failed, and its failure stored as JSON like any other result.
        raw = _until(lambda: client.get(result_key_prefix + "planted"), "the failed result being stored")
        described = {"type": "DeserializationError", "message": "unable to deserialize job"}
        assert json.loads(raw)["r"] == {EXCEPTION_KEY: described}
        assert client.zscore(QUEUE_NAME, "planted") is None
    assert not marker.exists(), "the fetcher unpickled a job"
    assert fetcher.alive()

    async def good_jobs() -> tuple[Any, BaseException]:
        pool = _pool(redis_server.url)
        try:
            answered = await pool.enqueue_job(UNINSTALL_FUNCTION, "ghost:1")
            unknown = await pool.enqueue_job("no_such_function")
            assert answered is not None and unknown is not None
            result = await answered.result(timeout=30, poll_delay=0.1)
            with pytest.raises(JobFailed) as failed:
                await unknown.result(timeout=30, poll_delay=0.1)
            return result, failed.value
        finally:
            await pool.aclose(close_connection_pool=True)

    result, failure = asyncio.run(good_jobs())
    assert result["ok"] is False and result["code"] == "model_not_found"
    # A failed job's result is read back without pickle: its type name and message.
    assert isinstance(failure, JobFailed) and failure.kind == "JobExecutionFailed"
    assert "no_such_function" in failure.message
    assert fetcher.alive()
    _assert_no_password(fetcher, redis_server.password)
    assert redacted(redis_server.url) in fetcher.log()  # the ready line names Redis, password hidden


def test_a_pickled_result_is_refused_by_the_api_with_a_clean_error(
    services: Callable[..., ComposeStack], redis_server: RedisServer, tmp_path: Path
) -> None:
    stack = services()
    gateway = stack.start_service("api")  # no fetcher: the uninstall waits in the queue
    marker = tmp_path / "the-api-ran-a-pickle"
    answers: list[httpx.Response] = []
    asking = threading.Thread(
        target=lambda: answers.append(httpx.delete(f"{stack.api_url}/api/models/ghost:1", timeout=90))
    )
    asking.start()
    try:
        with redis_server.client() as client:
            queued = _until(lambda: client.zrange(QUEUE_NAME, 0, -1), "the uninstall being queued")
            (job_id,) = (raw.decode() for raw in queued)
            client.set(result_key_prefix + job_id, planted_job(marker))
    finally:
        asking.join(60)
    (response,) = answers
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_queue_result" and error["type"] == "server_error"
    assert "could not be read" in error["message"]
    assert not marker.exists(), "the API unpickled a result"
    assert "is not Pendra's JSON" in gateway.log()
    assert gateway.alive()
    assert httpx.get(f"{stack.api_url}/ready", timeout=10).json()["queue"] == "ok"
    _assert_no_password(gateway, redis_server.password)


# -- Redis's password ---------------------------------------------------------------------------


def test_redis_itself_requires_the_password(redis_server: RedisServer) -> None:
    import redis

    with redis.Redis(port=redis_server.port, socket_connect_timeout=1) as anonymous:
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
    with redis_server.client() as client:
        assert client.ping()


def test_a_password_with_url_characters_works_when_percent_encoded(
    services: Callable[..., ComposeStack], tmp_path: Path
) -> None:
    """arq reads the URL's password without decoding it, redis-py decodes it: the fetcher gives
    both the decoded one (its arq pool and its job records must both get in)."""
    own_redis = RedisServer(tmp_path / "own-redis", password="p@ss:w/rd%1?#").start()
    try:
        url = f"redis://:{quote(own_redis.password, safe='')}@127.0.0.1:{own_redis.port}/0"
        assert redis_settings(url).password == own_redis.password
        stack = services(redis=own_redis, env={"PENDRA_REDIS_URL": url})
        fetcher = stack.start_service("fetcher")  # waits for "fetcher ready"
        assert f"redis://:***@127.0.0.1:{own_redis.port}/0" in fetcher.log()
        _assert_no_password(fetcher, own_redis.password, quote(own_redis.password, safe=""))
    finally:
        own_redis.stop()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("redis://pendra:s3cret@redis:6379/0", "redis://pendra:***@redis:6379/0"),
        ("rediss://:s3cret@[::1]:6380/1", "rediss://:***@[::1]:6380/1"),
        ("redis://redis:6379/0?password=s3cret&db=0", "redis://redis:6379/0?password=***&db=0"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("s3cret@redis:6379", "(a Redis URL without a scheme)"),
    ],
)
def test_redis_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert redacted(url) == shown


def _wrong_url(redis_server: RedisServer, password: str | None) -> str:
    auth = f":{password}@" if password is not None else ""
    return f"redis://{auth}127.0.0.1:{redis_server.port}/0"


@pytest.mark.parametrize("password", ["wrong", None], ids=["wrong password", "no password"])
def test_a_fetcher_without_the_right_password_stops_at_once_saying_why(
    services: Callable[..., ComposeStack], redis_server: RedisServer, password: str | None
) -> None:
    wrong = f"{password}-{secrets.token_hex(8)}" if password else None
    stack = services(env={"PENDRA_REDIS_URL": _wrong_url(redis_server, wrong)})
    fetcher = stack.start_service("fetcher", wait=False)
    started = time.monotonic()
    assert fetcher.proc.wait(30) == 1, fetcher.log()
    assert time.monotonic() - started < 30  # not arq's 30 reconnects
    log = fetcher.log()
    shown = f"redis://:***@127.0.0.1:{redis_server.port}/0" if wrong else f"127.0.0.1:{redis_server.port}"
    assert "pendra fetcher: error: Redis at " in log and shown in log
    assert "refused the password" in log and "PENDRA_REDIS_PASSWORD" in log
    assert "Traceback" not in log
    _assert_no_password(fetcher, redis_server.password, *([wrong] if wrong else []))


@pytest.mark.parametrize("password", ["wrong", None], ids=["wrong password", "no password"])
def test_an_api_without_the_right_password_is_not_ready_and_says_why(
    services: Callable[..., ComposeStack], redis_server: RedisServer, password: str | None
) -> None:
    wrong = f"{password}-{secrets.token_hex(8)}" if password else None
    stack = services(env={"PENDRA_REDIS_URL": _wrong_url(redis_server, wrong)})
    gateway = stack.start_service("api", wait=False)

    def ready() -> httpx.Response | None:
        try:
            return httpx.get(f"{stack.api_url}/ready", timeout=5)
        except httpx.TransportError:
            return None

    response = _until(ready, "the API answering", timeout_s=60)
    assert response.status_code == 503
    assert "refused the gateway's password" in response.json()["queue"]
    install = httpx.post(f"{stack.api_url}/api/models/install", json={"model": BUNDLED_MODEL}, timeout=30)
    assert install.status_code == 503
    assert install.json()["error"]["code"] == "queue_auth_failed"
    log = gateway.log()
    assert "refused the password" in log
    if wrong:
        assert f"redis://:***@127.0.0.1:{redis_server.port}/0" in log
    assert gateway.alive()
    _assert_no_password(gateway, redis_server.password, *([wrong] if wrong else []))


# -- F-2: Redis down at enqueue -----------------------------------------------------------------


def test_redis_down_at_enqueue_is_an_openai_style_503(
    services: Callable[..., ComposeStack], tmp_path: Path
) -> None:
    own_redis = RedisServer(tmp_path / "own-redis").start()
    try:
        stack = services(redis=own_redis)
        gateway = stack.start_service("api")
        own_redis.stop()
        response = httpx.post(
            f"{stack.api_url}/api/models/install", json={"model": BUNDLED_MODEL}, timeout=30
        )
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"]
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == "service_unavailable"
        assert "Redis" in body["error"]["message"]
        assert httpx.get(f"{stack.api_url}/ready", timeout=10).status_code == 503
        assert gateway.alive()
        _assert_no_password(gateway, own_redis.password)

        own_redis.start()  # back: the same gateway takes installs again
        again = httpx.post(f"{stack.api_url}/api/models/install", json={"model": BUNDLED_MODEL}, timeout=30)
        assert again.status_code == 202, again.text
    finally:
        own_redis.stop()


# -- F-8: a paused fetcher ----------------------------------------------------------------------


def test_a_fetcher_paused_past_its_lease_is_taken_over_without_a_second_write(
    make_stack: Callable[..., Stack], file_server: FileServer
) -> None:
    stack = make_stack("compose")
    assert isinstance(stack, ComposeStack)
    first = stack.services["fetcher"]
    file_server.faults.throttle_s = 0.008  # about 30 seconds for the whole file
    job = api.install(stack.api_url, "gemma3:270m")
    api.wait_job(stack.api_url, job["id"], until=lambda j: j["done_bytes"] > 10_000_000, timeout_s=60)
    second = stack.start_service("fetcher")  # replaces `first` in stack.services
    try:
        os.kill(first.proc.pid, signal.SIGSTOP)
        # Past the lease (2 s here) the second fetcher takes the job, and finds the first one's
        # lock on the file: it waits instead of writing beside it.
        api.wait_job(
            stack.api_url,
            job["id"],
            until=lambda j: "another install of gemma3:270m is running" in j["message"],
            timeout_s=30,
        )
        assert "taking the job over" in second.log()
        os.kill(first.proc.pid, signal.SIGCONT)
        file_server.faults.throttle_s = 0
        final = api.wait_job(stack.api_url, job["id"], timeout_s=120)
        assert final["state"] == "done", final
        target = stack.store / "gemma3-270m.gguf"
        placed = target.stat()
        _until(lambda: ":install_model ●" in second.log(), "the second fetcher's run ending", timeout_s=60)
        assert sha256_file(target) == GEMMA_SHA256
        after = target.stat()
        assert (after.st_ino, after.st_mtime_ns) == (placed.st_ino, placed.st_mtime_ns)
        # The paused fetcher finished its own download; the other one found it installed.
        assert "installed gemma3:270m as gemma3-270m.gguf" in first.log()
        assert "installed gemma3:270m as" not in second.log()
        assert list((stack.store / ".partial").glob("*.part")) == []
        assert first.alive() and second.alive()
    finally:
        os.kill(first.proc.pid, signal.SIGCONT)
        first.stop()


# -- C16: uninstall during an install -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["compose", "embedded"])
def test_uninstalling_a_model_being_installed_cancels_the_install_and_removes_the_partial(
    make_stack: Callable[..., Stack], file_server: FileServer, kind: str
) -> None:
    stack = make_stack(kind)
    file_server.faults.throttle_s = 0.01  # about 40 seconds for the whole file
    job = api.install(stack.api_url, "gemma3:270m")
    api.wait_job(stack.api_url, job["id"], until=lambda j: j["done_bytes"] > 1_000_000, timeout_s=60)
    removed = httpx.delete(f"{stack.api_url}/api/models/gemma3:270m", timeout=60)
    assert removed.status_code == 200, removed.text
    assert removed.json() == {
        "id": "gemma3:270m",
        "object": "model",
        "deleted": True,
        "file": None,
        "cancelled_job": job["id"],
    }
    assert api.job(stack.api_url, job["id"])["state"] == "cancelled"
    assert list(stack.store.glob("*.gguf")) == []
    assert list((stack.store / ".partial").glob("*.part")) == []
    gone = httpx.delete(f"{stack.api_url}/api/models/gemma3:270m", timeout=90)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
