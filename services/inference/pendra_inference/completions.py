"""`POST /v1/completions`, OpenAI's legacy text completions, for the tools that still send them.

A prompt is given to the model as it is (no chat template), on the same engine as chat: each
prompt becomes a chat request carrying it raw, and each answer is turned back into
`text_completion` objects. A list of prompts gives `n` choices per prompt, indexed prompt by
prompt (`index = prompt * n + choice`); streamed, the prompts follow one another. `echo` puts the
prompt before the text; `logprobs: k` gives the generated tokens' log-probabilities with the `k`
likeliest alternatives (prompt tokens have none from this engine, so `echo` with `logprobs` is
refused, as are `suffix` (no fill-in-the-middle) and prompts given as token ids).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pendra_shared.api_errors import APIError, InvalidRequest
from pydantic import Field, StrictInt

from pendra_inference.chat import FINGERPRINT, ChatService, EventStream
from pendra_inference.protocol import (
    MAX_MODEL_NAME,
    ChatCompletionRequest,
    Finite,
    KeepAlive,
    StreamOptions,
    _Request,
)

MAX_PROMPTS = 32


class CompletionRequest(_Request):
    model: str = Field(max_length=MAX_MODEL_NAME)
    prompt: str | list[Any]
    best_of: StrictInt | None = Field(default=None, ge=1, le=128)
    echo: bool = False
    frequency_penalty: Finite = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Any] | None = None
    logprobs: StrictInt | None = Field(default=None, ge=0, le=5)
    max_tokens: StrictInt | None = Field(default=16, ge=1)
    n: StrictInt = Field(default=1, ge=1, le=128)
    presence_penalty: Finite = Field(default=0.0, ge=-2.0, le=2.0)
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: Finite = Field(default=1.0, ge=0.0, le=2.0)
    top_p: Finite = Field(default=1.0, ge=0.0, le=1.0)
    user: str | None = None
    # -- Pendra extensions --
    top_k: StrictInt = Field(default=0, ge=0)
    min_p: Finite = Field(default=0.0, ge=0.0, le=1.0)
    ignore_eos: bool = False
    keep_alive: KeepAlive = None


SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty"}


def prompts_of(req: CompletionRequest) -> list[str]:
    if req.suffix:
        raise InvalidRequest("suffix is not supported: Pendra does not fill in the middle", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise InvalidRequest("best_of is not supported (leave it out, or equal to n)", param="best_of")
    if req.echo and req.logprobs is not None:
        raise InvalidRequest(
            "echo with logprobs is not supported: the engine gives generated tokens' log-probabilities only",
            param="logprobs",
        )
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidRequest(
            "prompt must be a string or a list of strings (token-id prompts are not supported)",
            param="prompt",
        )
    if len(prompts) > MAX_PROMPTS:
        raise InvalidRequest(f"prompt has {len(prompts)} entries; at most {MAX_PROMPTS}", param="prompt")
    return [str(p) for p in prompts]


def chat_for(req: CompletionRequest, prompt: str) -> ChatCompletionRequest:
    fields = req.model_dump(
        include={
            "model",
            "frequency_penalty",
            "logit_bias",
            "max_tokens",
            "n",
            "presence_penalty",
            "seed",
            "stop",
            "temperature",
            "top_p",
            "user",
            "top_k",
            "min_p",
            "ignore_eos",
            "keep_alive",
        },
        exclude_none=True,
    )
    for key in SAMPLING_FIELDS - req.model_fields_set:
        fields.pop(key, None)  # left to the model's recommended sampling, as in chat
    fields["messages"] = [{"role": "user", "content": prompt or " "}]
    if req.logprobs is not None:
        fields.update(logprobs=True, top_logprobs=req.logprobs)
    if req.stream:
        fields.update(stream=True, stream_options={"include_usage": True})
    chat = ChatCompletionRequest.model_validate(fields)
    chat._raw_prompt = prompt
    return chat


def logprobs_of(content: list[dict[str, Any]] | None, offset: int) -> dict[str, Any] | None:
    """Chat's per-token log-probabilities in the legacy shape."""
    if content is None:
        return None
    tokens, values, tops, offsets = [], [], [], []
    for entry in content:
        tokens.append(entry["token"])
        values.append(entry["logprob"])
        tops.append({t["token"]: t["logprob"] for t in entry.get("top_logprobs", [])})
        offsets.append(offset)
        offset += len(entry["token"])
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _usage_sum(usages: list[dict[str, Any]]) -> dict[str, int]:
    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class CompletionService:
    def __init__(self, chat: ChatService) -> None:
        self.chat = chat

    async def complete(
        self, req: CompletionRequest, is_disconnected: Callable[[], Awaitable[bool]]
    ) -> dict[str, Any]:
        prompts = prompts_of(req)
        requests = [chat_for(req, p) for p in prompts]
        try:
            async with asyncio.TaskGroup() as group:  # one prompt refused: the others are stopped
                tasks = [group.create_task(self.chat.complete(r, is_disconnected)) for r in requests]
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None  # the first refusal, as one request's would be
        results = [task.result() for task in tasks]
        choices = []
        for i, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
            for choice in result.to_json()["choices"]:
                head = prompt if req.echo else ""
                text = head + (choice["message"].get("content") or "")
                logprobs = choice.get("logprobs") or {}
                choices.append(
                    {
                        "text": text,
                        "index": i * req.n + choice["index"],
                        "logprobs": logprobs_of(logprobs.get("content"), len(head))
                        if req.logprobs is not None
                        else None,
                        "finish_reason": choice["finish_reason"],
                    }
                )
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
            "usage": _usage_sum([r.usage.model_dump() for r in results]),
        }

    async def stream(
        self, req: CompletionRequest, is_disconnected: Callable[[], Awaitable[bool]]
    ) -> EventStream:
        """The first prompt's stream is opened now (errors before any byte); the others follow it."""
        prompts = prompts_of(req)
        first = await self.chat.stream(chat_for(req, prompts[0]), is_disconnected)
        current: list[EventStream] = [first]
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index: int, text: str, finish: str | None, logprobs: Any = None) -> str:
            body = {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": req.model,
                "system_fingerprint": FINGERPRINT,
                "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}],
            }
            return f"data: {json.dumps(body)}\n\n"

        async def events() -> AsyncIterator[str]:
            usages = []
            for p, prompt in enumerate(prompts):
                if p:
                    try:
                        current[0] = await self.chat.stream(chat_for(req, prompt), is_disconnected)
                    except APIError as exc:  # the stream has started: the error goes inside it
                        yield f"data: {json.dumps(exc.body())}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                if req.echo:
                    for j in range(req.n):
                        yield chunk(p * req.n + j, prompt, None)
                async for body in current[0].chunks():
                    if "error" in body:
                        yield f"data: {json.dumps(body)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    if body.get("usage"):
                        usages.append(body["usage"])
                    for choice in body.get("choices", ()):
                        delta = choice.get("delta", {})
                        text = delta.get("content") or ""
                        lp = choice.get("logprobs") or {}
                        logprobs = (
                            logprobs_of(lp.get("content"), 0) if req.logprobs is not None and lp else None
                        )
                        if text or choice.get("finish_reason") or logprobs:
                            yield chunk(
                                p * req.n + choice["index"], text, choice.get("finish_reason"), logprobs
                            )
            if req.stream_options and req.stream_options.include_usage and usages:
                body = {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": req.model,
                    "choices": [],
                    "usage": _usage_sum(usages),
                }
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"

        return EventStream(events(), lambda: current[0].end())
