"""Many clients at once against a real `pendra serve` (real Gemma, real llama.cpp): continuous
batching gives the same answers as running alone, prefix reuse, n > 1, logprobs, clients that
leave, and admission control under a burst."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.inference.conftest import CHAT
from tests.support.openai_schemas import validate
from tests.support.server import ServerProcess, start_server

SEA = [{"role": "user", "content": "Write one sentence about the sea."}]
NO_END = {"1": -100, "106": -100}  # Gemma's <eos> and <end_of_turn>: generate to max_tokens


def topic(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Tell me something about the number {i} and the colour blue."}]


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    match = re.search(rf'^{name}{{model_name="{re.escape(CHAT)}"}} ([0-9.e+-]+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_greedy_answer_is_the_same_alone_and_among_fifteen_others(client: openai.OpenAI) -> None:
    def greedy() -> str:
        r = client.chat.completions.create(model=CHAT, messages=SEA, max_tokens=8, temperature=0)
        return r.choices[0].message.content or ""

    def seeded(i: int) -> str:
        r = client.chat.completions.create(
            model=CHAT, messages=topic(i), max_tokens=24, temperature=1.0, seed=100 + i
        )
        return r.choices[0].message.content or ""

    alone = greedy()
    with ThreadPoolExecutor(16) as pool:
        others = [pool.submit(seeded, i) for i in range(15)]
        crowded = pool.submit(greedy)
        crowd = [f.result() for f in others]
    assert crowded.result() == alone
    assert len(set(crowd)) > 1  # the others did run beside it, each with its own seed


def test_sixteen_streams_complete_with_correct_usage(server: ServerProcess) -> None:
    def stream(i: int) -> tuple[str, dict[str, Any], str | None, float]:
        body = {
            "model": CHAT,
            "messages": topic(i),
            "max_tokens": 20,
            "temperature": 0.9,
            "seed": i,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        text, usage, finish, first = "", {}, None, 0.0
        started = time.monotonic()
        with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                validate(chunk, "CreateChatCompletionStreamResponse")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        first = first or time.monotonic() - started
                        text += choice["delta"]["content"]
                    finish = choice["finish_reason"] or finish
        return text, usage, finish, first

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(stream, range(16)))
    for text, usage, finish, _first in results:
        assert text
        assert usage["prompt_tokens"] > 5
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        if finish == "length":
            assert usage["completion_tokens"] == 20
        else:
            assert finish == "stop" and 0 < usage["completion_tokens"] <= 20


def test_a_client_leaving_frees_its_sequence_within_a_step(server: ServerProcess) -> None:
    body = {
        "model": CHAT,
        "messages": SEA,
        "max_tokens": 1500,
        "temperature": 1.0,
        "stream": True,
        "logit_bias": NO_END,
    }
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # kept open: leaving a for loop over it would close the connection
        for _ in range(6):
            next(lines)
        assert metric(server, "pendra_requests_running") == 1
        lines.close()  # now the client leaves
    deadline = time.monotonic() + 3  # within a step or two (plus the disconnect poll)
    while metric(server, "pendra_requests_running") != 0:
        assert time.monotonic() < deadline, "the abandoned request is still running"
        time.sleep(0.05)


def test_prefix_reuse_reports_cached_tokens_and_keeps_the_text(client: openai.OpenAI) -> None:
    system = {
        "role": "system",
        "content": "You are a lighthouse keeper on a rocky island. " * 12
        + "Answer in one short sentence about the sea, the weather or the light.",
    }

    def ask(question: str) -> tuple[str, int, int]:
        r = client.chat.completions.create(
            model=CHAT,
            messages=[system, {"role": "user", "content": question}],
            max_tokens=16,
            temperature=0,
        )
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        cached = r.usage.prompt_tokens_details.cached_tokens or 0
        return r.choices[0].message.content or "", cached, r.usage.prompt_tokens

    cold, cold_cached, prompt_tokens = ask("What do you see tonight?")
    assert cold_cached < 20  # nothing of this system prompt was cached before
    other, other_cached, _ = ask("How was the storm?")  # another client, same system prompt
    assert other_cached > 100
    warm, warm_cached, _ = ask("What do you see tonight?")  # the same request again
    assert warm_cached == prompt_tokens - 1  # all but the token whose logits start the answer
    assert warm == cold  # shared cells give the same text as decoding the prompt anew


def test_n_choices(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=CHAT, messages=SEA, max_tokens=12, n=3, temperature=1.0, seed=11
    )
    validate(result.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    assert [c.index for c in result.choices] == [0, 1, 2]
    texts = [c.message.content or "" for c in result.choices]
    assert all(texts) and len(set(texts)) > 1  # each choice samples on its own
    assert result.usage is not None
    if all(c.finish_reason == "length" for c in result.choices):
        assert result.usage.completion_tokens == 36
    greedy = client.chat.completions.create(
        model=CHAT, messages=SEA, max_tokens=10, n=2, temperature=0, logit_bias=NO_END
    )
    assert greedy.usage is not None and greedy.usage.completion_tokens == 20
    assert greedy.usage.prompt_tokens < 30  # the prompt is counted once, not per choice


def test_n_choices_stream(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=CHAT, messages=SEA, max_tokens=8, n=2, temperature=0.7, seed=5, stream=True
        )
    )
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_logprobs_match_the_openai_schema(client: openai.OpenAI, server: ServerProcess) -> None:
    result = client.chat.completions.create(
        model=CHAT, messages=SEA, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    body = result.model_dump(exclude_unset=True)
    validate(body, "CreateChatCompletionResponse")
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == result.usage.completion_tokens if result.usage else False
    for entry in content:
        validate(entry, "ChatCompletionTokenLogprob")
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert tops == sorted(tops, reverse=True)
        # Greedy: the chosen token is the likeliest one.
        assert entry["token"] == entry["top_logprobs"][0]["token"]
        assert abs(entry["logprob"] - tops[0]) < 1e-4
    assert "".join(e["token"] for e in content) == result.choices[0].message.content
    streamed = list(
        client.chat.completions.create(
            model=CHAT, messages=SEA, max_tokens=6, temperature=0, logprobs=True, top_logprobs=1, stream=True
        )
    )
    entries = []
    for chunk in streamed:
        data = chunk.model_dump(exclude_unset=True)
        validate(data, "CreateChatCompletionStreamResponse")
        for choice in data["choices"]:
            if choice.get("logprobs"):
                entries += choice["logprobs"]["content"]
    assert [e["token"] for e in entries] == [e["token"] for e in content]
    no_logprobs = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={"model": CHAT, "messages": SEA, "max_tokens": 2},
        timeout=60,
    ).json()
    assert no_logprobs["choices"][0]["logprobs"] is None


def test_scheduler_telemetry_on_metrics(server: ServerProcess, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=CHAT, messages=SEA, max_tokens=4)
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    for series in (
        "pendra_requests_waiting",
        "pendra_requests_running",
        "pendra_kv_cache_cells",
        "pendra_kv_cache_cells_used",
        "pendra_kv_cache_usage_ratio",
        "pendra_request_queue_time_seconds_bucket",
        "pendra_time_to_first_token_seconds_bucket",
        "pendra_time_per_output_token_seconds_bucket",
        "pendra_request_prompt_tokens_bucket",
        "pendra_request_generation_tokens_bucket",
        "pendra_prefix_cache_hits_total",
        "pendra_inter_token_latency_seconds_bucket",
        "pendra_e2e_request_latency_seconds_bucket",
        "pendra_generation_seconds_total",
    ):
        assert f"{series}{{" in text, series
    assert metric(server, "pendra_kv_cache_cells") >= 2048
    assert 0 < metric(server, "pendra_kv_cache_cells_used") <= metric(server, "pendra_kv_cache_cells")


# -- admission control ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server(served_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One sequence of 512 tokens, two places in the queue, a 1.5 s queue timeout."""
    env = {
        "PENDRA_MODELS_DIR": str(served_store),
        "PENDRA_N_CTX": "512",
        "PENDRA_PARALLEL": "1",
        "PENDRA_MAX_QUEUE": "2",
        "PENDRA_QUEUE_TIMEOUT_S": "1.5",
        "PENDRA_KEEP_ALIVE": "-1",
        "PENDRA_PRELOAD": CHAT,
    }
    proc = start_server(env, tmp_path_factory.mktemp("small") / "serve.log")
    yield proc
    proc.stop()


def test_a_burst_gets_503s_with_retry_after_and_the_accepted_complete(small_server: ServerProcess) -> None:
    url = f"{small_server.base_url}/v1/chat/completions"

    def post(body: dict[str, Any]) -> httpx.Response:
        return httpx.post(url, json={"model": CHAT, "messages": SEA, **body}, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        # One long request holds the only sequence (its max_tokens claims the whole cache) ...
        long = pool.submit(post, {"max_tokens": 480, "temperature": 1.0, "seed": 1, "logit_bias": NO_END})
        time.sleep(1.0)
        # ... so of a burst of six, two wait in the queue and four are turned away at once.
        burst = [pool.submit(post, {"max_tokens": 4, "stream": i % 2 == 1}) for i in range(6)]
        responses = [f.result() for f in burst]
        first = long.result()
    assert first.status_code == 200 and first.json()["choices"][0]["message"]["content"]
    refused = [r for r in responses if r.status_code == 503]
    assert len(refused) >= 4
    for r in refused:
        assert r.headers["Retry-After"].isdigit()
        validate(r.json(), "ErrorResponse")
        assert r.json()["error"]["code"] == "server_overloaded"
    messages = " ".join(r.json()["error"]["message"] for r in refused)
    assert "PENDRA_MAX_QUEUE" in messages
    assert "PENDRA_QUEUE_TIMEOUT_S" in messages  # the two queued ones waited past 1.5 s
    for r in responses:
        if r.status_code != 503:
            assert r.status_code == 200  # every accepted request completes
    # The turned-away requests reached the model and are errors in its metrics; the rest stopped.
    text = httpx.get(f"{small_server.base_url}/metrics", timeout=10).text
    labels = f'endpoint="chat",finish_reason="error",model_name="{re.escape(CHAT)}"'
    errors = re.search(rf"^pendra_requests_total{{{labels}}} (\S+)$", text, re.M)
    assert errors and float(errors.group(1)) == len(refused), text
    # And the server serves on.
    assert post({"max_tokens": 2}).status_code == 200


def test_a_client_that_leaves_while_queued_is_let_go_and_counted(small_server: ServerProcess) -> None:
    """Its handler waited for admission; the scheduler drops the request and tells the handler, so
    it ends (as an abort) instead of waiting forever with the model held."""
    url = f"{small_server.base_url}/v1/chat/completions"
    label = f'endpoint="chat",finish_reason="abort",model_name="{re.escape(CHAT)}"'

    def aborts() -> float:
        text = httpx.get(f"{small_server.base_url}/metrics", timeout=10).text
        found = re.search(rf"^pendra_requests_total{{{label}}} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    before = aborts()
    with ThreadPoolExecutor(1) as pool:
        body = {"model": CHAT, "messages": SEA, "max_tokens": 480, "logit_bias": NO_END}
        long = pool.submit(httpx.post, url, json=body, timeout=120)  # holds the only sequence
        time.sleep(1.0)
        with pytest.raises(httpx.ReadTimeout):  # queued behind it, the client gives up
            httpx.post(url, json={"model": CHAT, "messages": SEA, "max_tokens": 4}, timeout=0.6)
        deadline = time.monotonic() + 5
        while aborts() == before:
            assert time.monotonic() < deadline, "the queued request that was left is still waiting"
            time.sleep(0.1)
        assert not long.done()  # let go while the long one still ran, not when the queue emptied
        assert long.result().status_code == 200
    assert aborts() == before + 1
