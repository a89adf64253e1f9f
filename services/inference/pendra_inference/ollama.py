"""Ollama's model-running routes on Pendra's engine: `/api/chat`, `/api/generate`, `/api/embed`,
`/api/embeddings` and `/api/ps`, for the clients that speak Ollama (its Python client, LangChain's
`ChatOllama`, Open WebUI, Continue).

Each request becomes the OpenAI request Pendra already serves (the same scheduler, limits,
metrics and errors), and each answer is turned back into Ollama's shape: one JSON object per line
(`application/x-ndjson`) when streaming, which is Ollama's default, or one object. Mapping:
`options.num_predict` is `max_tokens` (-1 or -2: as much as the context allows), `temperature`,
`top_p`, `top_k`, `min_p`, `seed`, `stop`, `presence_penalty` and `frequency_penalty` carry over;
`num_ctx` is accepted and ignored (a model's context is set when it is loaded:
PENDRA_N_CTX or its sidecar), as are options Pendra has no use for, as Ollama ignores unknown
ones. `format` is `"json"` or a JSON schema (a grammar, as on `/v1`). `raw: true` sends the
prompt as it is, without the chat template. Errors are Ollama's `{"error": "..."}`.

Thinking, as Ollama's API has it: `think: true` asks the template to think, `false` not to
(`chat_template_kwargs.enable_thinking`), `"low"`, `"medium"` or `"high"` to think that hard
(`reasoning_effort`); left out, the model does as its template does. The reasoning comes back as
`message.thinking` (`thinking` on `/api/generate`), in the stream's pieces and in the gathered
answer; with `think: false` nothing goes there (what a model writes as reasoning all the same is
left out). An assistant message's `thinking` in the history is given back to the template as its
reasoning. Tool calls, which the chat stream sends in pieces, go out whole as Ollama sends them
(arguments an object), each once the next call starts or the answer ends.

The store's routes (`/api/tags`, `/api/show`, `/api/pull`, `/api/delete`, `/api/version`) are the
API service's (`pendra_api.ollama`); the gateway passes these on to this service.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pendra_shared.api_errors import APIError, InvalidRequest
from pendra_shared.ollama import NDJSON, error_body, parse_body, running
from pydantic import ValidationError
from starlette.background import BackgroundTask

from pendra_inference.protocol import ChatCompletionRequest, EmbeddingRequest
from pendra_inference.state import AppState

router = APIRouter(prefix="/api", include_in_schema=False)
Handler = Callable[[Request], Awaitable[Response]]

# Ollama's `think` strings: how hard to think (the chat request's `reasoning_effort`).
THINK_LEVELS = ("low", "medium", "high")
# Ollama's options that map onto the OpenAI request's fields of the same meaning.
OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


class OllamaError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def answer_errors(handler: Handler) -> Handler:
    """Errors in Ollama's shape: Pendra's own (with their status) and malformed requests (400)."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except OllamaError as exc:
            return JSONResponse(error_body(exc.message), status_code=exc.status)
        except APIError as exc:
            headers = {"Retry-After": "5"} if exc.status == 503 else None
            return JSONResponse(error_body(exc.message), status_code=exc.status, headers=headers)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            return JSONResponse(
                error_body(f"{where}: {first['msg']}" if where else first["msg"]), status_code=400
            )

    return wrapped


async def _body(request: Request) -> dict[str, Any]:
    try:
        body, name = parse_body(await request.body())
    except ValueError as exc:
        raise OllamaError(400, str(exc)) from None
    body["model"] = name
    return body


def streams(body: dict[str, Any]) -> bool:
    return body.get("stream", True) is not False  # Ollama streams unless told not to


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _common(body: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI request's fields from Ollama's `stream`, `options`, `format` and `keep_alive`
    (a stream asks for usage too: the last line carries the token counts)."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise OllamaError(400, "options must be an object")
    out: dict[str, Any] = {ours: options[theirs] for theirs, ours in OPTIONS.items() if theirs in options}
    out.update(stream=True, stream_options={"include_usage": True})  # see _run
    predict = options.get("num_predict")
    if isinstance(predict, int) and not isinstance(predict, bool) and predict > 0:
        out["max_tokens"] = predict
    elif predict is not None and predict not in (-1, -2):
        raise OllamaError(400, "options.num_predict must be a positive integer, -1 or -2")
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise OllamaError(400, 'format must be "json" or a JSON schema object')
    if "keep_alive" in body:
        out["keep_alive"] = body["keep_alive"]
    out.update(_think(body.get("think")))
    return out


def _think(think: Any) -> dict[str, Any]:
    """Ollama's `think` as the chat request's fields (None: the model's own default)."""
    if think is None:
        return {}
    if isinstance(think, bool):
        return {"chat_template_kwargs": {"enable_thinking": think}}
    if isinstance(think, str) and think in THINK_LEVELS:
        return {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": think}
    shown = json.dumps(think) if isinstance(think, str) else "a " + type(think).__name__
    raise OllamaError(400, f'invalid think value: {shown} (must be "high", "medium", "low", true, or false)')


def thinks(body: dict[str, Any]) -> bool:
    """Whether reasoning goes into the answer's `thinking`: not with `think: false`."""
    return body.get("think") is not False


def _tool_calls_in(calls: Any) -> list[dict[str, Any]]:
    """Ollama's `tool_calls` (arguments an object) as OpenAI's (arguments a JSON string)."""
    if not isinstance(calls, list):
        raise OllamaError(400, "tool_calls must be a list")
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise OllamaError(400, f"tool_calls[{i}].function must be an object")
        arguments = function.get("arguments", {})
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        out.append({"id": f"call_{i}", "type": "function", "function": {**function, "arguments": text}})
    return out


class Calls:
    """One answer's tool calls, gathered from the chat stream's pieces (the first piece of a call
    has its index, id and name; later ones more of its arguments) into whole calls in Ollama's
    shape, each given out once it is complete: when a later call starts, or at the end."""

    def __init__(self) -> None:
        self.open: dict[int, dict[str, str]] = {}
        self.count = 0  # calls given out

    def feed(self, pieces: list[dict[str, Any]]) -> list[dict[str, Any]]:
        done: list[dict[str, Any]] = []
        for position, piece in enumerate(pieces):
            index = piece.get("index", position)
            function = piece.get("function") or {}
            if index not in self.open:
                done += self.flush()  # a new call: the ones before it are whole
                self.open[index] = {"name": "", "arguments": ""}
            call = self.open[index]
            call["name"] = call["name"] or function.get("name") or ""
            call["arguments"] += function.get("arguments") or ""
        return done

    def flush(self) -> list[dict[str, Any]]:
        out = []
        for call in self.open.values():
            out.append({"function": {"index": self.count, "name": call["name"], **_arguments(call)}})
            self.count += 1
        self.open.clear()
        return out


def _arguments(call: dict[str, str]) -> dict[str, Any]:
    """Ollama's arguments are an object (the JSON text as it is, should it not parse)."""
    try:
        return {"arguments": json.loads(call["arguments"] or "{}")}
    except ValueError:
        return {"arguments": call["arguments"]}


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise OllamaError(400, "messages must be a list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise OllamaError(400, f"messages[{i}] must be an object")
        entry: dict[str, Any] = {"role": message.get("role"), "content": message.get("content", "")}
        if message.get("images"):
            entry["content"] = _with_images(message["images"], entry["content"], f"messages[{i}].images")
        thinking = message.get("thinking")
        if thinking:
            if not isinstance(thinking, str):
                raise OllamaError(400, f"messages[{i}].thinking must be a string")
            entry["reasoning_content"] = thinking
        if message.get("tool_calls"):
            entry["tool_calls"] = _tool_calls_in(message["tool_calls"])
        if message.get("tool_name"):
            entry["name"] = message["tool_name"]
        out.append(entry)
    return out


def _with_images(images: Any, content: Any, where: str) -> list[dict[str, Any]]:
    """Ollama's `images` (base64, no data: prefix) as image parts before the text, where Ollama
    puts them."""
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise OllamaError(400, f"{where} must be a list of base64 strings")
    if not isinstance(content, str):
        raise OllamaError(400, f"{where.rsplit('.', 1)[0]}.content must be a string")
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": f"data:image/ollama;base64,{image}"}} for image in images
    ]
    if content:
        parts.append({"type": "text", "text": content})
    return parts


def chat_request(body: dict[str, Any]) -> ChatCompletionRequest:
    fields: dict[str, Any] = {
        "model": body["model"],
        "messages": _messages(body.get("messages", [])),
        **_common(body),
    }
    if body.get("tools"):
        fields["tools"] = body["tools"]
    return ChatCompletionRequest.model_validate(fields)


def generate_request(body: dict[str, Any]) -> ChatCompletionRequest:
    for unsupported in ("suffix", "template"):
        if body.get(unsupported):
            raise OllamaError(400, f"{unsupported} is not supported by Pendra's /api/generate")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise OllamaError(400, "prompt must be a string")
    messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    if body.get("images"):
        if body.get("raw"):
            raise OllamaError(400, "images need the model's template: raw prompts take none")
        messages[0]["content"] = _with_images(body["images"], prompt, "images")
    if isinstance(body.get("system"), str) and body["system"]:
        messages.insert(0, {"role": "system", "content": body["system"]})
    req = ChatCompletionRequest.model_validate(
        {"model": body["model"], "messages": messages, **_common(body)}
    )
    if body.get("raw"):
        req._raw_prompt = prompt
    return req


class Timing:
    """Ollama's durations (nanoseconds) for one answer."""

    def __init__(self) -> None:
        self.started = time.perf_counter_ns()
        self.first: int | None = None

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter_ns()

    def final(self, usage: dict[str, Any] | None, reason: str | None) -> dict[str, Any]:
        now = time.perf_counter_ns()
        first = self.first or now
        return {
            "done": True,
            "done_reason": "length" if reason == "length" else "stop",
            "total_duration": now - self.started,
            "load_duration": 0,
            "prompt_eval_count": (usage or {}).get("prompt_tokens", 0),
            "prompt_eval_duration": first - self.started,
            "eval_count": (usage or {}).get("completion_tokens", 0),
            "eval_duration": now - first,
        }


def _piece(
    model: str, generate: bool, text: str = "", thinking: str = "", calls: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """One streamed piece (Ollama leaves `thinking` and `tool_calls` out when there are none)."""
    head: dict[str, Any] = {"model": model, "created_at": _now()}
    if generate:
        return {**head, "response": text, **({"thinking": thinking} if thinking else {}), "done": False}
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if thinking:
        message["thinking"] = thinking
    if calls:
        message["tool_calls"] = calls
    return {**head, "message": message, "done": False}


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode() + b"\n"


async def translate(
    chunks: AsyncIterator[dict[str, Any]], model: str, generate: bool, thinking: bool, timing: Timing
) -> AsyncIterator[dict[str, Any]]:
    """The chat stream's chunks as Ollama's pieces, the last one `done` with the counts and
    durations (or an error). `thinking` False: reasoning is left out."""
    usage: dict[str, Any] | None = None
    reason: str | None = None
    calls = Calls()
    async for chunk in chunks:
        if "error" in chunk:
            yield error_body(chunk["error"].get("message", "generation failed"))
            return
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices", ()):
            delta = choice.get("delta", {})
            text, thought = delta.get("content") or "", delta.get("reasoning_content") or ""
            pieces = delta.get("tool_calls") or []
            if text or thought or pieces:
                timing.token()
            whole = calls.feed(pieces)
            if choice.get("finish_reason"):
                reason = choice["finish_reason"]
                whole += calls.flush()
            thought = thought if thinking else ""
            if text or thought or (whole and not generate):
                yield _piece(model, generate, text, thought, whole)
    if (left := calls.flush()) and not generate:
        yield _piece(model, generate, calls=left)
    final = _piece(model, generate)
    final.update(timing.final(usage, reason))
    if generate:
        final["context"] = []
    yield final


def gather(pieces: list[dict[str, Any]], generate: bool) -> dict[str, Any]:
    """A stream's pieces as the one answer of `stream: false`: the last piece, with the text,
    thinking and calls of all of them."""
    final = dict(pieces[-1])
    parts = [p if generate else p["message"] for p in pieces[:-1]]
    text = "".join(p["response" if generate else "content"] for p in parts)
    thinking = "".join(p.get("thinking", "") for p in parts)
    calls = [c for p in parts for c in p.get("tool_calls", [])]
    if generate:
        final["response"] = text
        if thinking:
            final["thinking"] = thinking
    else:
        final["message"] = {"role": "assistant", "content": text}
        if thinking:
            final["message"]["thinking"] = thinking
        if calls:
            final["message"]["tool_calls"] = calls
    return final


async def _run(
    request: Request, req: ChatCompletionRequest, generate: bool, stream: bool, thinking: bool
) -> Response:
    """Always generated as a stream (the first token's time is what Ollama's durations need);
    sent as NDJSON lines, or gathered into one answer for `stream: false`."""
    events = await _state(request).chat.stream(req, request.is_disconnected)
    pieces = translate(events.chunks(), req.model, generate, thinking, Timing())

    if stream:

        async def lines() -> AsyncIterator[bytes]:
            async for piece in pieces:
                yield _line(piece)

        return StreamingResponse(lines(), media_type=NDJSON, background=BackgroundTask(events.close))
    try:
        gathered = [piece async for piece in pieces]
    finally:
        await events.close()
    if "error" in gathered[-1]:
        return JSONResponse(gathered[-1], status_code=500)
    return JSONResponse(gather(gathered, generate))


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.pendra
    return state


async def _load_only(request: Request, body: dict[str, Any], generate: bool) -> Response:
    """An empty prompt (or no messages) loads the model, or with keep_alive 0 unloads it: how
    Ollama's clients preload and free models."""
    registry = _state(request).registry
    model = await registry.find(body["model"])
    keep_alive = body.get("keep_alive")
    unloading = keep_alive in (0, "0", "0s", "0m", "0h")
    if not (unloading and not registry.is_loaded(model.name)):  # stopping one not loaded: nothing to do
        async with registry.use(model.name, model.purpose or "chat", keep_alive):
            pass
    head: dict[str, Any] = {"model": model.name, "created_at": _now()}
    head.update({"response": ""} if generate else {"message": {"role": "assistant", "content": ""}})
    return JSONResponse({**head, "done": True, "done_reason": "unload" if unloading else "load"})


@router.post("/chat")
@answer_errors
async def chat(request: Request) -> Response:
    body = await _body(request)
    if not body.get("messages"):
        return await _load_only(request, body, generate=False)
    req = chat_request(body)
    await _can_think(request, body)
    return await _run(request, req, False, streams(body), thinks(body))


async def _can_think(request: Request, body: dict[str, Any]) -> None:
    """Asked to think, a model whose template cannot is a 400, as Ollama answers it."""
    if body.get("think") not in (None, False):
        model = await _state(request).registry.find(body["model"])
        if "thinking" not in model.capabilities:
            raise OllamaError(400, f'"{body["model"]}" does not support thinking')


@router.post("/generate")
@answer_errors
async def generate(request: Request) -> Response:
    body = await _body(request)
    if not body.get("prompt"):
        return await _load_only(request, body, generate=True)
    req = generate_request(body)
    await _can_think(request, body)
    return await _run(request, req, True, streams(body), thinks(body))


async def _embed(request: Request, body: dict[str, Any], inputs: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"model": body["model"], "input": inputs, "truncate": body.get("truncate", True)}
    for key in ("dimensions", "keep_alive"):
        if key in body:
            fields[key] = body[key]
    raw = await _state(request).embeddings.embed(EmbeddingRequest.model_validate(fields))
    return dict(json.loads(raw))


@router.post("/embed")
@answer_errors
async def embed(request: Request) -> Response:
    body = await _body(request)
    started = time.perf_counter_ns()
    inputs = body.get("input")
    if not isinstance(inputs, str | list) or inputs == []:
        raise InvalidRequest("input must be a string or a list of strings", param="input")
    result = await _embed(request, body, inputs)
    return JSONResponse(
        {
            "model": body["model"],
            "embeddings": [item["embedding"] for item in sorted(result["data"], key=lambda d: d["index"])],
            "total_duration": time.perf_counter_ns() - started,
            "load_duration": 0,
            "prompt_eval_count": result["usage"]["prompt_tokens"],
        }
    )


@router.post("/embeddings")
@answer_errors
async def embeddings(request: Request) -> Response:
    """The older, single-input form: `prompt` in, `embedding` out."""
    body = await _body(request)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise InvalidRequest("prompt must be a non-empty string", param="prompt")
    result = await _embed(request, body, prompt)
    return JSONResponse({"embedding": result["data"][0]["embedding"]})


@router.get("/ps")
async def ps(request: Request) -> dict[str, Any]:
    registry = _state(request).registry
    now = datetime.now(UTC)
    models = []
    for loaded in registry.loaded_models():
        if loaded.in_flight or loaded.keep_alive_s is None:
            expires = now + timedelta(days=3650)  # busy, or kept for ever
        else:
            idle = time.monotonic() - loaded.last_used
            expires = now + timedelta(seconds=max(0.0, loaded.keep_alive_s - idle))
        on_gpu = registry.gpu and loaded.engine.config.n_gpu_layers != 0
        models.append(running(loaded.model, loaded.memory_bytes, expires, on_gpu, loaded.engine.n_ctx))
    return {"models": models}
