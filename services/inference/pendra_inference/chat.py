"""`/v1/chat/completions` without the HTTP glue: validate, build the prompt, generate, shape.

Every check that protects llama.cpp happens here, before any llama.cpp call: the request's own
limits first (`limits.py`, before a model is even loaded), then the prompt must fit the context
with room for `max_tokens`, logit-bias token ids must exist, grammars must be small and compile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import llama_cpp
from llama_cpp.llama_grammar import JSON_GBNF
from pendra_shared.api_errors import APIError, ContextLengthExceeded, InvalidRequest, error_body

from pendra_inference.formats import Format, Splitter, Turn, for_template
from pendra_inference.formats.base import Thinking, loads
from pendra_inference.formats.grammar import Grammar
from pendra_inference.formats.templates import ChatTemplate, TemplateRenderError, choose_template
from pendra_inference.limits import RequestLimits, check_chat, check_grammar, surely_longer
from pendra_inference.metrics import InferenceMetrics, Outcome, counted
from pendra_inference.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChoiceMessage,
    CompletionTokensDetails,
    FinishReason,
    PromptTokensDetails,
    Tool,
    ToolCall,
    Usage,
)
from pendra_inference.registry import Loaded, ModelRegistry
from pendra_inference.sampling import SamplingParams
from pendra_inference.scheduler import Scheduler
from pendra_inference.sequence import Completion, Delta, Result, Ticket, TokenLogprob, common_prefix
from pendra_inference.vision import ImageLimits, Picture, decode_image, fetch_image, image_url

logger = logging.getLogger(__name__)

# Names the backend, so a client comparing seeds can tell when it changed.
FINGERPRINT = f"fp_pendra_llama_cpp_{llama_cpp.__version__}"
_TOKEN_ID_RE = re.compile(r"[0-9]{1,10}")
# A user message rendered after the system prompt to find where a template that folds the system
# prompt into the first user message ends it (a private-use character no prompt is made of), and
# how many tokens before that end the prompt's own tokens may start to differ (where the system
# prompt's last characters and the user's first merge into one token).
PLACEHOLDER = "\ue000\ue001"
FOLD_SLACK = 2


@dataclass
class Plan:
    completion: Completion
    fmt: Format = field(default_factory=Format)
    turn: Turn = field(default_factory=Turn)
    text: str = ""  # the rendered prompt
    split: bool = True  # reasoning and calls out of the content (False: inline, as generated)

    @property
    def prompt(self) -> list[int]:
        return self.completion.prompt

    @property
    def image_tokens(self) -> int:
        return sum(image.n_tokens for image in self.completion.images)

    def splitter(self) -> Splitter:
        return Splitter(self.fmt, self.turn, self.text, self.split)


def _text_content(content: Any, index: int, marker: str | None = None) -> str:
    """A message's text; each image part becomes llama.cpp's media `marker` (None: the model reads
    no images, and the request's were refused before)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") == "image_url" and marker is not None:
            texts.append(marker)
            continue
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest(
                f"messages[{index}].content: only text and image_url parts are read "
                f"(got {part.get('type')!r})",
                param=f"messages[{index}].content",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def image_parts(req: ChatCompletionRequest, limits: ImageLimits) -> list[tuple[str, str]]:
    """Where each image of the request is, and its URL, in prompt order; at most
    `limits.max_images` of them."""
    parts = []
    for i, msg in enumerate(req.messages):
        if isinstance(msg.content, list):
            for j, part in enumerate(msg.content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    where = f"messages[{i}].content[{j}]"
                    parts.append((where, image_url(part, where)))
    if len(parts) > limits.max_images:
        raise InvalidRequest(
            f"the messages carry {len(parts)} images; at most {limits.max_images} per request "
            "(PENDRA_MAX_IMAGES)",
            param="messages",
            code="too_many_images",
        )
    return parts


def _messages(
    req: ChatCompletionRequest, template: ChatTemplate, tool_prompt: str | None, marker: str | None = None
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(req.messages):
        role = "system" if msg.role == "developer" else msg.role
        content = _text_content(msg.content, i, marker)
        entry: dict[str, Any] = {"role": role, "content": content}
        if template.native:
            if msg.tool_calls:
                entry["tool_calls"] = [_history_call(c) for c in msg.tool_calls]
            if msg.reasoning_content:  # Qwen's and DeepSeek's templates read the first, gpt-oss's the second
                entry["reasoning_content"] = entry["thinking"] = msg.reasoning_content
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


def _history_call(call: dict[str, Any]) -> dict[str, Any]:
    """A call given back in the history, its arguments as an object: the templates iterate them
    (Qwen3.5's `arguments|items`) or write them with `tojson`, which would quote a string."""
    function = dict(call.get("function") or {})
    if "arguments" in function:
        function["arguments"] = _loads(function["arguments"])
    return {**call, "function": function}


def _loads(value: Any) -> Any:
    """A history call's arguments as an object when they parse (bounded as a model's calls are)."""
    if isinstance(value, str):
        try:
            return loads(value)
        except ValueError:
            return value
    return value


def _tool(tool: Tool) -> dict[str, Any]:
    """A tool as the templates read it: a description and parameters always there (gpt-oss's
    template adds `tool.description` to a string), nothing null."""
    fn = tool.function
    return {
        "type": "function",
        "function": {
            "name": fn.name,
            "description": fn.description or "",
            "parameters": {"type": "object", "properties": {}} if fn.parameters is None else fn.parameters,
        },
    }


def _forced_names(tools: list[dict[str, Any]], choice: Any) -> list[str] | None:
    """The tools a forced call may name (`required`, or one named tool), None when not forced."""
    names = [t["function"]["name"] for t in tools]
    if isinstance(choice, dict):
        wanted = choice.get("function", {}).get("name")
        if wanted not in names:
            raise InvalidRequest(f"tool_choice names {wanted!r}, which is not in tools", param="tool_choice")
        return [wanted]
    return names if choice == "required" else None


def _built(build: Callable[[], str], param: str, nested: str = "the JSON schema") -> str:
    """A grammar from a JSON schema (already bounded by `limits.check_schema`): the converter's
    failures as the caller's 400 on `param`, and the result checked before llama.cpp parses it."""
    try:
        grammar = build()
    except RecursionError:
        raise InvalidRequest(f"{param}: {nested} nests too deeply", param=param) from None
    except Exception as exc:  # the converter raises many types for unsupported schemas
        raise InvalidRequest(f"{param}: unsupported JSON schema: {str(exc)[:200]}", param=param) from None
    check_grammar(grammar, param)
    return grammar


def _call_grammar(fmt: Format, turn: Turn, names: list[str], parallel: bool, thinking: Thinking) -> str:
    """GBNF for a forced call in the model family's own syntax."""
    return _built(lambda: fmt.call_grammar(turn, names, parallel, thinking), "tools", "a parameters schema")


def _content_grammar(fmt: Format, schema: Any, thinking: Thinking) -> str:
    """GBNF for an answer of `schema` after a thinking model's reasoning."""
    g = Grammar()
    return _built(lambda: g.build(fmt.content_rule(g, g.json(schema, "answer"), thinking)), "response_format")


def _schema_grammar(schema: Any, param: str) -> str:
    """GBNF for a JSON schema (through `Grammar`, whose strings are strict JSON)."""
    g = Grammar()
    return _built(lambda: g.build(g.json(schema, "answer")), param)


def _check_grammar(loaded: Loaded, grammar: str, param: str) -> None:
    """Compile once here, so a grammar llama.cpp refuses is the caller's 400, not a failed step."""
    sampler = llama_cpp.llama_sampler_init_grammar(loaded.engine.vocab, grammar.encode(), b"root")
    if not sampler:
        raise InvalidRequest(f"{param}: llama.cpp could not compile the grammar for it", param=param)
    llama_cpp.llama_sampler_free(sampler)


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


def plan(
    loaded: Loaded,
    req: ChatCompletionRequest,
    limits: RequestLimits | None = None,
    reasoning_format: str = "auto",
    pictures: list[Picture] | None = None,
) -> Plan:
    """Everything before generation; runs in a thread (tokenizing and grammars take time).
    `check_chat` has passed. `reasoning_format` is the server's default (none: reasoning inline).
    `pictures`: the request's images, decoded, in order (the model's projector reads them)."""
    limits = limits or RequestLimits()
    engine = loaded.engine
    scheduler = cast(Scheduler, loaded.runner)
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
    fmt = loaded.memo.get("format")
    if fmt is None:
        fmt = loaded.memo["format"] = for_template(
            template.source, options.get("chat_format"), template.native
        )
    tools = [_tool(t) for t in req.tools] if req.tools and req.tool_choice != "none" else None
    turn = _turn(req, tools)
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    raw = req._raw_prompt
    messages: list[dict[str, Any]] = []
    if raw is not None:
        text = raw  # given as it is: no template, and none of its stop strings
    else:
        tool_prompt = _tool_prompt(tools) if tools and not template.supports_tools else None
        projector = scheduler.projector if pictures else None
        messages = _messages(req, template, tool_prompt, projector.marker if projector else None)
        try:
            text = template.render(
                messages,
                bos=engine.bos_text,
                eos=engine.eos_text,
                tools=tools,
                max_chars=limits.template_max_chars,
                timeout_s=limits.template_timeout_s,
                variables=fmt.template_vars(turn) if template.native else None,
            )
        except TemplateRenderError as exc:
            raise InvalidRequest(str(exc), param="messages") from None
    # A forced call or format starts with the reasoning unless the prompt or the client ruled it out.
    thinking: Thinking = "off" if raw is not None or turn.thinking is False else fmt.thinking(text)
    grammar = _grammar(loaded, req, fmt, turn, thinking)
    n_ctx = engine.n_ctx
    if surely_longer(loaded, text, n_ctx):
        raise ContextLengthExceeded(
            f"This model's maximum context length is {n_ctx} tokens; the messages use more than that",
            param="messages",
        )
    images: tuple[Any, ...] = ()
    if pictures and raw is None:
        prompt, images = scheduler.projector.tokenize(text, pictures, engine.bos_to_add)
        _check_images(images, len(prompt), scheduler.ubatch_size)
    else:
        prompt = engine.tokenize_prompt(text)
    if len(prompt) >= n_ctx:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {n_ctx} tokens; the messages use {len(prompt)}",
            param="messages",
        )
    wanted = req.max_completion_tokens or req.max_tokens
    if wanted is None:
        # As much as the context allows, shared by the n choices within the whole cache.
        wanted = min(n_ctx - len(prompt), (scheduler.capacity - len(prompt)) // req.n)
    elif len(prompt) + wanted > n_ctx:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {n_ctx} tokens; you asked for "
            f"{len(prompt) + wanted} ({len(prompt)} in the messages, {wanted} for the completion)",
            param="max_tokens",
        )
    if wanted < 1 or len(prompt) + req.n * wanted > scheduler.capacity:
        raise ContextLengthExceeded(
            f"n={req.n} completions of {wanted} tokens after a {len(prompt)}-token prompt need "
            f"{len(prompt) + req.n * wanted} KV cells; this model's cache has {scheduler.capacity} "
            "(lower n or max_tokens, or raise PENDRA_PARALLEL)",
            param="n",
        )
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    bias = _logit_bias(req.logit_bias, engine.n_vocab)
    if req.ignore_eos:
        if grammar is not None:
            raise InvalidRequest(
                "ignore_eos cannot be combined with a response format or a forced tool call, whose "
                "grammar ends the answer",
                param="ignore_eos",
            )
        # As llama-server does: every end-of-generation token is banned, so the answer runs to max_tokens.
        bias = (bias or {}) | dict.fromkeys(engine.end_tokens, -math.inf)
    # What the request leaves unset, the model's recommended sampling (its catalogue entry) sets.
    recommended = {k: v for k, v in engine.sampling_defaults.items() if k not in req.model_fields_set}
    chosen = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        **recommended,
    }
    sampling = SamplingParams(
        temperature=float(chosen["temperature"]),
        top_p=float(chosen["top_p"]),
        top_k=int(chosen["top_k"]),
        min_p=float(chosen["min_p"]),
        presence_penalty=float(chosen["presence_penalty"]),
        frequency_penalty=float(chosen["frequency_penalty"]),
        logit_bias=tuple(sorted(bias.items())) if bias else (),
        seed=None if req.seed is None else req.seed % 2**64,  # OpenAI's seeds may be negative
        grammar=grammar,
        top_logprobs=(req.top_logprobs or 0) if req.logprobs else None,
    )
    stops_all = tuple(stops) + (() if raw is not None else tuple(template.stop))
    marks: tuple[int, ...] = ()
    system_end = 0
    if raw is None and scheduler.checkpointed and req.cache_prompt and not images:
        variables = fmt.template_vars(turn) if template.native else None
        at = dict(_message_marks(loaded, template, messages, text, prompt, tools, limits, variables))
        marks = tuple(at.values())
        system_end = at.get(1, -1) if messages[0].get("role") == "system" else 0
    # The family's special tokens are written out only where its parser reads them.
    shown = _shown(loaded, fmt) if raw is None and (tools or fmt.thinks) else frozenset[int]()
    completion = Completion(
        prompt, wanted, sampling, stops_all, req.n, req.cache_prompt, "chat", marks, shown, images, system_end
    )
    split = raw is None and (req.reasoning_format or reasoning_format) != "none"
    return Plan(completion, fmt, turn, text, split)


def _check_images(images: tuple[Any, ...], n_prompt: int, n_ubatch: int) -> None:
    """An image must be followed by text (its last token's logits start the answer), and one read
    with non-causal attention (Gemma 3) must fit one micro-batch."""
    if images and images[-1].end >= n_prompt:
        raise InvalidRequest("the prompt may not end with an image: add text after it", param="messages")
    big = next((image for image in images if image.non_causal and image.n_tokens > n_ubatch), None)
    if big is not None:
        raise InvalidRequest(
            f"an image of {big.n_tokens} tokens must fit one micro-batch of this model, {n_ubatch} tokens "
            "(raise PENDRA_N_UBATCH, or the model's n_ubatch option)",
            param="messages",
        )


def _turn(req: ChatCompletionRequest, tools: list[dict[str, Any]] | None) -> Turn:
    """The request's wishes for the family: `chat_template_kwargs` as given, `enable_thinking` from
    it or from `reasoning_effort: "none"`."""
    kwargs = dict(req.chat_template_kwargs or {})
    thinking = kwargs.pop("enable_thinking", None)
    if not isinstance(thinking, bool):
        thinking = False if req.reasoning_effort == "none" else None
    return Turn(tools, thinking, req.reasoning_effort, kwargs)


def _grammar(
    loaded: Loaded, req: ChatCompletionRequest, fmt: Format, turn: Turn, thinking: Thinking
) -> str | None:
    """The grammar a forced tool call or a response_format asks for, in the family's syntax and
    after its reasoning; compiled once here so a grammar llama.cpp refuses is the caller's 400."""
    grammar: str | None = None
    names = _forced_names(turn.tools, req.tool_choice or "auto") if turn.tools else None
    if names:
        parallel = req.parallel_tool_calls is not False and fmt.name != "generic"
        grammar = _call_grammar(fmt, turn, names, parallel, thinking)
    fmt_req = req.response_format
    if fmt_req is not None and fmt_req.type != "text":
        if grammar is not None:
            raise InvalidRequest(
                "response_format cannot be combined with a forced tool call", param="response_format"
            )
        if fmt_req.type == "json_object":
            schema: Any = {"type": "object"}
        else:
            schema = (fmt_req.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise InvalidRequest(
                    "response_format.json_schema.schema must be a JSON schema object", param="response_format"
                )
        if fmt.thinks and req._raw_prompt is None:
            grammar = _content_grammar(fmt, schema, thinking)
        else:
            grammar = (
                JSON_GBNF if fmt_req.type == "json_object" else _schema_grammar(schema, "response_format")
            )
    if grammar is not None:
        _check_grammar(loaded, grammar, "response_format" if fmt_req is not None else "tools")
    return grammar


def _shown(loaded: Loaded, fmt: Format) -> frozenset[int]:
    """The special tokens of the family's syntax, written out in the output for its parser."""
    shown = loaded.memo.get("shown")
    if shown is None:
        ids = set()
        for text in fmt.preserved:
            tokens = loaded.engine.tokenize(text, add_bos=False, special=True)
            if len(tokens) == 1:
                ids.add(tokens[0])
        shown = loaded.memo["shown"] = frozenset(ids)
    return cast(frozenset[int], shown)


def _message_marks(
    loaded: Loaded,
    template: ChatTemplate,
    messages: list[dict[str, Any]],
    text: str,
    prompt: list[int],
    tools: list[dict[str, Any]] | None,
    limits: RequestLimits,
    variables: dict[str, Any] | None,
) -> tuple[tuple[int, int], ...]:
    """Where this conversation's prompt may later diverge from another's (the end of the first
    message, usually the system prompt) or from its own next version (the start of the last user
    message): the token positions a recurrent model checkpoints at. A boundary counts only where the
    template renders the earlier messages alone as a prefix of the prompt that tokenizes alike."""
    engine = loaded.engine

    def render(some: list[dict[str, Any]]) -> str:
        return template.render(
            some,
            bos=engine.bos_text,
            eos=engine.eos_text,
            tools=tools,
            max_chars=limits.template_max_chars,
            timeout_s=limits.template_timeout_s,
            generation_prompt=False,
            variables=variables,
        )

    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    marks = []
    for k in sorted({1, *users[-1:]}):
        if not 0 < k < len(messages):
            continue
        first = messages[0].get("content") if k == 1 else None
        try:
            head = render(messages[:k])
        except TemplateRenderError:
            head = ""  # (Qwen's templates refuse a conversation with no user message)
        if isinstance(first, str) and first not in head:
            head = ""  # (Gemma's renders a lone system message as nothing: it folds it, below)
        if head and text.startswith(head):
            tokens = engine.tokenize_prompt(head)
            if prompt[: len(tokens)] == tokens:
                marks.append((k, len(tokens)))
                continue
        if isinstance(first, str) and first and messages[0].get("role") == "system":
            # Templates that fold the system prompt into the first user message (Gemma's): the
            # text before a placeholder user message, as far as its tokens agree with the prompt's.
            try:
                folded = render([messages[0], {"role": "user", "content": PLACEHOLDER}])
            except TemplateRenderError:
                continue
            end = folded.find(PLACEHOLDER)
            if end > len(first) and first in folded[:end] and text.startswith(folded[:end]):
                tokens = engine.tokenize_prompt(folded[:end])
                agreed = common_prefix(tokens, prompt)
                if agreed >= len(tokens) - FOLD_SLACK:
                    marks.append((k, agreed))
    return tuple(marks)


def _logit_bias(bias: dict[str, float] | None, n_vocab: int) -> dict[int, float] | None:
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        # ASCII digits only: "²".isdigit() is true, but int("²") raises (and "-1" is no token).
        if not _TOKEN_ID_RE.fullmatch(key) or not 0 <= int(key) < n_vocab:
            raise InvalidRequest(
                f"logit_bias: token id {key!r} is not in the vocabulary (0..{n_vocab - 1})",
                param="logit_bias",
            )
        if not -100 <= value <= 100:
            raise InvalidRequest("logit_bias values must be between -100 and 100", param="logit_bias")
        out[int(key)] = float(value)
    return out


def _logprobs_json(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": e.bytes,
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, lp, b in e.top],
        }
        for e in entries
    ]


def _usage(result: Result, reasoning_tokens: int = 0, image_tokens: int = 0) -> Usage:
    completion = sum(result.completion_tokens)
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=completion,
        total_tokens=result.prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(
            cached_tokens=result.cached_tokens, image_tokens=image_tokens
        ),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning_tokens),
    )


def _reasoning_tokens(loaded: Loaded, splitters: list[Splitter], result: Result) -> int:
    """The reasoning's tokens, counted again from its text (with its two tags), at most the tokens
    its choice generated (text can tokenize longer than it was written): what the model spent
    thinking, as OpenAI's `completion_tokens_details.reasoning_tokens` reports it."""
    total = 0
    for s, generated in zip(splitters, result.completion_tokens, strict=True):
        if s.sent.reasoning:
            counted = len(loaded.engine.tokenize(s.sent.reasoning, add_bos=False, special=False)) + 2
            total += min(counted, generated)
    return total


@dataclass
class _Answer:
    """One choice as it is assembled from deltas."""

    splitter: Splitter
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: str = "stop"


class EventStream:
    """A chat completion's server-sent events, and `close()`, which ends the request whether or
    not its events were ever read: a client gone before the first byte leaves the generator
    unstarted, and an unstarted generator's `finally` never runs."""

    def __init__(self, events: AsyncIterator[str], end: Callable[[], None]) -> None:
        self.events = events
        self.end = end

    def __aiter__(self) -> AsyncIterator[str]:
        return self.events

    async def close(self) -> None:
        self.end()

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        """The stream's events as the JSON objects they carry, up to `[DONE]`: for the adapters
        (Ollama, completions, Responses) that answer in another shape."""
        async for event in self.events:
            data = event.removeprefix("data: ").strip()
            if data == "[DONE]":
                return
            yield json.loads(data)


class ChatService:
    def __init__(self, registry: ModelRegistry, metrics: InferenceMetrics | None = None) -> None:
        self.registry = registry
        self.metrics = metrics or registry.metrics
        self.limits = RequestLimits.from_settings(registry.settings)
        self.reasoning_format = registry.settings.reasoning_format
        self.images = ImageLimits.from_settings(registry.settings)
        # Decoded images are large (16 MP is 48 MB of RGB): two requests' at a time.
        self._image_work = asyncio.Semaphore(2)
        self._background: set[asyncio.Task[None]] = set()

    async def _plan(self, loaded: Loaded, req: ChatCompletionRequest, parts: list[tuple[str, str]]) -> Plan:
        """The plan, with the request's images fetched and decoded first (in a thread)."""
        if not parts:
            return await asyncio.to_thread(plan, loaded, req, self.limits, self.reasoning_format)
        if cast(Scheduler, loaded.runner).projector is None:
            refused = loaded.engine.projector_refused
            raise InvalidRequest(
                f"'{req.model}' does not read images: "
                + (
                    f"its vision projector was refused at load: {refused}"
                    if refused
                    else "it has no vision projector (mmproj)"
                ),
                param="messages",
                code="model_not_multimodal",
            )

        def load() -> list[Picture]:
            return [
                decode_image(fetch_image(url, self.images, where), self.images, where) for where, url in parts
            ]

        async with self._image_work:
            pictures = await asyncio.to_thread(load)
            return await asyncio.to_thread(plan, loaded, req, self.limits, self.reasoning_format, pictures)

    async def _submit(
        self, loaded: Loaded, p: Plan, is_disconnected: Callable[[], Awaitable[bool]]
    ) -> tuple[Ticket, asyncio.Task[None]]:
        """Queue the completion and wait until the scheduler admits it. A full queue or a wait
        past the queue timeout raise here, before any byte is sent (a 503 with Retry-After)."""
        scheduler = cast(Scheduler, loaded.runner)
        ticket = scheduler.submit(p.completion)
        watch = asyncio.create_task(_watch_disconnect(is_disconnected, ticket, scheduler))
        try:
            await ticket.admitted
        except BaseException:
            ticket.cancel()
            scheduler.wake()
            watch.cancel()
            raise
        return ticket, watch

    async def complete(
        self, req: ChatCompletionRequest, is_disconnected: Callable[[], Awaitable[bool]]
    ) -> ChatCompletion:
        check_chat(req, self.limits)
        parts = image_parts(req, self.images)
        async with self.registry.use(req.model, "chat", req.keep_alive) as loaded:
            with counted(self.metrics, req.model, "chat") as outcome:
                p = await self._plan(loaded, req, parts)
                ticket, watch = await self._submit(loaded, p, is_disconnected)
                answers = [_Answer(p.splitter()) for _ in range(req.n)]
                try:
                    async for item in ticket.deltas():
                        answer = answers[item.index]
                        answer.splitter.feed(item.text)
                        if item.logprobs:
                            answer.logprobs.extend(item.logprobs)
                        if item.finish_reason:
                            answer.finish = item.finish_reason
                            answer.splitter.finish()
                    left = ticket.cancelled.is_set()  # the client went away: the scheduler stopped it
                finally:
                    watch.cancel()
                    ticket.cancel()  # a no-op when the request is done; frees it when we were cancelled
                outcome.reason = "abort" if left else answers[0].finish
                if answers[0].splitter.sent.calls and outcome.reason != "length":
                    outcome.reason = "tool_calls"
                result = cast(Result, ticket.result)
                reasoning_tokens = _reasoning_tokens(loaded, [a.splitter for a in answers], result)
        choices = []
        for index, answer in enumerate(answers):
            sent = answer.splitter.sent
            finish = "stop" if answer.finish == "abort" else answer.finish
            calls = [ToolCall.model_validate(c) for c in answer.splitter.calls]
            if calls and finish != "length":  # a cut answer says so, whatever calls it holds
                finish = "tool_calls"
            logprobs = None
            if req.logprobs:
                logprobs = ChoiceLogprobs.model_validate({"content": _logprobs_json(answer.logprobs)})
            choices.append(
                Choice(
                    index=index,
                    message=ChoiceMessage(
                        content=sent.content if sent.content or not calls else None,
                        tool_calls=calls or None,
                        reasoning_content=sent.reasoning or None,
                    ),
                    logprobs=logprobs,
                    finish_reason=cast(FinishReason, finish),
                )
            )
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            model=req.model,
            system_fingerprint=FINGERPRINT,
            choices=choices,
            usage=_usage(result, reasoning_tokens, p.image_tokens),
        )

    async def stream(
        self, req: ChatCompletionRequest, is_disconnected: Callable[[], Awaitable[bool]]
    ) -> EventStream:
        """Check, prepare and queue now (errors raise before any byte is sent), then the SSE stream."""
        check_chat(req, self.limits)
        parts = image_parts(req, self.images)
        stack = contextlib.AsyncExitStack()
        loaded = await stack.enter_async_context(self.registry.use(req.model, "chat", req.keep_alive))
        try:
            with counted(self.metrics, req.model, "chat", keep=True):
                p = await self._plan(loaded, req, parts)
                ticket, watch = await self._submit(loaded, p, is_disconnected)
        except BaseException:
            await stack.aclose()
            raise
        stack.callback(watch.cancel)
        stack.callback(ticket.cancel)
        outcome = Outcome()  # abort unless it ends otherwise: the client left
        ended = False

        def end() -> None:
            """Count the request and release it, once: cancels the ticket (the scheduler drops it
            within one step) and the hold on the model."""
            nonlocal ended
            if ended:
                return
            ended = True
            self.metrics.request_done(req.model, "chat", outcome.reason)
            cleanup = asyncio.ensure_future(stack.aclose())
            self._background.add(cleanup)
            cleanup.add_done_callback(self._background.discard)

        return EventStream(self._events(req, loaded, p, ticket, outcome, end), end)

    async def _events(
        self,
        req: ChatCompletionRequest,
        loaded: Loaded,
        p: Plan,
        ticket: Ticket,
        outcome: Outcome,
        end: Callable[[], None],
    ) -> AsyncIterator[str]:
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
            body = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": req.model,
                "system_fingerprint": FINGERPRINT,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            }
            return f"data: {json.dumps(body)}\n\n"

        splitters = [p.splitter() for _ in range(req.n)]
        finished: dict[int, str] = {}
        try:
            for index in range(req.n):
                yield chunk(index, {"role": "assistant", "content": ""})
            async for item in ticket.deltas():
                for event in self._deltas(item, splitters[item.index], chunk, req.logprobs, finished):
                    yield event
            result = cast(Result, ticket.result)
            outcome.reason = "abort" if ticket.cancelled.is_set() else finished.get(0, "stop")
            if req.stream_options and req.stream_options.include_usage:
                body = {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": req.model,
                    "system_fingerprint": FINGERPRINT,
                    "choices": [],
                    "usage": _usage(
                        result, _reasoning_tokens(loaded, splitters, result), p.image_tokens
                    ).model_dump(),
                }
                yield f"data: {json.dumps(body)}\n\n"
        except APIError as exc:
            outcome.reason = "error"
            yield f"data: {json.dumps(exc.body())}\n\n"
        except Exception as exc:
            outcome.reason = "error"
            logger.exception("generation failed mid-stream")
            yield (
                "data: "
                + json.dumps(error_body(f"generation failed: {exc}", "server_error", None, "internal_error"))
                + "\n\n"
            )
        finally:
            end()
        yield "data: [DONE]\n\n"

    @staticmethod
    def _deltas(
        item: Delta,
        splitter: Splitter,
        chunk: Callable[..., str],
        with_logprobs: bool | None,
        finished: dict[int, str],
    ) -> list[str]:
        """One scheduler delta as chunks: what the family's parser let through (reasoning,
        content, pieces of calls), the token's logprobs on the first (or alone), and the end."""
        logprobs = (
            {"content": _logprobs_json(item.logprobs), "refusal": None}
            if with_logprobs and item.logprobs
            else None
        )
        deltas = splitter.feed(item.text)
        finish = item.finish_reason
        if finish is not None:
            deltas += splitter.finish()
        out = [chunk(item.index, delta, None, logprobs if i == 0 else None) for i, delta in enumerate(deltas)]
        if not deltas and logprobs is not None:
            out.append(chunk(item.index, {}, None, logprobs))
        if finish is not None:
            if splitter.sent.calls and finish != "length":
                finish = "tool_calls"
            finished[item.index] = finish
            out.append(chunk(item.index, {}, "stop" if finish == "abort" else finish))
        return out


async def _watch_disconnect(
    is_disconnected: Callable[[], Awaitable[bool]], ticket: Ticket, scheduler: Scheduler
) -> None:
    """Servers that do not fail writes to a closed connection still tell us through receive."""
    while not ticket.cancelled.is_set():
        if await is_disconnected():
            ticket.cancel()
            scheduler.wake()
            return
        await asyncio.sleep(0.25)
