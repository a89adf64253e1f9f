"""`POST /v1/responses`, OpenAI's Responses API, without stored state: every request carries the
whole conversation (`previous_response_id` is refused, and nothing is kept, `store: false`).

The input (a string, or items: messages with text parts, `reasoning`, `function_call` and
`function_call_output`) and `instructions` become the chat request Pendra already serves;
`tools` (functions), `tool_choice`, `parallel_tool_calls`, `text.format` (`json_object`,
`json_schema`), `reasoning.effort` (`reasoning_effort`; `xhigh` and `max` are `high`),
`max_output_tokens`, `temperature` and `top_p` carry over. The answer is a `response` object
whose `output` holds a thinking model's `reasoning` item (its text as `reasoning_text` content),
then one assistant `message` with `output_text` (left out when there are only calls), then
`function_call` items. Streamed, it is the Responses event sequence: `response.created`,
`response.in_progress`, then for each item `response.output_item.added`, its content
(`response.content_part.added`, `response.reasoning_text.delta`... and `.done` or
`response.output_text.delta`... and `.done`, `response.content_part.done`; a call's
`response.function_call_arguments.delta`... and `.done`), `response.output_item.done`; then
`response.completed`, or `response.incomplete` when max_output_tokens cut the answer (the item it
cut, the last, is `incomplete` too: a cut call stays a call). An error after the start is an
`error` event.
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
    reasoning: dict[str, Any] | None = None


# OpenAI's `reasoning.effort` as the chat request's `reasoning_effort`: past `high`, the most the
# templates know.
EFFORTS = {
    "none": "none",
    "minimal": "minimal",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
    "max": "high",
}


def _text(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's text, or chat content parts where it holds images (`input_image`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "input_image":
                url = part.get("image_url")
                if not isinstance(url, str):
                    raise InvalidRequest(
                        f"{where}.content[{j}].image_url must be a URL (file_id is not read)", param=where
                    )
                parts.append({"type": "image_url", "image_url": {"url": url}})
                continue
            if kind not in ("input_text", "output_text", "text"):
                raise InvalidRequest(
                    f"{where}.content[{j}]: only text and input_image parts are read", param=where
                )
            text = str(part.get("text", ""))
            if parts and parts[-1]["type"] == "text":
                parts[-1]["text"] += text
            else:
                parts.append({"type": "text", "text": text})
        if all(part["type"] == "text" for part in parts):
            return "".join(part["text"] for part in parts)
        return parts
    raise InvalidRequest(f"{where}.content must be a string or a list of text parts", param=where)


def _reasoning_text(item: dict[str, Any], where: str) -> str:
    """A reasoning item given back: its `reasoning_text` content, else its summary."""
    texts: dict[str, list[str]] = {"content": [], "summary": []}
    for key, kind in (("content", "reasoning_text"), ("summary", "summary_text")):
        parts = item.get(key) or []
        if not isinstance(parts, list):
            raise InvalidRequest(f"{where}.{key} must be a list of {kind} parts", param=where)
        for j, part in enumerate(parts):
            if not isinstance(part, dict) or part.get("type") != kind:
                raise InvalidRequest(f"{where}.{key}[{j}] must be a {kind} part", param=where)
            texts[key].append(str(part.get("text", "")))
    return "".join(texts["content"]) or "\n\n".join(texts["summary"])


def _messages(req: ResponseRequest) -> list[dict[str, Any]]:
    """The chat messages. A reasoning item goes with the assistant turn after it; function calls
    join the assistant message before them (one turn, its text and its parallel calls)."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return [*messages, {"role": "user", "content": req.input}]
    reasoning = ""  # a reasoning item's text, waiting for its turn
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequest(
                    f"{where}.role must be user, assistant, system or developer", param=where
                )
            entry: dict[str, Any] = {"role": role, "content": _text(item.get("content"), where)}
            if role == "assistant" and reasoning:
                entry["reasoning_content"], reasoning = reasoning, ""
            messages.append(entry)
        elif kind == "reasoning":
            reasoning = _reasoning_text(item, where)
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function"}
            call["function"] = {"name": item.get("name"), "arguments": item.get("arguments", "{}")}
            last = messages[-1] if messages else {}
            if last.get("role") == "assistant" and not reasoning:
                last["tool_calls"] = [*(last.get("tool_calls") or []), call]
            else:
                entry = {"role": "assistant", "content": None, "tool_calls": [call]}
                if reasoning:
                    entry["reasoning_content"], reasoning = reasoning, ""
                messages.append(entry)
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else json.dumps(output)
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
        else:
            raise InvalidRequest(f"{where}: input items of type {kind!r} are not supported", param=where)
    if not messages:
        raise InvalidRequest("input is empty", param="input")
    return messages


def _effort(req: ResponseRequest) -> str | None:
    """The request's `reasoning.effort` as OpenAI names it (None: the model's default)."""
    effort = (req.reasoning or {}).get("effort")
    if effort is not None and effort not in EFFORTS:
        raise InvalidRequest(
            "reasoning.effort must be none, minimal, low, medium, high, xhigh or max",
            param="reasoning.effort",
        )
    return effort


def chat_for(req: ResponseRequest) -> ChatCompletionRequest:
    if req.previous_response_id:
        raise InvalidRequest(
            "previous_response_id is not supported: Pendra keeps no responses; send the whole "
            "conversation in input",
            param="previous_response_id",
        )
    fields: dict[str, Any] = {"model": req.model, "messages": _messages(req)}
    for name in ("temperature", "top_p"):  # unset: the model's recommended sampling decides
        if name in req.model_fields_set:
            fields[name] = getattr(req, name)
    if req.max_output_tokens:
        fields["max_tokens"] = req.max_output_tokens
    if req.keep_alive is not None:
        fields["keep_alive"] = req.keep_alive
    effort = _effort(req)
    if effort is not None:
        fields["reasoning_effort"] = EFFORTS[effort]
    tools = []
    for i, tool in enumerate(req.tools):
        if tool.get("type") != "function":
            raise InvalidRequest(f"tools[{i}]: only function tools are supported", param=f"tools[{i}]")
        function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
        tools.append({"type": "function", "function": function})
    if tools:
        fields["tools"] = tools
        fields["parallel_tool_calls"] = req.parallel_tool_calls
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
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


ENVELOPE_NULLABLE = ("error", "incomplete_details", "instructions")
SUMMARIES = ("auto", "concise", "detailed")


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class Assembly:
    """One response's identity and envelope, shared by the whole answer and its events."""

    def __init__(self, req: ResponseRequest) -> None:
        self.req = req
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.reasoning_id = f"rs_{uuid.uuid4().hex}"
        self.created = int(time.time())

    def message(self, text: str, status: str = "completed", item_id: str | None = None) -> dict[str, Any]:
        return {
            "type": "message",
            "id": item_id or self.message_id,
            "status": status,
            "role": "assistant",
            "content": [_output_text(text)],
        }

    def reasoning(self, text: str, status: str = "completed", item_id: str | None = None) -> dict[str, Any]:
        return {
            "type": "reasoning",
            "id": item_id or self.reasoning_id,
            "summary": [],
            "content": [{"type": "reasoning_text", "text": text}],
            "status": status,
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

    def output(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """A chat message's output items: reasoning, the message (unless there are only calls),
        the calls."""
        out = [self.reasoning(message["reasoning_content"])] if message.get("reasoning_content") else []
        calls = message.get("tool_calls") or []
        if message.get("content") or not calls:
            out.append(self.message(message.get("content") or ""))
        return out + [self.call(call) for call in calls]

    def envelope(
        self, status: str, output: list[dict[str, Any]], usage: Any, finish: str | None
    ) -> dict[str, Any]:
        req = self.req
        incomplete = {"reason": "max_output_tokens"} if finish == "length" else None
        reasoning = None
        if req.reasoning is not None:
            summary = req.reasoning.get("summary")
            reasoning = {"effort": _effort(req), "summary": summary if summary in SUMMARIES else None}
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
            "reasoning": reasoning,
            "store": False,
            "temperature": req.temperature,
            "text": req.text or {"format": {"type": "text"}},
            "tool_choice": req.tool_choice,
            "tools": [{"parameters": None, "strict": None, **tool} for tool in req.tools],  # as OpenAI's echo
            "top_p": req.top_p,
            "truncation": "disabled",
            "usage": _usage(usage) if usage is not None else None,
            "user": req.user,
        }
        # Optional fields without a value are left out (OpenAI types them as strings, not null).
        return {k: v for k, v in body.items() if v is not None or k in ENVELOPE_NULLABLE}


class Items:
    """A streamed response's output items, opened and closed as the chat's deltas arrive. One item
    is open at a time (the reasoning, the message, a function call); a delta of another kind, or
    of another call, closes it. Each method gives the events to send."""

    def __init__(self, assembly: Assembly, event: Callable[..., str]) -> None:
        self.assembly = assembly
        self.event = event
        self.output: list[dict[str, Any]] = []  # the items closed
        self.kind: str | None = None  # the open item's: reasoning, message or call
        self.item_id = ""
        self.text: list[str] = []
        self.call: dict[str, Any] = {}
        self.call_index: int | None = None

    def _ids(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": len(self.output), "content_index": 0}

    def text_delta(self, kind: str, piece: str) -> list[str]:
        """A piece of the reasoning (`kind` reasoning) or of the answer's text (message)."""
        out = [] if self.kind == kind else self.close() + self._open_text(kind)
        self.text.append(piece)
        if kind == "reasoning":
            out.append(self.event("response.reasoning_text.delta", **self._ids(), delta=piece))
        else:
            out.append(self.event("response.output_text.delta", **self._ids(), delta=piece, logprobs=[]))
        return out

    def _open_text(self, kind: str) -> list[str]:
        self.kind, self.text = kind, []
        if kind == "reasoning":
            self.item_id = f"rs_{uuid.uuid4().hex}"
            item = self.assembly.reasoning("", "in_progress", self.item_id) | {"content": []}
            part: dict[str, Any] = {"type": "reasoning_text", "text": ""}
        else:
            self.item_id = f"msg_{uuid.uuid4().hex}"
            item = self.assembly.message("", "in_progress", self.item_id) | {"content": []}
            part = _output_text("")
        return [
            self.event("response.output_item.added", output_index=len(self.output), item=item),
            self.event("response.content_part.added", **self._ids(), part=part),
        ]

    def call_piece(self, piece: dict[str, Any]) -> list[str]:
        """A piece of a function call: its start (index, id, name) or more of its arguments."""
        index = piece.get("index", 0)
        function = piece.get("function") or {}
        out: list[str] = []
        if self.kind != "call" or index != self.call_index:
            out += self.close()
            self.kind, self.call_index = "call", index
            start = {"id": piece.get("id"), "function": {"name": function.get("name"), "arguments": ""}}
            self.call = self.assembly.call(start, "in_progress")
            out.append(
                self.event("response.output_item.added", output_index=len(self.output), item=self.call)
            )
        arguments = function.get("arguments") or ""
        if arguments:
            self.call = self.call | {"arguments": self.call["arguments"] + arguments}
            ids = {"item_id": self.call["id"], "output_index": len(self.output)}
            out.append(self.event("response.function_call_arguments.delta", **ids, delta=arguments))
        return out

    def close(self, status: str = "completed") -> list[str]:
        """Close the open item, if any (`incomplete`: max_output_tokens cut it)."""
        kind, self.kind = self.kind, None
        index = len(self.output)
        if kind is None:
            return []
        if kind == "call":
            done = self.call | {"status": status}
            ids = {"item_id": done["id"], "output_index": index}
            out = [
                self.event(
                    "response.function_call_arguments.done",
                    **ids,
                    arguments=done["arguments"],
                    name=done["name"],
                )
            ]
        else:
            whole = "".join(self.text)
            ids = self._ids()
            if kind == "reasoning":
                done = self.assembly.reasoning(whole, status, self.item_id)
                out = [self.event("response.reasoning_text.done", **ids, text=whole)]
            else:
                done = self.assembly.message(whole, status, self.item_id)
                out = [self.event("response.output_text.done", **ids, text=whole, logprobs=[])]
            out.append(self.event("response.content_part.done", **ids, part=done["content"][0]))
        self.output.append(done)
        out.append(self.event("response.output_item.done", output_index=index, item=done))
        return out

    def finish(self, cut: bool) -> list[str]:
        """Close the last item, `incomplete` when max_output_tokens `cut` it; an answer with
        neither text nor calls still has its message."""
        status = "incomplete" if cut else "completed"
        out = self.close(status)
        if not any(item["type"] in ("message", "function_call") for item in self.output):
            out += self._open_text("message") + self.close(status)
        return out


class ResponseService:
    def __init__(self, chat: ChatService) -> None:
        self.chat = chat

    async def create(
        self, req: ResponseRequest, is_disconnected: Callable[[], Awaitable[bool]]
    ) -> dict[str, Any]:
        result = (await self.chat.complete(chat_for(req), is_disconnected)).to_json()
        choice = result["choices"][0]
        assembly = Assembly(req)
        output = assembly.output(choice["message"])
        if choice["finish_reason"] == "length":
            # The item max_output_tokens cut (the last), and the empty message standing for the
            # answer that never came, as the stream closes them.
            empty = output[-1]["type"] == "message" and not output[-1]["content"][0]["text"]
            for item in output[-2:] if empty else output[-1:]:
                item["status"] = "incomplete"
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
            items = Items(assembly, event)
            usage: dict[str, Any] | None = None
            finish: str | None = None
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
                    sent: list[str] = []
                    if delta.get("reasoning_content"):
                        sent += items.text_delta("reasoning", delta["reasoning_content"])
                    if delta.get("content"):
                        sent += items.text_delta("message", delta["content"])
                    for piece in delta.get("tool_calls") or ():
                        sent += items.call_piece(piece)
                    for line in sent:
                        yield line
                    finish = choice.get("finish_reason") or finish
            for line in items.finish(cut=finish == "length"):
                yield line
            final = assembly.envelope("completed", items.output, usage, finish)
            kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
            yield event(kind, response=final)

        return EventStream(translated(), events.end)
