"""What only the service set has: a fetcher killed mid-download, Redis restarting mid-job, the
S3 mirror (and installing from it with the upstream server gone), an inference service that is
down behind the gateway."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from pendra_shared.fsutil import sha256_file

from tests.conftest import GEMMA_SHA256, GEMMA_SIZE, gemma_entry
from tests.support import api
from tests.support.engines import S3_BUCKET, RedisServer, S3Server
from tests.support.httpserver import FileServer
from tests.support.stack import ComposeStack, load_compose
from tests.topology.conftest import Stack

MakeStack = Callable[..., Stack]


def _listed(stack: ComposeStack) -> set[str]:
    return {m["id"] for m in httpx.get(f"{stack.inference_url}/v1/models", timeout=10).json()["data"]}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_a_fetcher_killed_or_stopped_mid_download_resumes_on_restart(
    make_stack: MakeStack, file_server: FileServer, sig: signal.Signals
) -> None:
    stack = make_stack("compose")
    assert isinstance(stack, ComposeStack)
    file_server.faults.throttle_s = 0.004  # roughly 15 seconds for the whole file
    job = api.install(stack.api_url, "gemma3:270m")
    api.wait_job(stack.api_url, job["id"], until=lambda j: j["done_bytes"] > 40_000_000, timeout_s=60)
    stack.services["fetcher"].stop(sig)
    killed_at = api.job(stack.api_url, job["id"])["done_bytes"]
    if sig == signal.SIGTERM:  # a clean stop says so in the job
        stopped = api.job(stack.api_url, job["id"])
        assert stopped["state"] == "queued" and "resumes" in stopped["message"], stopped
    assert _listed(stack) == set(), "a partial download was offered as a model"

    file_server.faults.throttle_s = 0
    stack.start_service("fetcher")
    final = api.wait_job(stack.api_url, job["id"], timeout_s=120)
    assert final["state"] == "done", final
    assert final["attempts"] == 2
    assert sha256_file(stack.store / "gemma3-270m.gguf") == GEMMA_SHA256
    assert list((stack.store / ".partial").glob("*.part")) == []
    resumed = [r for r in file_server.requests if r.range]
    assert resumed and int(resumed[-1].range.split("=")[1].rstrip("-")) >= killed_at - 8 * 1024 * 1024
    # Killed, the job waits out its lease and is taken over; stopped, it is handed back at once.
    assert ("taking the job over" in stack.services["fetcher"].log()) == (sig == signal.SIGKILL)
    # ... and the restarted fetcher's metrics say so, with the bytes it fetched after the resume.
    metrics = httpx.get(f"{stack.fetcher_url}/metrics", timeout=10).text
    takeovers = 1.0 if sig == signal.SIGKILL else 0.0
    assert f"pendra_install_lease_takeovers_total {takeovers}" in metrics
    fetched = re.search(r'^pendra_install_download_bytes_total\{source="upstream"\} (\S+)$', metrics, re.M)
    assert fetched and 0 < float(fetched.group(1)) <= GEMMA_SIZE - killed_at + 8 * 1024 * 1024
    api.wait_model(stack.api_url, "gemma3:270m")


def test_redis_restarting_mid_job_loses_nothing(
    make_stack: MakeStack, file_server: FileServer, redis_server: RedisServer
) -> None:
    stack = make_stack("compose")
    file_server.faults.throttle_s = 0.003
    job = api.install(stack.api_url, "gemma3:270m")
    api.wait_job(stack.api_url, job["id"], until=lambda j: j["done_bytes"] > 10_000_000, timeout_s=60)
    redis_server.restart(down_s=2.0)
    final = api.wait_job(stack.api_url, job["id"], timeout_s=120)
    assert final["state"] == "done", final
    assert sha256_file(stack.store / "gemma3-270m.gguf") == GEMMA_SHA256
    assert all(s.alive() for s in stack.services.values())
    assert len(file_server.requests) == 1  # the download itself went on undisturbed


def test_the_mirror_fills_and_then_serves_installs_without_upstream(
    make_stack: MakeStack,
    file_server: FileServer,
    s3_server: S3Server,
    served_gemma: str,
    write_catalogue: Callable[..., object],
) -> None:
    s3_server.empty()
    stack = make_stack("compose", s3=s3_server)
    job = api.install(stack.api_url, "gemma3:270m")
    assert api.wait_job(stack.api_url, job["id"])["state"] == "done"
    key = f"sha256/{GEMMA_SHA256}"
    assert s3_server.client().stat_object(S3_BUCKET, key).size == GEMMA_SIZE

    assert httpx.delete(f"{stack.api_url}/api/models/gemma3:270m", timeout=30).status_code == 200
    file_server.stop()  # upstream gone: an air-gapped host with a filled mirror
    job = api.install(stack.api_url, "gemma3:270m")
    final = api.wait_job(stack.api_url, job["id"])
    assert final["state"] == "done", final
    assert sha256_file(stack.store / "gemma3-270m.gguf") == GEMMA_SHA256
    assert "mirror" in stack.services["fetcher"].log()


def test_a_catalogue_entry_on_s3_installs_from_the_mirror(
    make_stack: MakeStack, s3_server: S3Server, gemma_path: object, write_catalogue: Callable[..., object]
) -> None:
    s3_server.empty()
    s3_server.client().fput_object(S3_BUCKET, "models/gemma.gguf", str(gemma_path))
    catalogue = write_catalogue([gemma_entry(f"s3://{S3_BUCKET}/models/gemma.gguf", name="gemma-s3:270m")])
    stack = make_stack("compose", s3=s3_server, env={"PENDRA_CATALOGUE": str(catalogue)})
    stack.extra_env["PENDRA_CATALOGUE"] = str(catalogue)
    job = api.install(stack.api_url, "gemma-s3:270m")
    final = api.wait_job(stack.api_url, job["id"])
    assert final["state"] == "done", final
    assert sha256_file(stack.store / "gemma-s3-270m.gguf") == GEMMA_SHA256


def test_inference_down_is_a_503_with_retry_after(make_stack: MakeStack) -> None:
    stack = make_stack("compose")
    assert isinstance(stack, ComposeStack)
    stack.services["inference"].stop()
    response = httpx.post(
        f"{stack.api_url}/v1/chat/completions",
        json={"model": "gemma3:270m", "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"]["code"] == "service_unavailable"
    ready = httpx.get(f"{stack.api_url}/ready", timeout=10).json()
    assert ready["inference"] == "unreachable" and ready["queue"] == "ok"
    with (
        openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key="none", max_retries=0) as client,
        pytest.raises(openai.InternalServerError) as err,
    ):
        client.models.list()
    assert err.value.status_code == 503

    stack.start_service("inference")
    assert httpx.get(f"{stack.api_url}/v1/models", timeout=10).status_code == 200


def test_streaming_through_the_gateway_arrives_token_by_token(
    make_stack: MakeStack, gemma_path: object
) -> None:
    stack = make_stack("compose")
    assert isinstance(stack, ComposeStack)
    job = api.install(stack.api_url, "gemma3:270m")
    assert api.wait_job(stack.api_url, job["id"])["state"] == "done"
    api.wait_model(stack.api_url, "gemma3:270m")

    def timed_stream(base_url: str) -> tuple[list[str], float]:
        arrivals, pieces = [], []
        with openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=120) as client:
            stream = client.chat.completions.create(
                model="gemma3:270m",
                messages=[{"role": "user", "content": "Count from one to twenty."}],
                max_tokens=48,
                temperature=0,
                seed=1,
                stream=True,
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    arrivals.append(time.monotonic())
                    pieces.append(chunk.choices[0].delta.content)
        return pieces, arrivals[-1] - arrivals[0]

    timed_stream(stack.inference_url)  # warm: the model loads
    direct, direct_span = timed_stream(stack.inference_url)
    proxied, proxied_span = timed_stream(stack.api_url)
    # The same tokens come through the gateway as straight from the service. (Only the start is
    # compared: llama.cpp's sums depend on where the cache holds a sequence, and Gemma turns
    # last-bit differences into different picks at near ties further on; see the README.)
    assert len(direct) > 10 and len(proxied) > 10 and proxied[:16] == direct[:16]
    # Buffered, all chunks would arrive together; passed through, they spread as generated.
    assert proxied_span > 0.5 * direct_span, (proxied_span, direct_span)


def test_the_fetcher_healthcheck_follows_the_worker(make_stack: MakeStack) -> None:
    stack = make_stack("compose")
    assert isinstance(stack, ComposeStack)
    command = load_compose()["services"]["fetcher"]["healthcheck"]["test"][1:]
    fetcher = stack.services["fetcher"]
    fetcher_env = {**os.environ, "PENDRA_REDIS_URL": stack.redis.url}

    def healthy() -> bool:
        argv = [sys.executable if part == "python" else part for part in command]
        return subprocess.run(argv, env=fetcher_env, capture_output=True, timeout=30).returncode == 0

    deadline = time.monotonic() + 15
    while not healthy():
        assert time.monotonic() < deadline, "the running fetcher never reported healthy"
        time.sleep(0.5)
    fetcher.stop()
    deadline = time.monotonic() + 20  # the record lives one health-check interval (10 s) plus one
    while healthy():
        assert time.monotonic() < deadline, "a stopped fetcher still reports healthy"
        time.sleep(1)


def test_a_client_leaving_mid_stream_stops_generation_behind_the_gateway(make_stack: MakeStack) -> None:
    stack = make_stack("compose")
    assert isinstance(stack, ComposeStack)
    job = api.install(stack.api_url, "gemma3:270m")
    assert api.wait_job(stack.api_url, job["id"])["state"] == "done"
    body = {
        "model": "gemma3:270m",
        "messages": [{"role": "user", "content": "Tell a very long story."}],
        "max_tokens": 1500,
        "stream": True,
    }
    with httpx.stream("POST", f"{stack.api_url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(6), strict=False) if line.startswith("data: ")]
        assert received
    # The gateway closed its upstream request; the inference service stopped well short of 1500.
    deadline = time.monotonic() + 20
    while "client went away; stopped after" not in stack.services["inference"].log():
        assert time.monotonic() < deadline, stack.services["inference"].log()[-3000:]
        time.sleep(0.2)
    stopped = int(stack.services["inference"].log().split("stopped after ")[1].split()[0])
    assert stopped < 1500


@pytest.mark.parametrize("corruption", ["truncated", "same size"])
def test_a_corrupt_mirror_copy_is_replaced_by_the_verified_upstream_file(
    make_stack: MakeStack,
    file_server: FileServer,
    s3_server: S3Server,
    write_catalogue: Callable[..., object],
    corruption: str,
) -> None:
    import hashlib
    import io

    from tests.support.ggufs import write_gguf

    path = write_gguf(file_server.root / "tiny.gguf", tensors=8)
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    entry = gemma_entry(file_server.url("tiny.gguf"), name="tiny:1m", gguf_sha256=sha, size_bytes=len(data))
    catalogue = write_catalogue([entry])
    bad = data[:1000] if corruption == "truncated" else data[:-16] + b"\0" * 16
    s3_server.empty()
    s3_server.client().put_object(S3_BUCKET, f"sha256/{sha}", io.BytesIO(bad), len(bad))

    stack = make_stack("compose", s3=s3_server, env={"PENDRA_CATALOGUE": str(catalogue)})
    job = api.install(stack.api_url, "tiny:1m")
    final = api.wait_job(stack.api_url, job["id"])
    assert final["state"] == "done", final
    assert sha256_file(stack.store / "tiny-1m.gguf") == sha
    assert [r.path for r in file_server.requests] == ["/tiny.gguf"]  # upstream, once
    mirrored = s3_server.client().get_object(S3_BUCKET, f"sha256/{sha}").read()
    assert mirrored == data


def test_a_job_nothing_will_finish_is_marked_lost_and_blocks_no_new_install(
    make_stack: MakeStack, redis_server: RedisServer
) -> None:
    import asyncio
    from datetime import timedelta

    from pendra_shared.jobs import Job, JobState
    from pendra_shared.jobs_redis import RedisJobs, connect

    stack = make_stack("compose")
    # A record left "running" with no queued or running run behind it (Redis lost the queue,
    # say): it must not hold the model's install hostage.
    job = Job.new("gemma3:270m", GEMMA_SIZE)
    then = job.created_at - timedelta(minutes=5)
    stuck = job.model_copy(update={"state": JobState.RUNNING, "created_at": then, "updated_at": then})

    async def put() -> None:
        redis = connect(redis_server.url)
        await RedisJobs(redis).save(stuck)
        await redis.aclose()

    asyncio.run(put())
    seen = api.job(stack.api_url, stuck.id)
    assert seen["state"] == "failed" and seen["error_code"] == "job_lost", seen
    fresh = api.install(stack.api_url, "gemma3:270m")
    assert fresh["run"] != stuck.run
    assert api.wait_job(stack.api_url, fresh["id"])["state"] == "done"


def test_inference_dying_mid_stream_ends_the_gateways_stream_with_an_error_event(
    make_stack: MakeStack,
) -> None:
    stack = make_stack("compose")
    assert isinstance(stack, ComposeStack)
    job = api.install(stack.api_url, "gemma3:270m")
    assert api.wait_job(stack.api_url, job["id"])["state"] == "done"
    body = {
        "model": "gemma3:270m",
        "messages": [{"role": "user", "content": "Tell a very long story."}],
        "max_tokens": 1500,
        "logit_bias": {"1": -100, "106": -100},  # no end of turn: it runs until killed
        "stream": True,
    }
    events = []
    with httpx.stream("POST", f"{stack.api_url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
            if len(events) == 4:
                stack.services["inference"].stop(signal.SIGKILL)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "service_unavailable" and "retry" in error["message"]
    assert all("error" not in json.loads(event) for event in events[:4])
    # The gateway serves on, and says inference is gone until it is back.
    assert httpx.get(f"{stack.api_url}/ready", timeout=10).json()["inference"] == "unreachable"
