"""`POST /v1/responses`, OpenAI's Responses API, without stored state: every request carries the
whole conversation (`previous_response_id` is refused, and nothing is kept, `store: false`).

The input (a string, or items: messages with text parts, `function_call` and
`function_call_output`) and `instructions` become the chat request Pendra already serves;
`tools` (functions), `tool_choice`, `text.format` (`json_object`, `json_schema`),
`max_output_tokens`, `temperature` and `top_p` carry over. The answer is a `response` object
whose `output` holds one assistant `message` with `output_text`, or `function_call` items.
Streamed, it is the Responses event sequence: `response.created`, `response.in_progress`,
`response.output_item.added`, `response.content_part.added`, `response.output_text.delta`...,
`response.output_text.done`, `response.content_part.done`, `response.output_item.done`,
`response.completed` (function calls: `response.function_call_arguments.delta` and `.done`);
an error after the start is an `error` event.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pendra_shared.api_errors import InvalidRequest
from pydantic import Field, StrictInt

from pendra_inference.chat import ChatService, EventStream
from pendra_inference.protocol import MAX_MODEL_NAME, ChatCompletionRequest, Finite, KeepAlive, _Request


class ResponseRequest(_Request):
    model: str = Field(max_length=MAX_MODEL_NAME)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: StrictInt | None = Field(default=None, ge=1)
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    store: bool | None = None
    stream: bool = False
    temperature: Finite = Field(default=1.0, ge=0.0, le=2.0)
    text: dict[str, Any] | None = None
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_p: Finite = Field(default=1.0, ge=0.0, le=1.0)
    user: str | None = None
    keep_alive: KeepAlive = None


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text", "text"):
                raise InvalidRequest(f"{where}.content[{j}]: only text parts are supported", param=where)
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise InvalidRequest(f"{where}.content must be a string or a list of text parts", param=where)


def _messages(req: ResponseRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return [*messages, {"role": "user", "content": req.input}]
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequest(
                    f"{where}.role must be user, assistant, system or developer", param=where
                )
            messages.append({"role": role, "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function"}
            call["function"] = {"name": item.get("name"), "arguments": item.get("arguments", "{}")}
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else json.dumps(output)
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
        else:
            raise InvalidRequest(f"{where}: input items of type {kind!r} are not supported", param=where)
    if not messages:
        raise InvalidRequest("input is empty", param="input")
    return messages


def chat_for(req: ResponseRequest) -> ChatCompletionRequest:
    if req.previous_response_id:
        raise InvalidRequest(
            "previous_response_id is not supported: Pendra keeps no responses; send the whole "
            "conversation in input",
            param="previous_response_id",
        )
    fields: dict[str, Any] = {
        "model": req.model,
        "messages": _messages(req),
        "temperature": req.temperature,
        "top_p": req.top_p,
    }
    if req.max_output_tokens:
        fields["max_tokens"] = req.max_output_tokens
    if req.keep_alive is not None:
        fields["keep_alive"] = req.keep_alive
    tools = []
    for i, tool in enumerate(req.tools):
        if tool.get("type") != "function":
            raise InvalidRequest(f"tools[{i}]: only function tools are supported", param=f"tools[{i}]")
        function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
        tools.append({"type": "function", "function": function})
    if tools:
        fields["tools"] = tools
        choice = req.tool_choice
        if isinstance(choice, dict):
            fields["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        else:
            fields["tool_choice"] = choice
    fmt = (req.text or {}).get("format") or {"type": "text"}
    if not isinstance(fmt, dict):
        raise InvalidRequest("text.format must be an object with a type", param="text.format")
    if fmt.get("type") == "json_object":
        fields["response_format"] = {"type": "json_object"}
    elif fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}
        fields["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt.get("type") != "text":
        raise InvalidRequest("text.format.type must be text, json_object or json_schema", param="text.format")
    if req.stream:
        fields.update(stream=True, stream_options={"include_usage": True})
    return ChatCompletionRequest.model_validate(fields)


def _usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    usage = usage or {}
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


ENVELOPE_NULLABLE = ("error", "incomplete_details", "instructions")


class Assembly:
    """One response's identity and envelope, shared by the whole answer and its events."""

    def __init__(self, req: ResponseRequest) -> None:
        self.req = req
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())

    def message(self, text: str, status: str = "completed") -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    @staticmethod
    def call(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
        function = call.get("function", {})
        return {
            "type": "function_call",
            "id": f"fc_{call.get('id') or uuid.uuid4().hex}",
            "call_id": call.get("id") or f"call_{uuid.uuid4().hex}",
            "name": function.get("name"),
            "arguments": function.get("arguments", "{}"),
            "status": status,
        }

    def envelope(
        self, status: str, output: list[dict[str, Any]], usage: Any, finish: str | None
    ) -> dict[str, Any]:
        req = self.req
        incomplete = {"reason": "max_output_tokens"} if finish == "length" else None
        body = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": "incomplete" if incomplete and status == "completed" else status,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {},
            "model": req.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": None,
            "store": False,
            "temperature": req.temperature,
            "text": req.text or {"format": {"type": "text"}},
            "tool_choice": req.tool_choice,
            "tools": req.tools,
            "top_p": req.top_p,
            "truncation": "disabled",
            "usage": _usage(usage) if usage is not None else None,
            "user": req.user,
        }
        # Optional fields without a value are left out (OpenAI types them as strings, not null).
        return {k: v for k, v in body.items() if v is not None or k in ENVELOPE_NULLABLE}


class ResponseService:
    def __init__(self, chat: ChatService) -> None:
        self.chat = chat

    async def create(
        self, req: ResponseRequest, is_disconnected: Callable[[], Awaitable[bool]]
    ) -> dict[str, Any]:
        result = (await self.chat.complete(chat_for(req), is_disconnected)).to_json()
        choice = result["choices"][0]
        message = choice["message"]
        assembly = Assembly(req)
        if message.get("tool_calls"):
            output = [assembly.call(call) for call in message["tool_calls"]]
        else:
            output = [assembly.message(message.get("content") or "")]
        return assembly.envelope("completed", output, result["usage"], choice["finish_reason"])

    async def stream(
        self, req: ResponseRequest, is_disconnected: Callable[[], Awaitable[bool]]
    ) -> EventStream:
        events = await self.chat.stream(chat_for(req), is_disconnected)
        assembly = Assembly(req)
        sequence = iter(range(1_000_000_000))

        def event(kind: str, **fields: Any) -> str:
            body = {"type": kind, "sequence_number": next(sequence), **fields}
            return f"event: {kind}\ndata: {json.dumps(body)}\n\n"

        async def translated() -> AsyncIterator[str]:
            started = assembly.envelope("in_progress", [], None, None)
            yield event("response.created", response=started)
            yield event("response.in_progress", response=started)
            text: list[str] = []
            calls: list[dict[str, Any]] = []
            usage: dict[str, Any] | None = None
            finish: str | None = None
            opened = False
            item = {"item_id": assembly.message_id, "output_index": 0, "content_index": 0}
            async for chunk in events.chunks():
                if "error" in chunk:
                    error = chunk["error"]
                    yield event(
                        "error",
                        code=error.get("code"),
                        message=error.get("message"),
                        param=error.get("param"),
                    )
                    return
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", ()):
                    delta = choice.get("delta", {})
                    calls.extend(delta.get("tool_calls") or [])
                    piece = delta.get("content")
                    if piece:
                        if not opened:
                            opened = True
                            added = assembly.message("", "in_progress") | {"content": []}
                            yield event("response.output_item.added", output_index=0, item=added)
                            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                            yield event("response.content_part.added", **item, part=part)
                        text.append(piece)
                        yield event("response.output_text.delta", **item, delta=piece, logprobs=[])
                    finish = choice.get("finish_reason") or finish
            output: list[dict[str, Any]] = []
            if opened or not calls:
                whole = "".join(text)
                if not opened:
                    added = assembly.message("", "in_progress") | {"content": []}
                    yield event("response.output_item.added", output_index=0, item=added)
                    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                    yield event("response.content_part.added", **item, part=part)
                yield event("response.output_text.done", **item, text=whole, logprobs=[])
                done_part = {"type": "output_text", "text": whole, "annotations": [], "logprobs": []}
                yield event("response.content_part.done", **item, part=done_part)
                output.append(assembly.message(whole))
                yield event("response.output_item.done", output_index=0, item=output[-1])
            for call in calls:
                index = len(output)
                done = assembly.call(call)
                yield event(
                    "response.output_item.added",
                    output_index=index,
                    item=done | {"arguments": "", "status": "in_progress"},
                )
                ids = {"item_id": done["id"], "output_index": index}
                yield event("response.function_call_arguments.delta", **ids, delta=done["arguments"])
                yield event(
                    "response.function_call_arguments.done",
                    **ids,
                    arguments=done["arguments"],
                    name=done["name"],
                )
                output.append(done)
                yield event("response.output_item.done", output_index=index, item=done)
            final = assembly.envelope("completed", output, usage, finish)
            kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
            yield event(kind, response=final)

        return EventStream(translated(), events.end)
