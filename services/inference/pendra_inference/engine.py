"""One loaded GGUF in llama.cpp, through llama-cpp-python: tokenize, generate, embed.

Everything here blocks; callers run it in worker threads and serialize generation per model.
The engine never lets llama.cpp see input it would assert on: callers check lengths and token ids
first (see `chat.py` and `embeddings.py`), and `embed` refuses sequences longer than its batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import llama_cpp
import numpy as np
from llama_cpp import Llama, StoppingCriteriaList
from llama_cpp.llama_grammar import LlamaGrammar

from pendra_inference.backends import activate

logger = logging.getLogger(__name__)

POOLING = {
    "none": llama_cpp.LLAMA_POOLING_TYPE_NONE,
    "mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN,
    "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS,
    "last": llama_cpp.LLAMA_POOLING_TYPE_LAST,
}


def gpu_offload_supported() -> bool:
    activate()
    return bool(llama_cpp.llama_supports_gpu_offload())


@dataclass(frozen=True)
class EngineConfig:
    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_threads: int | None
    n_gpu_layers: int
    embedding: bool
    pooling: int | None = None  # llama.cpp pooling type for embedding models


@dataclass
class GenerationParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    grammar: LlamaGrammar | None = None


@dataclass
class Piece:
    text: str
    finish_reason: str | None


class LlamaEngine:
    """A llama.cpp model and context. Not thread-safe: one caller at a time."""

    def __init__(self, path: Path, config: EngineConfig) -> None:
        activate()  # the backends for this host, before llama.cpp looks for any
        self.path = path
        self.config = config
        kwargs: dict[str, Any] = {
            "n_ctx": config.n_ctx,
            "n_batch": config.n_batch,
            "n_ubatch": config.n_ubatch,
            "n_gpu_layers": config.n_gpu_layers,
            "embedding": config.embedding,
            "verbose": False,
        }
        if config.n_threads:
            kwargs["n_threads"] = kwargs["n_threads_batch"] = config.n_threads
        if config.pooling is not None:
            kwargs["pooling_type"] = config.pooling
        self.llm = Llama(str(path), **kwargs)
        self.decode_calls = 0  # embedding decodes, for tests and metrics
        self.generated_tokens = 0  # tokens sampled by the last generation
        self.stopped_early = False  # the last generation was stopped by its caller

    # -- facts -------------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return int(self.llm.n_ctx())

    @property
    def n_vocab(self) -> int:
        return int(self.llm.n_vocab())

    @property
    def n_embd(self) -> int:
        return int(self.llm.n_embd())

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="ignore")

    @property
    def bos_text(self) -> str:
        return self.token_text(self.llm.token_bos())

    @property
    def eos_text(self) -> str:
        return self.token_text(self.llm.token_eos())

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def tokenize_prompt(self, prompt: str) -> list[int]:
        """Tokens of a rendered chat prompt; the template already wrote any BOS text."""
        tokens = self.tokenize(prompt, add_bos=False)
        bos = self.llm.token_bos()
        if bos >= 0 and self.llm.metadata.get("tokenizer.ggml.add_bos_token", "true") != "false":
            if not tokens or tokens[0] != bos:
                tokens.insert(0, bos)
        return tokens

    # -- generation --------------------------------------------------------------------------

    def generate(
        self, prompt: list[int], params: GenerationParams, should_stop: Callable[[], bool]
    ) -> Generator[Piece, None, None]:
        """Stream text pieces; the last one has a finish_reason. `should_stop` is polled every
        token, so a client that goes away stops the work within one token."""
        sampled = [0]

        def stop_check(_ids: Any, _logits: Any) -> bool:
            sampled[0] += 1
            if should_stop():
                self.stopped_early = True
            return self.stopped_early

        self.generated_tokens = 0
        self.stopped_early = False
        stream = self.llm.create_completion(
            prompt=prompt,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=params.stop or [],
            seed=params.seed,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            logit_bias=params.logit_bias,
            grammar=params.grammar,
            stream=True,
            stopping_criteria=StoppingCriteriaList([stop_check]),
        )
        try:
            for chunk in stream:
                choice = cast(dict[str, Any], chunk)["choices"][0]
                yield Piece(choice["text"], choice["finish_reason"])
        finally:
            # llama-cpp-python samples one token past max_tokens before it stops.
            self.generated_tokens = min(sampled[0], params.max_tokens)
            close = getattr(stream, "close", None)
            if close is not None:
                close()

    # -- embeddings --------------------------------------------------------------------------

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Pooled, L2-normalized embeddings of token sequences, packing as many sequences into
        each llama.cpp decode as the batch and the sequence limit allow."""
        llm = self.llm
        n_batch = llm.n_batch
        n_seq_max = max(1, int(llm.context_params.n_seq_max))
        n_embd = self.n_embd
        out: list[list[float]] = []
        batch = llm._batch
        ctx = llm._ctx
        batch.reset()
        pending: list[int] = []
        tokens_in_batch = 0

        def flush() -> None:
            nonlocal tokens_in_batch
            if not pending:
                return
            ctx.kv_cache_clear()
            ctx.decode(batch)
            self.decode_calls += 1
            for seq in range(len(pending)):
                ptr = llama_cpp.llama_get_embeddings_seq(ctx.ctx, seq)
                vector = np.ctypeslib.as_array(ptr, shape=(n_embd,)).astype(np.float64)
                norm = float(np.linalg.norm(vector))
                out.append((vector / norm if norm > 0 and math.isfinite(norm) else vector).tolist())
            batch.reset()
            pending.clear()
            tokens_in_batch = 0

        for tokens in inputs:
            if len(tokens) > n_batch:
                raise ValueError(f"sequence of {len(tokens)} tokens exceeds the batch of {n_batch}")
            if tokens_in_batch + len(tokens) > n_batch or len(pending) >= n_seq_max:
                flush()
            batch.add_sequence(tokens, len(pending), True)
            pending.append(len(tokens))
            tokens_in_batch += len(tokens)
        flush()
        ctx.kv_cache_clear()
        llm.reset()
        return out

    def close(self) -> None:
        self.llm.close()
