"""A thinking model through the adapters over `/v1/chat/completions`: Ollama's `/api/chat`,
`/api/generate` and `/api/show` with Ollama's own Python client, and `/v1/responses` with the
`openai` client, against a real `pendra serve` holding a tiny random-weight Qwen3.5 (the real
template and tokenizer: the prompt opens `<think>`, so what the model writes is reasoning until it
writes `</think>`, which random weights seldom do). Each adapter's answer is checked against the
chat answer to the same request: the reasoning lands in `thinking` or a `reasoning` item, not in
the content, and thinking switched off leaves the content alone. Tool-call pieces are gathered
into Ollama's whole calls without a server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest
from pendra_inference.gguf_hybrid import QWEN35_TINY, write_hybrid_gguf
from pendra_inference.gguf_vocab import tokenizer_files
from pendra_inference.ollama import Timing, gather, translate
from pendra_shared.store import ModelStore

from tests.support.hybrids import LLAMA_CPP_DATA, write_qwen35
from tests.support.openai_schemas import validate
from tests.support.server import ServerProcess, start_server

PLAIN = "plain:tiny"  # the same weights under a ChatML template that never thinks
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MODEL = "qwen35:tiny"
ASK = [{"role": "user", "content": "Set the level to three."}]
GREEDY = {"temperature": 0, "num_predict": 16}
SET_LEVEL = {
    "type": "function",
    "name": "set_level",
    "description": "Set the level.",
    "parameters": {"type": "object", "properties": {"level": {"type": "integer"}}, "required": ["level"]},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("thinking")
    store = ModelStore(base / "models")
    store.import_file(write_qwen35(base / "qwen35.gguf"), name=MODEL, purpose="chat")
    vocab, _ = tokenizer_files("qwen35", LLAMA_CPP_DATA)
    plain = write_hybrid_gguf(base / "plain.gguf", "qwen35", QWEN35_TINY, vocab=vocab, chat_template=CHATML)
    store.import_file(plain, name=PLAIN, purpose="chat")
    env = {
        "PENDRA_MODELS_DIR": str(base / "models"),
        "PENDRA_N_CTX": "1024",
        "PENDRA_PARALLEL": "2",
        "PENDRA_KEEP_ALIVE": "-1",
        "HOME": str(base),
    }
    proc = start_server(env, base / "serve.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def chat(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="-", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[ollama.Client]:
    opened = ollama.Client(host=server.base_url, timeout=120)
    yield opened
    opened.close()


def reference(chat: openai.OpenAI, thinking: bool) -> tuple[str, str, int]:
    """The chat answer's reasoning, content and reasoning tokens for the same greedy request."""
    answer = chat.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=16,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": thinking}},
    )
    message = answer.choices[0].message.model_dump()
    details = answer.usage.completion_tokens_details if answer.usage else None
    tokens = (details.reasoning_tokens or 0) if details else 0
    return message.get("reasoning_content") or "", message["content"] or "", tokens


def test_ollama_thinking_on_and_off(client: ollama.Client, chat: openai.OpenAI) -> None:
    reasoning, content, _ = reference(chat, thinking=True)
    assert reasoning  # the prompt opened <think>: the model's words are reasoning
    whole = client.chat(MODEL, messages=ASK, think=True, options=GREEDY)
    assert (whole.message.thinking, whole.message.content) == (reasoning, content)
    assert whole.done and whole.eval_count == 16

    parts = list(client.chat(MODEL, messages=ASK, think=True, options=GREEDY, stream=True))
    assert sum(bool(p.message.thinking) for p in parts) >= 2 and parts[-1].done
    assert "".join(p.message.thinking or "" for p in parts) == reasoning
    assert "".join(p.message.content or "" for p in parts) == content

    assert client.chat(MODEL, messages=ASK, think="high", options=GREEDY).message.thinking

    _, plain, _ = reference(chat, thinking=False)
    off = client.chat(MODEL, messages=ASK, think=False, options=GREEDY)
    assert off.message.thinking is None and off.message.content == plain and plain

    generated = client.generate(MODEL, prompt=ASK[0]["content"], think=True, options=GREEDY)
    assert (generated.thinking, generated.response) == (reasoning, content)
    pieces = list(client.generate(MODEL, prompt=ASK[0]["content"], think=False, options=GREEDY, stream=True))
    assert all(p.thinking is None for p in pieces) and "".join(p.response for p in pieces) == plain


def test_ollama_history_thinking_reaches_the_template(client: ollama.Client) -> None:
    """Qwen3.5's template writes an assistant turn's reasoning when it follows the last user
    message: the prompt grows by it."""
    call = {"function": {"name": "set_level", "arguments": {"level": 3}}}

    def prompt_tokens(thinking: str | None) -> int:
        turn = {"role": "assistant", "content": "", "tool_calls": [call]}
        history = [*ASK, {**turn, **({"thinking": thinking} if thinking else {})}]
        history.append({"role": "tool", "content": "level is 3", "tool_name": "set_level"})
        answer = client.chat(MODEL, messages=history, think=True, options={"num_predict": 1})
        return answer.prompt_eval_count or 0

    assert prompt_tokens("The user wants level three, so I set it.") > prompt_tokens(None) > 0


def test_ollama_refuses_a_think_it_does_not_know(server: ServerProcess) -> None:
    for think in ("maybe", 3, ["high"]):
        body = {"model": MODEL, "messages": ASK, "think": think, "stream": False}
        answer = httpx.post(f"{server.base_url}/api/chat", json=body, timeout=60)
        assert answer.status_code == 400 and "invalid think value" in answer.json()["error"], answer.text
        assert set(answer.json()) == {"error"}


def test_ollama_refuses_to_think_with_a_model_that_cannot(server: ServerProcess) -> None:
    for route, body in (("chat", {"messages": ASK}), ("generate", {"prompt": "Hi"})):
        for think in (True, "low"):
            sent = {"model": PLAIN, "think": think, "stream": False, **body}
            answer = httpx.post(f"{server.base_url}/api/{route}", json=sent, timeout=60)
            assert answer.status_code == 400, answer.text
            assert answer.json() == {"error": f'"{PLAIN}" does not support thinking'}
        answer = httpx.post(f"{server.base_url}/api/{route}", json={**sent, "think": False}, timeout=60)
        assert answer.status_code == 200, answer.text


def test_ollama_show_says_the_model_thinks(client: ollama.Client) -> None:
    assert client.show(MODEL).capabilities == ["completion", "tools", "thinking"]


async def _chunks(*deltas: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    for delta in deltas:
        yield {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    yield {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
    yield {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}}


def _translated(thinking: bool, *deltas: dict[str, Any]) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        return [p async for p in translate(_chunks(*deltas), MODEL, False, thinking, Timing())]

    return asyncio.run(run())


def test_ollama_gathers_call_pieces_into_whole_calls() -> None:
    """The chat stream's call pieces (OpenAI's: id and name first, then the arguments in bits)
    go out as Ollama's whole calls, each once the next one starts or the answer ends."""

    def start(i: int, name: str) -> dict[str, Any]:
        call = {
            "index": i,
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        return {"tool_calls": [call]}

    def more(i: int, text: str) -> dict[str, Any]:
        return {"tool_calls": [{"index": i, "function": {"arguments": text}}]}

    deltas = [
        {"reasoning_content": "Level three, "},
        {"reasoning_content": "then mute."},
        start(0, "set_level"),
        more(0, '{"level": '),
        more(0, "3}"),
        start(1, "mute"),
        more(1, "{}"),
    ]
    pieces = _translated(True, *deltas)
    calls = [p["message"].get("tool_calls") for p in pieces]
    assert calls[2:] == [
        [{"function": {"index": 0, "name": "set_level", "arguments": {"level": 3}}}],
        [{"function": {"index": 1, "name": "mute", "arguments": {}}}],
        None,
    ]  # the first whole once the second starts, the second at the end
    answer = gather(pieces, generate=False)
    assert answer["message"] == {
        "role": "assistant",
        "content": "",
        "thinking": "Level three, then mute.",
        "tool_calls": [c for p in pieces if "tool_calls" in p["message"] for c in p["message"]["tool_calls"]],
    }
    assert answer["done"] and answer["eval_count"] == 9 and answer["prompt_eval_count"] == 5

    quiet = gather(_translated(False, *deltas), generate=False)  # think: false
    assert "thinking" not in quiet["message"] and len(quiet["message"]["tool_calls"]) == 2


def test_a_response_has_a_reasoning_item_first(chat: openai.OpenAI, server: ServerProcess) -> None:
    reasoning, content, tokens = reference(chat, thinking=True)
    body = {"model": MODEL, "input": ASK, "max_output_tokens": 16, "temperature": 0}
    raw = httpx.post(f"{server.base_url}/v1/responses", json=body, timeout=120).json()
    validate(raw, "Response")
    kinds = [item["type"] for item in raw["output"]]
    assert kinds == ["reasoning", "message"]
    assert raw["output"][0]["content"] == [{"type": "reasoning_text", "text": reasoning}]
    assert raw["output"][0]["summary"] == [] and raw["output"][1]["content"][0]["text"] == content
    assert raw["usage"]["output_tokens_details"]["reasoning_tokens"] == tokens > 0

    events = list(chat.responses.create(**body, stream=True))  # type: ignore[call-overload]
    for event in events:
        validate(event.model_dump(mode="json", exclude_unset=True), "ResponseStreamEvent")
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    deltas = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
    done = next(e for e in events if e.type == "response.reasoning_text.done")
    assert len(deltas) >= 2 and "".join(deltas) == done.text == reasoning
    final = events[-1].response
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == reasoning and final.output_text == content
    assert final.usage.output_tokens_details.reasoning_tokens == tokens

    off = chat.responses.create(**body, reasoning={"effort": "none"})  # type: ignore[call-overload]
    assert [item.type for item in off.output] == ["message"] and off.output_text
    assert off.usage.output_tokens_details.reasoning_tokens == 0 and off.reasoning.effort == "none"


def test_a_streamed_function_call_comes_in_pieces(chat: openai.OpenAI) -> None:
    request: dict[str, Any] = {
        "model": MODEL,
        "input": ASK[0]["content"],
        "tools": [SET_LEVEL],
        "tool_choice": "required",
        "reasoning": {"effort": "none"},
        "max_output_tokens": 60,
        "temperature": 0,
    }
    whole = chat.responses.create(**request)
    (call,) = [item for item in whole.output if item.type == "function_call"]
    assert call.name == "set_level" and isinstance(json.loads(call.arguments)["level"], int)

    events = list(chat.responses.create(**request, stream=True))
    for event in events:
        validate(event.model_dump(mode="json", exclude_unset=True), "ResponseStreamEvent")
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [(i.type, i.name, i.arguments) for i in added] == [("function_call", "set_level", "")]
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert "".join(pieces) == done.arguments == call.arguments and done.name == "set_level"
    assert events[-1].type == "response.completed"
    assert [i.type for i in events[-1].response.output] == ["function_call"]

    # The call given back with a reasoning item before it, and its result.
    said = [{"type": "reasoning_text", "text": "Three."}]
    thought = {"type": "reasoning", "id": "rs_1", "summary": [], "content": said}
    given = {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments}
    follow = chat.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": ASK[0]["content"]},
            thought,
            given,
            {"type": "function_call_output", "call_id": call.call_id, "output": "level is 3"},
        ],
        tools=[SET_LEVEL],  # type: ignore[list-item]
        max_output_tokens=4,
    )
    assert follow.status in ("completed", "incomplete")
