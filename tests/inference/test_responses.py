"""`/v1/responses` through the real `openai` client on a real `pendra serve` with Gemma: text,
streamed events, JSON schema output, a forced function call and its result sent back, and the
stateless refusal; bodies and events validated against OpenAI's own schemas."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.inference.conftest import CHAT, TINY
from tests.support.openai_schemas import validate
from tests.support.server import ServerProcess

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def test_a_response_with_text(client: openai.OpenAI, server: ServerProcess) -> None:
    response = client.responses.create(
        model=CHAT, input="Say hello.", instructions="Be brief.", max_output_tokens=8, temperature=0
    )
    assert response.object == "response" and response.output_text
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.usage is not None and response.usage.output_tokens == 8
    raw = httpx.post(
        f"{server.base_url}/v1/responses",
        json={"model": CHAT, "input": [{"role": "user", "content": "Say hello."}], "max_output_tokens": 8},
        timeout=120,
    ).json()
    validate(raw, "Response")
    assert raw["output"][0]["type"] == "message" and raw["output"][0]["content"][0]["type"] == "output_text"


def test_streamed_events_add_up_to_the_response(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model=CHAT, input="Say hello.", max_output_tokens=10, temperature=0, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    done = next(e for e in events if e.type == "response.output_text.done")
    assert len(deltas) >= 2 and "".join(deltas) == done.text == events[-1].response.output_text
    for event in events:
        validate(event.model_dump(mode="json", exclude_unset=True), "ResponseStreamEvent")


def test_json_schema_output(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    response = client.responses.create(
        model=CHAT,
        input="Name a city.",
        max_output_tokens=40,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "city", "schema": schema}},
    )
    assert isinstance(json.loads(response.output_text)["city"], str)


def test_a_function_call_and_its_result(client: openai.OpenAI, server: ServerProcess) -> None:
    response = client.responses.create(
        model=CHAT,
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
    )
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    follow_up = client.responses.create(
        model=CHAT,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"},
        ],
        tools=[WEATHER],
        max_output_tokens=12,
        temperature=0,
    )
    assert follow_up.output_text is not None
    streamed = list(
        client.responses.create(
            model=CHAT, input="Weather in Paris?", tools=[WEATHER], tool_choice="required", stream=True
        )
    )
    # Always one call and no text. At temperature 1 the model may also repeat itself inside the
    # argument until max_output_tokens (the context's end by default): then the response says so,
    # and its call is the one cut.
    (done,) = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    final = streamed[-1].response
    (streamed_call,) = final.output
    assert streamed_call.type == "function_call" and streamed_call.arguments == done.arguments
    if streamed[-1].type == "response.completed":
        assert isinstance(json.loads(done.arguments)["city"], str) and streamed_call.status == "completed"
    else:
        assert streamed[-1].type == "response.incomplete" and streamed_call.status == "incomplete"
        assert final.incomplete_details is not None and final.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_cut_by_max_output_tokens_stays_a_call(client: openai.OpenAI, stream: bool) -> None:
    """A forced call that max_output_tokens cuts is an `incomplete` function_call with the arguments
    it got, in an incomplete response, never half a call as text. tiny:q8 writes the call byte by
    byte: 45 tokens end inside its arguments (the shortest call has 49 bytes)."""
    request = {
        "model": TINY,
        "input": "Weather in Paris?",
        "tools": [WEATHER],
        "tool_choice": "required",
        "max_output_tokens": 45,
    }
    if stream:
        events = list(client.responses.create(**request, stream=True))
        for event in events:
            validate(event.model_dump(mode="json", exclude_unset=True), "ResponseStreamEvent")
        kinds = [e.type for e in events]
        assert kinds[-1] == "response.incomplete" and "response.output_text.delta" not in kinds
        (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
        response = events[-1].response
        assert done.arguments == response.output[0].arguments
    else:
        response = client.responses.create(**request)
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    (call,) = response.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "incomplete"
    assert '{"city":'.startswith(call.arguments.replace(" ", "")) and call.arguments.startswith("{")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"input": [{"type": "image", "url": "x"}]}, "input[0]"),
        ({"input": [{"type": "reasoning", "id": "rs_1", "summary": [{"type": "x"}]}]}, "input[0]"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ],
)
def test_what_pendra_keeps_no_state_for_is_refused(
    server: ServerProcess, extra: dict[str, object], param: str
) -> None:
    body = {"model": CHAT, "input": "Hi", **extra}
    answer = httpx.post(f"{server.base_url}/v1/responses", json=body, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param
