"""The inference metrics a dashboard plots, read from a real `pendra serve`'s `/metrics` after real
requests: each series counts what the responses said happened."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.inference.conftest import CHAT, GEMMA_EMBED, TINY
from tests.inference.test_chat import WEATHER
from tests.support.server import ServerProcess

NO_END = {"1": -100, "106": -100}  # Gemma's <eos> and <end_of_turn>: generate to max_tokens


def samples(server: ServerProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(server: ServerProcess, name: str, **labels: str) -> float:
    return samples(server).get((name, frozenset(labels.items())), 0.0)


def test_a_chat_counts_its_tokens_timings_and_finish_reason(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    before = samples(server)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return samples(server).get(key, 0.0) - before.get(key, 0.0)

    reply = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "Count to ten."}],
        max_tokens=12,
        temperature=0,
        logit_bias=NO_END,
    )
    assert reply.usage is not None and reply.choices[0].finish_reason == "length"
    generated = reply.usage.completion_tokens
    assert generated == 12
    m = {"model_name": CHAT}
    assert delta("pendra_generation_tokens_total", **m) == generated
    assert delta("pendra_prompt_tokens_total", **m, endpoint="chat") == reply.usage.prompt_tokens
    assert delta("pendra_requests_total", **m, endpoint="chat", finish_reason="length") == 1
    assert delta("pendra_time_to_first_token_seconds_count", **m) == 1
    assert delta("pendra_e2e_request_latency_seconds_count", **m) == 1
    assert delta("pendra_request_queue_time_seconds_count", **m) == 1
    # One interval between each pair of consecutive tokens.
    assert delta("pendra_inter_token_latency_seconds_count", **m) == generated - 1
    assert delta("pendra_request_generation_tokens_sum", **m) == generated
    assert delta("pendra_prefix_cache_queries_total", **m) == reply.usage.prompt_tokens
    # The seconds counters give the decode speed one stream saw: within the request's own time.
    seconds = delta("pendra_generation_seconds_total", **m)
    assert 0 < seconds < delta("pendra_e2e_request_latency_seconds_sum", **m)
    assert delta("pendra_prompt_seconds_total", **m) > 0
    assert delta("pendra_inter_token_latency_seconds_sum", **m) == pytest.approx(seconds, rel=1e-6)

    # The same prompt again: its prefix comes from the cache.
    client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Count to ten."}], max_tokens=2, temperature=0
    )
    assert delta("pendra_prefix_cache_hits_total", **m) > 0


def test_finish_reasons_tool_calls_abort_and_error(server: ServerProcess, client: openai.OpenAI) -> None:
    def count(reason: str, model: str = CHAT) -> float:
        return value(server, "pendra_requests_total", model_name=model, endpoint="chat", finish_reason=reason)

    tools, aborts, errors = count("tool_calls"), count("abort", TINY), count("error", TINY)
    reply = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=60,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    assert count("tool_calls") == tools + 1

    # A client that leaves mid-stream: the request is an abort, and the tokens made are counted.
    generated = value(server, "pendra_generation_tokens_total", model_name=TINY)
    body = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500}
    body["stream"] = True
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        for i, _line in enumerate(r.iter_lines()):
            if i > 10:
                break
    deadline = time.monotonic() + 30
    while count("abort", TINY) == aborts:
        assert time.monotonic() < deadline, "the abandoned stream was never counted"
        time.sleep(0.1)
    assert count("abort", TINY) == aborts + 1
    made = value(server, "pendra_generation_tokens_total", model_name=TINY) - generated
    assert 5 <= made < 1500

    # A prompt too long for the context is the client's error: a 400, not a request the model ran.
    before = samples(server)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=TINY, messages=[{"role": "user", "content": "word " * 3000}], max_tokens=4
        )
    assert count("error", TINY) == errors
    assert {k: v for k, v in samples(server).items() if k[0] == "pendra_requests_total"} == {
        k: v for k, v in before.items() if k[0] == "pendra_requests_total"
    }

    # A client that gives up on a non-streamed answer: an abort too.
    aborts = count("abort")
    body = {"model": CHAT, "messages": [{"role": "user", "content": "go"}], "max_tokens": 300}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/chat/completions", json={**body, "logit_bias": NO_END}, timeout=1.5)
    deadline = time.monotonic() + 30
    while count("abort") == aborts:
        assert time.monotonic() < deadline, "the abandoned request was never counted"
        time.sleep(0.1)
    assert count("abort") == aborts + 1


def test_embeddings_and_model_lifecycle(server: ServerProcess, client: openai.OpenAI) -> None:
    m = {"model_name": GEMMA_EMBED}
    before = value(server, "pendra_prompt_tokens_total", **m, endpoint="embeddings")
    result = client.embeddings.create(model=GEMMA_EMBED, input=["one line", "another line"])
    assert result.usage.prompt_tokens > 0
    after = value(server, "pendra_prompt_tokens_total", **m, endpoint="embeddings")
    assert after - before == result.usage.prompt_tokens
    assert value(server, "pendra_requests_total", **m, endpoint="embeddings", finish_reason="stop") >= 1
    assert value(server, "pendra_e2e_request_latency_seconds_count", **m) >= 1

    # Loaded: counted once, its load timed, its memory shown (more than the file: the KV cache too).
    assert value(server, "pendra_model_loads_total", **m, outcome="ok") == 1
    assert value(server, "pendra_model_load_seconds_count", **m) == 1
    memory = value(server, "pendra_model_memory_bytes", **m, purpose="embedding")
    assert memory > 200_000_000
    loaded = value(server, "pendra_loaded_models")
    assert loaded >= 1

    # keep_alive 0: unloaded after the request, as idle, and gone from the gauges.
    httpx.post(
        f"{server.base_url}/v1/embeddings",
        json={"model": GEMMA_EMBED, "input": "bye", "keep_alive": 0},
        timeout=60,
    ).raise_for_status()
    assert value(server, "pendra_model_unloads_total", **m, reason="idle") == 1
    assert value(server, "pendra_model_memory_bytes", **m, purpose="embedding") == 0
    assert value(server, "pendra_loaded_models") == loaded - 1


def test_scheduler_gauges_follow_a_running_request(server: ServerProcess) -> None:
    body = {
        "model": CHAT,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 300,
        "logit_bias": NO_END,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        events = (line for line in r.iter_lines() if line.startswith("data: "))
        for _ in range(5):  # the role, then tokens
            next(events)
        now = samples(server)  # one scrape: the cells fill as tokens come
        label = frozenset({("model_name", CHAT)})
        assert now[("pendra_requests_running", label)] == 1
        used, cells = now[("pendra_kv_cache_cells_used", label)], now[("pendra_kv_cache_cells", label)]
        assert 0 < used <= cells
        assert now[("pendra_kv_cache_usage_ratio", label)] == pytest.approx(used / cells)
