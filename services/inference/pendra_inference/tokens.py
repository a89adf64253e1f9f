"""`POST /tokenize` and `POST /detokenize` in llama-server's shape, with a `model` field (Pendra
serves many): text to the model's token ids (optionally with each token's piece) and back.

A piece that is not whole UTF-8 on its own (a byte of a multi-byte character) is given as its
bytes, a list of integers, as llama-server does. Any model may be asked, chat, embedding or
reranker; the tokenizer is the model's vocabulary, which is safe to read beside running decodes.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from pendra_shared.api_errors import InvalidRequest
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from pendra_inference.detokenize import token_bytes, tokens_bytes
from pendra_inference.engine import LlamaEngine
from pendra_inference.protocol import MAX_MODEL_NAME
from pendra_inference.registry import ModelRegistry

TokenId = Annotated[StrictInt, Field(ge=-(2**31), le=2**31 - 1)]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=MAX_MODEL_NAME)
    content: str
    add_special: bool = Field(default=False, description="Add the model's BOS token, as a prompt would.")
    parse_special: bool = Field(default=True, description="Read special-token text as those tokens.")
    with_pieces: bool = Field(default=False, description="Give each token's text (its piece) too.")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=MAX_MODEL_NAME)
    tokens: list[TokenId]


def _piece(engine: LlamaEngine, token: int) -> str | list[int]:
    raw = token_bytes(engine.vocab, token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def _check_ids(engine: LlamaEngine, tokens: list[int]) -> None:
    n_vocab = engine.n_vocab
    for index, token in enumerate(tokens):
        if not 0 <= token < n_vocab:
            raise InvalidRequest(
                f"tokens[{index}] is {token}: this model's token ids run from 0 to {n_vocab - 1}",
                param=f"tokens[{index}]",
            )


class TokenService:
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        model = await self.registry.find(req.model)
        async with self.registry.use(model.name, model.purpose or "chat") as loaded:
            engine = loaded.engine

            def run() -> dict[str, Any]:
                ids = engine.tokenize(req.content, add_bos=req.add_special, special=req.parse_special)
                if not req.with_pieces:
                    return {"tokens": ids}
                return {"tokens": [{"id": token, "piece": _piece(engine, token)} for token in ids]}

            return await asyncio.to_thread(run)

    async def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        model = await self.registry.find(req.model)
        async with self.registry.use(model.name, model.purpose or "chat") as loaded:
            engine = loaded.engine
            _check_ids(engine, req.tokens)

            def run() -> str:
                raw = tokens_bytes(engine.vocab, req.tokens)
                return raw.decode("utf-8", errors="replace")

            return {"content": await asyncio.to_thread(run)}
