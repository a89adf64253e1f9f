"""`/v1/chat/completions` without the HTTP glue: validate, build the prompt, generate, shape.

Every check that protects llama.cpp happens here, before any llama.cpp call: the prompt must fit
the context with room for `max_tokens`, logit-bias token ids must exist, grammars must compile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import llama_cpp
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar
from pendra_shared.api_errors import APIError, ContextLengthExceeded, InvalidRequest, error_body

from pendra_inference.engine import GenerationParams
from pendra_inference.generation import Finished, generate
from pendra_inference.metrics import InferenceMetrics
from pendra_inference.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ChoiceMessage,
    FinishReason,
    ToolCall,
    ToolCallFunction,
    Usage,
)
from pendra_inference.registry import Loaded, ModelRegistry
from pendra_inference.templates import ChatTemplate, TemplateRenderError, choose_template

logger = logging.getLogger(__name__)

MAX_STOP = 4
# Names the backend, so a client comparing seeds can tell when it changed.
FINGERPRINT = f"fp_pendra_llama_cpp_{llama_cpp.__version__}"
_TOOL_TAG_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass
class Plan:
    prompt: list[int]
    params: GenerationParams
    tools: list[dict[str, Any]] | None


def _text_content(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest(
                f"messages[{index}].content: only text parts are supported by this model "
                f"(got {part.get('type')!r})",
                param=f"messages[{index}].content",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _messages(
    req: ChatCompletionRequest, template: ChatTemplate, tool_prompt: str | None
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(req.messages):
        role = "system" if msg.role == "developer" else msg.role
        content = _text_content(msg.content, i)
        entry: dict[str, Any] = {"role": role, "content": content}
        if template.native:
            if msg.tool_calls:
                entry["tool_calls"] = msg.tool_calls
            if msg.tool_call_id:
                entry["tool_call_id"] = msg.tool_call_id
            if msg.name:
                entry["name"] = msg.name
        elif role == "assistant" and msg.tool_calls:
            calls = [
                {
                    "name": c.get("function", {}).get("name"),
                    "arguments": _loads(c.get("function", {}).get("arguments")),
                }
                for c in msg.tool_calls
            ]
            entry["content"] = (content + "\n" if content else "") + json.dumps(
                calls[0] if len(calls) == 1 else calls
            )
        elif role in ("tool", "function"):
            entry = {
                "role": "user",
                "content": f"Tool result ({msg.name or msg.tool_call_id or 'tool'}): {content}",
            }
        out.append(entry)
    if tool_prompt:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + tool_prompt}
        else:
            out.insert(0, {"role": "system", "content": tool_prompt})
    return out


def _loads(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _tool_grammar(tools: list[dict[str, Any]], choice: Any) -> LlamaGrammar | None:
    """A grammar that makes the output one JSON tool call, for `required` or a named tool."""
    names = [t["function"]["name"] for t in tools]
    if isinstance(choice, dict):
        wanted = choice.get("function", {}).get("name")
        if wanted not in names:
            raise InvalidRequest(f"tool_choice names {wanted!r}, which is not in tools", param="tool_choice")
        names = [wanted]
    elif choice != "required":
        return None
    variants = []
    for tool in tools:
        fn = tool["function"]
        if fn["name"] in names:
            variants.append(
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": fn["name"]},
                        "arguments": fn.get("parameters") or {"type": "object"},
                    },
                    "required": ["name", "arguments"],
                }
            )
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return _schema_grammar(schema, "tools")


def _schema_grammar(schema: Any, param: str) -> LlamaGrammar:
    try:
        return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    except Exception as exc:  # the converter raises many types for unsupported schemas
        raise InvalidRequest(f"{param}: unsupported JSON schema: {exc}", param=param) from None


def _tool_prompt(tools: list[dict[str, Any]]) -> str:
    lines = [
        "You can call these functions. To call one, answer with only a JSON object "
        '{"name": <function name>, "arguments": <object>}.'
    ]
    for tool in tools:
        fn = tool["function"]
        lines.append(
            json.dumps(
                {
                    "name": fn["name"],
                    "description": fn.get("description", ""),
                    "parameters": fn.get("parameters") or {},
                }
            )
        )
    return "\n".join(lines)


def parse_tool_calls(text: str, tools: list[dict[str, Any]]) -> list[ToolCall]:
    """Tool calls in a model's output: <tool_call> blocks (Hermes/Qwen) or a bare JSON object."""
    names = {t["function"]["name"] for t in tools}
    candidates = _TOOL_TAG_RE.findall(text) or [text.strip()]
    calls = []
    for raw in candidates:
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        for item in data if isinstance(data, list) else [data]:
            if not isinstance(item, dict) or item.get("name") not in names:
                continue
            args = item.get("arguments", item.get("parameters", {}))
            calls.append(
                ToolCall(
                    id=f"call_{uuid.uuid4().hex[:24]}",
                    function=ToolCallFunction(
                        name=item["name"], arguments=args if isinstance(args, str) else json.dumps(args)
                    ),
                )
            )
    return calls


def plan(loaded: Loaded, req: ChatCompletionRequest) -> Plan:
    """Everything before generation; runs in a thread (tokenizing and grammars take time)."""
    if req.n != 1:
        raise InvalidRequest("n > 1 is not supported; send separate requests", param="n")
    engine = loaded.engine
    facts = loaded.model.facts
    options = loaded.model.sidecar.options if loaded.model.sidecar else {}
    template = loaded.memo.get("template")
    if template is None:
        template = loaded.memo["template"] = choose_template(
            facts.architecture if facts else "",
            engine.llm.metadata.get("tokenizer.chat_template"),
            options.get("chat_template"),
            loaded.name,
        )
    tools = [t.model_dump() for t in req.tools] if req.tools and req.tool_choice != "none" else None
    grammar: LlamaGrammar | None = None
    if tools:
        grammar = _tool_grammar(tools, req.tool_choice or "auto")
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        if grammar is not None:
            raise InvalidRequest(
                "response_format cannot be combined with a forced tool call", param="response_format"
            )
        if fmt.type == "json_object":
            grammar = LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        else:
            schema = (fmt.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise InvalidRequest(
                    "response_format.json_schema.schema must be a JSON schema object", param="response_format"
                )
            grammar = _schema_grammar(schema, "response_format")
    tool_prompt = _tool_prompt(tools) if tools and not template.supports_tools else None
    messages = _messages(req, template, tool_prompt)
    try:
        text = template.render(messages, bos=engine.bos_text, eos=engine.eos_text, tools=tools)
    except TemplateRenderError as exc:
        raise InvalidRequest(str(exc), param="messages") from None
    prompt = engine.tokenize_prompt(text)
    n_ctx = engine.n_ctx
    if len(prompt) >= n_ctx:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {n_ctx} tokens; the messages use {len(prompt)}",
            param="messages",
        )
    wanted = req.max_completion_tokens or req.max_tokens
    if wanted is None:
        wanted = n_ctx - len(prompt)
    elif len(prompt) + wanted > n_ctx:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {n_ctx} tokens; you asked for "
            f"{len(prompt) + wanted} ({len(prompt)} in the messages, {wanted} for the completion)",
            param="max_tokens",
        )
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise InvalidRequest(f"stop takes at most {MAX_STOP} non-empty strings", param="stop")
    return Plan(
        prompt,
        GenerationParams(
            max_tokens=wanted,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=stops + list(template.stop),
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logit_bias=_logit_bias(req.logit_bias, engine.n_vocab),
            grammar=grammar,
        ),
        tools,
    )


def _logit_bias(bias: dict[str, float] | None, n_vocab: int) -> dict[int, float] | None:
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < n_vocab:
            raise InvalidRequest(
                f"logit_bias: token id {key!r} is not in the vocabulary (0..{n_vocab - 1})",
                param="logit_bias",
            )
        if not -100 <= value <= 100:
            raise InvalidRequest("logit_bias values must be between -100 and 100", param="logit_bias")
        out[int(key)] = float(value)
    return out


def _chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None) -> str:
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body)}\n\n"


class ChatService:
    def __init__(self, registry: ModelRegistry, metrics: InferenceMetrics | None = None) -> None:
        self.registry = registry
        self.metrics = metrics or InferenceMetrics()
        self._background: set[asyncio.Task[None]] = set()

    async def complete(
        self, req: ChatCompletionRequest, is_disconnected: Callable[[], Awaitable[bool]]
    ) -> ChatCompletion:
        async with self.registry.use(req.model, "chat", req.keep_alive) as loaded:
            p = await asyncio.to_thread(plan, loaded, req)
            stop = threading.Event()
            watch = asyncio.create_task(_watch_disconnect(is_disconnected, stop))
            text, finish, used = [], "stop", 0
            try:
                async for item in generate(loaded, p.prompt, p.params, stop):
                    if isinstance(item, Finished):
                        used = item.completion_tokens
                    else:
                        text.append(item.text)
                        finish = item.finish_reason or finish
            finally:
                watch.cancel()
        self.metrics.chat_done(req.model, len(p.prompt), used)
        content: str | None = "".join(text)
        calls = parse_tool_calls(content or "", p.tools) if p.tools else []
        if calls:
            content, finish = None, "tool_calls"
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            model=req.model,
            system_fingerprint=FINGERPRINT,
            choices=[
                Choice(
                    index=0,
                    message=ChoiceMessage(content=content, tool_calls=calls or None),
                    finish_reason=cast(FinishReason, finish),
                )
            ],
            usage=Usage(
                prompt_tokens=len(p.prompt), completion_tokens=used, total_tokens=len(p.prompt) + used
            ),
        )

    async def stream(
        self, req: ChatCompletionRequest, is_disconnected: Callable[[], Awaitable[bool]]
    ) -> AsyncIterator[str]:
        """Check and prepare now (errors raise before any byte is sent), then the SSE stream."""
        stack = contextlib.AsyncExitStack()
        loaded = await stack.enter_async_context(self.registry.use(req.model, "chat", req.keep_alive))
        try:
            p = await asyncio.to_thread(plan, loaded, req)
        except BaseException:
            await stack.aclose()
            raise
        return self._events(req, loaded, p, stack, is_disconnected)

    async def _events(
        self,
        req: ChatCompletionRequest,
        loaded: Loaded,
        p: Plan,
        stack: contextlib.AsyncExitStack,
        is_disconnected: Callable[[], Awaitable[bool]],
    ) -> AsyncIterator[str]:
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stop = threading.Event()
        pieces = generate(loaded, p.prompt, p.params, stop)
        # Servers that do not fail writes to a closed connection still tell us through receive.
        watch = asyncio.create_task(_watch_disconnect(is_disconnected, stop))
        buffered: list[str] = []
        finish, used = "stop", 0
        try:
            yield _chunk(cid, created, req.model, {"role": "assistant", "content": ""}, None)
            async for item in pieces:
                if isinstance(item, Finished):
                    used = item.completion_tokens
                    continue
                finish = item.finish_reason or finish
                if p.tools:
                    buffered.append(item.text)  # a tool call is sent whole, once parsed
                elif item.text:
                    yield _chunk(cid, created, req.model, {"content": item.text}, None)
            if p.tools:
                text = "".join(buffered)
                calls = parse_tool_calls(text, p.tools)
                if calls:
                    finish = "tool_calls"
                    delta: dict[str, Any] = {
                        "tool_calls": [{"index": i, **c.model_dump()} for i, c in enumerate(calls)]
                    }
                else:
                    delta = {"content": text}
                yield _chunk(cid, created, req.model, delta, None)
            yield _chunk(cid, created, req.model, {}, finish)
            self.metrics.chat_done(req.model, len(p.prompt), used)
            if req.stream_options and req.stream_options.include_usage:
                usage = {
                    "prompt_tokens": len(p.prompt),
                    "completion_tokens": used,
                    "total_tokens": len(p.prompt) + used,
                }
                body = {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": req.model,
                    "system_fingerprint": FINGERPRINT,
                    "choices": [],
                    "usage": usage,
                }
                yield f"data: {json.dumps(body)}\n\n"
        except APIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        except Exception as exc:
            logger.exception("generation failed mid-stream")
            yield (
                "data: "
                + json.dumps(error_body(f"generation failed: {exc}", "server_error", None, "internal_error"))
                + "\n\n"
            )
        finally:
            stop.set()
            watch.cancel()
            # Closing the generator waits for the worker thread; never let a cancelled stream
            # release the model while llama.cpp still runs.
            cleanup = asyncio.ensure_future(_close(pieces, stack))
            self._background.add(cleanup)
            cleanup.add_done_callback(self._background.discard)
        yield "data: [DONE]\n\n"


async def _close(pieces: AsyncIterator[Any], stack: contextlib.AsyncExitStack) -> None:
    try:
        await pieces.aclose()  # type: ignore[attr-defined]
    finally:
        await stack.aclose()


async def _watch_disconnect(is_disconnected: Callable[[], Awaitable[bool]], stop: threading.Event) -> None:
    while not stop.is_set():
        if await is_disconnected():
            stop.set()
            return
        await asyncio.sleep(0.25)
