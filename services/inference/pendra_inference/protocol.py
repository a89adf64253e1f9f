"""The OpenAI request and response shapes the inference service speaks, as pydantic models.

Fields follow the order of OpenAI's reference. Requests allow extra fields (clients send more
than we read, and nothing reads the rest); Pendra's own extensions are fenced and commented.
Numbers are strict (`"100"` and `1.5` are no token counts, NaN and Infinity no temperatures), and
every field that reaches llama.cpp as a C integer is bounded here. Limits that are settings
(messages, tools, stop strings, schemas) are checked in `limits.py`.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

# OpenAI documents no limit on logit_bias entries (its API refused more than 300 in 2023); a map
# is checked entry by entry against the vocabulary, so it is bounded here.
MAX_LOGIT_BIAS = 1024
MAX_MODEL_NAME = 256  # names are at most 129 characters (names.py): anything longer is not one
INT32_MAX = 2**31 - 1


# JSON integers only (no "100", 1.5 or true).
StrictInt = Annotated[int, Field(strict=True)]
# A finite number: JSON integers are taken, strings and NaN/Infinity are not.
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Bias = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-100, le=100)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


# Ollama-style keep_alive: "5m", seconds, or negative for ever.
KeepAlive = (
    Annotated[str, Field(max_length=32)]
    | Annotated[int, Field(strict=True, ge=-(2**53), le=2**53)]
    | Annotated[float, Field(strict=True, allow_inf_nan=False)]
    | None
)


# -- chat ------------------------------------------------------------------------------------


class ToolCallFunction(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    # -- extension (llama-server's and vLLM's name): an assistant turn's reasoning, given back --
    reasoning_content: str | None = None


class FunctionDef(_Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str = Field(max_length=MAX_MODEL_NAME)
    frequency_penalty: Finite = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Bias] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    logprobs: bool | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    n: StrictInt = Field(default=1, ge=1, le=128)
    presence_penalty: Finite = Field(default=0.0, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    seed: StrictInt | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Finite = Field(default=1.0, ge=0.0, le=2.0)
    top_p: Finite = Field(default=1.0, ge=0.0, le=1.0)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    user: str | None = None
    # -- Pendra extensions (llama.cpp and Ollama style) --
    top_k: StrictInt = Field(
        default=0, ge=0, le=INT32_MAX, description="Sample from the k likeliest tokens; 0: off."
    )
    min_p: Finite = Field(default=0.0, ge=0.0, le=1.0)
    cache_prompt: bool = Field(
        default=True,
        description="Start from a cached prompt prefix when one exists (false: decode the whole prompt).",
    )
    ignore_eos: bool = Field(
        default=False,
        description="Never end at an end-of-generation token: write max_tokens tokens (llama-server's "
        "and vLLM's name, for benchmarks).",
    )
    keep_alive: KeepAlive = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None,
        max_length=32,
        description="Variables for the model's chat template (vLLM and llama-server), e.g. "
        '{"enable_thinking": false}.',
    )
    reasoning_format: Literal["auto", "none"] | None = Field(
        default=None,
        description="auto: reasoning in reasoning_content; none: left inline in content "
        "(llama-server's names). Default: the PENDRA_REASONING_FORMAT setting.",
    )
    # Set by Pendra's own adapters (Ollama's `raw` generate), never from the wire: a prompt given
    # as it is, without the chat template.
    _raw_prompt: str | None = PrivateAttr(default=None)


class ChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    # -- extension (llama-server's and vLLM's name), left out when the model did not reason --
    reasoning_content: str | None = None


FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class Choice(BaseModel):
    index: int
    message: ChoiceMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    image_tokens: int = 0  # the images' embeddings, counted in prompt_tokens as llama-server does


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails = Field(default_factory=CompletionTokensDetails)


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[Choice]
    usage: Usage

    def to_json(self) -> dict[str, Any]:
        """The wire form: `tool_calls` and `reasoning_content` are left out, not null, when there
        are none."""
        data = self.model_dump(mode="json")
        for choice in data["choices"]:
            for key in ("tool_calls", "reasoning_content"):
                if choice["message"][key] is None:
                    del choice["message"][key]
        return data


# -- embeddings ------------------------------------------------------------------------------


class EmbeddingRequest(_Request):
    # A string, a list of strings, a list of token ids or a list of token-id lists; each item is
    # checked in embeddings.py, so that an error can name input[i].
    input: str | list[Any] = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists."
    )
    model: str = Field(max_length=MAX_MODEL_NAME)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, ge=1)
    user: str | None = None
    # -- Pendra extensions --
    truncate: bool = Field(default=False, description="Cut inputs longer than the context.")
    keep_alive: KeepAlive = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# -- models ----------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pendra"
    # -- Pendra extensions --
    purpose: str | None = None
    size_bytes: int | None = None
    quantization: str | None = None
    context_length: int | None = None
    loaded: bool = False
    capabilities: list[str] | None = None  # Ollama's names: completion, tools, thinking, embedding


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
