"""Ollama's API, driven by Ollama's own Python client (PyPI `ollama`) and LangChain's `ChatOllama`
against a real `pendra serve` with the real Gemma model, installing from a local HTTP catalogue:
version, pull with progress, list, show, chat and generate (streamed and not), JSON output,
embeddings, ps, delete, and errors in Ollama's shape. The compose services answer the same
routes through the gateway."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import ollama
import pytest

from tests.conftest import GEMMA_SHA256
from tests.topology.conftest import Stack

CHAT = "gemma3:270m"
EMBED = "gemma-embed:270m"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[str]:
    """One `pendra serve` for the module (the client tests run in order: pull, use, delete)."""
    import yaml

    from tests.conftest import gemma_entry
    from tests.support.httpserver import FileServer, link_or_copy
    from tests.support.stack import EmbeddedStack

    tmp = tmp_path_factory.mktemp("ollama")
    files = FileServer(tmp / "files")
    files.root.mkdir()
    files.start()
    link_or_copy(gemma_path, files.root / "gemma.gguf")
    catalogue = tmp / "catalogue.yaml"
    entries = [
        gemma_entry(files.url("gemma.gguf"), allow_private=True),
        gemma_entry(files.url("gemma.gguf"), name=EMBED, purpose="embedding", allow_private=True),
    ]
    catalogue.write_text(yaml.safe_dump({"models": entries}))
    files.faults.throttle_s = 0.0003  # long enough to report progress more than once
    (tmp / "pendra").mkdir()
    stack = EmbeddedStack(tmp / "pendra", extra_env={"PENDRA_CATALOGUE": str(catalogue)}).start()
    yield stack.api_url
    stack.stop()
    files.stop()


@pytest.fixture
def client(served: str) -> Iterator[ollama.Client]:
    opened = ollama.Client(host=served, timeout=180)
    yield opened
    opened.close()


def test_version_and_an_empty_list(client: ollama.Client, served: str) -> None:
    version = httpx.get(f"{served}/api/version").json()
    assert version["version"].count(".") == 2 and version["pendra"] == "0.1.0"
    assert client.list().models == []


def test_pull_reports_progress_like_ollama(client: ollama.Client) -> None:
    updates = list(client.pull(CHAT, stream=True))
    statuses = [u.status for u in updates]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert "verifying sha256 digest" in statuses and "writing manifest" in statuses
    pulling = [u for u in updates if (u.status or "").startswith("pulling ") and u.digest]
    assert pulling and all(u.digest == f"sha256:{GEMMA_SHA256}" for u in pulling)
    assert pulling[-1].completed == pulling[-1].total == 253_113_024
    assert len({u.completed for u in pulling}) > 1  # the bytes moved while it ran
    assert client.pull(EMBED, stream=False).status == "success"


def test_list_and_show(client: ollama.Client) -> None:
    listed = {m.model: m for m in client.list().models}
    assert set(listed) == {CHAT, EMBED}
    assert listed[CHAT].digest == GEMMA_SHA256 and listed[CHAT].size == 253_113_024
    assert listed[CHAT].details is not None and listed[CHAT].details.quantization_level == "Q4_K_M"
    shown = client.show(CHAT)
    assert shown.capabilities is not None and "completion" in shown.capabilities
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "gemma3"
    assert client.show(EMBED).capabilities == ["embedding"]


def test_chat_and_generate_streamed_and_not(client: ollama.Client) -> None:
    options = {"temperature": 0, "num_predict": 12, "seed": 7}
    answer = client.chat(CHAT, messages=[{"role": "user", "content": "Say hello."}], options=options)
    assert answer.message.role == "assistant" and answer.message.content
    assert answer.done and answer.done_reason == "length" and answer.eval_count == 12
    assert answer.prompt_eval_count and answer.total_duration and answer.eval_duration

    parts = list(
        client.chat(CHAT, messages=[{"role": "user", "content": "Say hello."}], options=options, stream=True)
    )
    assert sum(not p.done for p in parts) >= 2 and parts[-1].done and parts[-1].eval_count == 12
    streamed = "".join(p.message.content or "" for p in parts)
    assert streamed == answer.message.content  # the same greedy answer, piece by piece

    generated = client.generate(CHAT, prompt="The capital of France is", options=options)
    assert generated.response and generated.done_reason == "length"
    raw = list(
        client.generate(CHAT, prompt="The capital of France is", raw=True, options=options, stream=True)
    )
    assert raw[-1].done and "".join(p.response for p in raw).strip()


def test_json_format_gives_json(client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    answer = client.chat(
        CHAT,
        messages=[{"role": "user", "content": "Name a city as JSON."}],
        format=schema,
        options={"temperature": 0, "num_predict": 40},
    )
    assert isinstance(json.loads(answer.message.content or "")["city"], str)


def test_embeddings_and_ps(client: ollama.Client) -> None:
    vectors = client.embed(EMBED, input=["The cat sat.", "A dog ran."]).embeddings
    assert len(vectors) == 2 and all(len(v) == 640 for v in vectors)
    single = client.embeddings(EMBED, prompt="The cat sat.").embedding
    a, b = np.array(single), np.array(vectors[0])
    assert len(single) == 640 and a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.999  # one vs batched
    running = {m.model: m for m in client.ps().models}
    assert {CHAT, EMBED} <= set(running) and running[CHAT].size and running[CHAT].size > 253_113_024


def test_keep_alive_loads_and_unloads_like_ollama(client: ollama.Client) -> None:
    loaded = client.generate(CHAT, prompt="", keep_alive="10m")
    assert loaded.done and loaded.done_reason == "load"
    unloaded = client.generate(CHAT, prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert CHAT not in {m.model for m in client.ps().models}
    again = client.generate(CHAT, prompt="", keep_alive=0)  # stopping one not loaded loads nothing
    assert again.done_reason == "unload" and CHAT not in {m.model for m in client.ps().models}


def test_tools_are_offered_to_the_model(client: ollama.Client) -> None:
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    answer = client.chat(
        CHAT,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[weather],
        options={"temperature": 0, "num_predict": 40},
    )
    assert answer.done
    for call in answer.message.tool_calls or []:  # a base model may or may not call it
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    # A tool's result goes back as Ollama sends it: role "tool" with the tool's name.
    follow = client.chat(
        CHAT,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
            },
            {"role": "tool", "content": "Sunny, 21 C", "tool_name": "get_weather"},
        ],
        tools=[weather],
        options={"num_predict": 8},
    )
    assert follow.done and follow.eval_count == 8


def test_langchain_chat_ollama(served: str) -> None:
    from langchain_ollama import ChatOllama

    llm = ChatOllama(model=CHAT, base_url=served, temperature=0, num_predict=10)
    assert llm.invoke("Say hello.").content
    pieces = [chunk.content for chunk in llm.stream("Say hello.")]
    assert len([p for p in pieces if p]) >= 2
    llm._client.close()  # LangChain leaves its ollama client open


def test_malformed_bodies_are_400s_in_ollamas_shape(served: str) -> None:
    bad = [
        ("/api/chat", b'{"model": "gemma3:270m", "messages": [{"role": "user", "content": "\\ud800"}]}'),
        ("/api/generate", b'{"model": "gemma3:270m", "prompt": "hi", "options": [1]}'),
        ("/api/generate", b'{"model": "gemma3:270m", "prompt": "hi", "options": {"temperature": NaN}}'),
        ("/api/generate", b'{"model": "gemma3:270m", "prompt": "", "keep_alive": [1]}'),
        (
            "/api/chat",
            b'{"model": "gemma3:270m", "messages": [{"role": "user", "content": "hi"}], "format": 3}',
        ),
        ("/api/embed", b'{"model": "gemma-embed:270m", "input": 5}'),
        ("/api/show", b'{"model": "\\udfff"}'),
        ("/api/chat", b"[" * 200 + b"]" * 200),
    ]
    for path, body in bad:
        answer = httpx.post(f"{served}{path}", content=body, timeout=60)
        assert answer.status_code == 400, (path, body, answer.status_code, answer.text)
        assert set(answer.json()) == {"error"}, answer.text


def test_durations_and_family_names(client: ollama.Client) -> None:
    answer = client.chat(
        "gemma3", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 10}, stream=False
    )
    assert answer.eval_count == 10 and answer.eval_duration and answer.prompt_eval_duration
    speed = answer.eval_count / (answer.eval_duration / 1e9)
    assert 1 < speed < 5000, f"{speed:.0f} tokens/s is not this CPU's decode speed"  # not 90,000
    assert (
        answer.total_duration and answer.total_duration >= answer.eval_duration + answer.prompt_eval_duration
    )
    # An unbounded keep_alive keeps the model for ever, and /api/ps still answers.
    client.generate(CHAT, prompt="", keep_alive="100000000h")
    assert CHAT in {m.model for m in client.ps().models}


def test_errors_are_ollamas_shape(client: ollama.Client, served: str) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat("nope:1b", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404 and "nope:1b" in missing.value.error
    wrong = httpx.post(f"{served}/api/embed", json={"model": CHAT, "input": "x"})
    assert (
        wrong.status_code == 400
        and "error" in wrong.json()
        and "/v1/chat/completions" in wrong.json()["error"]
    )
    broken = httpx.post(f"{served}/api/chat", content=b"{not json")
    assert broken.status_code == 400 and set(broken.json()) == {"error"}
    with pytest.raises(ollama.ResponseError) as unknown:
        client.pull("nosuch:model")
    assert unknown.value.status_code == 404


def test_delete(client: ollama.Client) -> None:
    client.delete(EMBED)
    assert {m.model for m in client.list().models} == {CHAT}
    with pytest.raises(ollama.ResponseError) as gone:
        client.delete(EMBED)
    assert gone.value.status_code == 404


def test_the_compose_gateway_answers_ollamas_routes(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack("compose")
    client = ollama.Client(host=stack.api_url, timeout=180)
    assert client.pull(CHAT, stream=False).status == "success"
    assert [m.model for m in client.list().models] == [CHAT]
    answer = client.chat(CHAT, messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 4})
    assert answer.done and answer.eval_count == 4
    assert [m.model for m in client.ps().models] == [CHAT]
    assert httpx.get(f"{stack.api_url}/").text == "Ollama is running"
    client.close()
