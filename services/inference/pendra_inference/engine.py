"""One loaded GGUF in llama.cpp, through llama-cpp-python: the model, its tokenizer, embeddings.

Chat models generate through the scheduler (`scheduler.py`), which builds its own multi-sequence
context on `model`; the engine's own `Llama` context is then a small one, used only for the
tokenizer and metadata. Embedding models embed here, in the batcher's thread.
Everything here blocks; callers run it in worker threads. The engine never lets llama.cpp see
input it would assert on: callers check lengths and token ids first (see `chat.py` and
`embeddings.py`), and `embed` refuses sequences longer than its batch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import Llama
from pendra_shared.gguf_info import RANK_POOLING

from pendra_inference.backends import activate
from pendra_inference.detokenize import token_bytes

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
    parallel: int = 1  # chat: sequences of n_ctx tokens in the scheduler's KV cache
    sequences: int = 0  # chat: sequence ids of the scheduler's context (0: llama.cpp's maximum)
    checkpoint_bytes: int = 0  # chat: host memory for recurrent-state checkpoints
    # Memory-map the weights. Off for files no pinned install verified: a mapped file truncated
    # in place kills the process with SIGBUS on the next page it touches.
    use_mmap: bool = True
    # Load the file's multi-token-prediction blocks (speculation of kind "mtp"; llama.cpp skips
    # them otherwise).
    load_mtp: bool = False


class LlamaEngine:
    """A llama.cpp model and context. Not thread-safe: one caller at a time."""

    def __init__(self, path: Path, config: EngineConfig) -> None:
        activate()  # the backends for this host, before llama.cpp looks for any
        self.path = path
        self.config = config
        # A chat model's own context only serves the tokenizer: the scheduler decodes elsewhere.
        helper = 256
        kwargs: dict[str, Any] = {
            "n_ctx": config.n_ctx if config.embedding else helper,
            "n_batch": config.n_batch if config.embedding else helper,
            "n_ubatch": config.n_ubatch if config.embedding else helper,
            "n_gpu_layers": config.n_gpu_layers,
            "embedding": config.embedding,
            "verbose": False,
            "use_mmap": config.use_mmap,
            # Embeddings: many inputs share a decode, each its own sequence; flash attention skips
            # the cells of the others (MiniLM, 256 inputs: 2.8x faster here) where plain attention
            # computes every token against every other in the decode.
            "flash_attn": config.embedding,
        }
        if config.n_threads:
            kwargs["n_threads"] = kwargs["n_threads_batch"] = config.n_threads
        if config.pooling is not None:
            kwargs["pooling_type"] = config.pooling
        with _model_params(load_mtp=config.load_mtp):
            self.llm = Llama(str(path), **kwargs)
        self.decode_calls = 0  # embedding decodes, for tests and metrics
        self.projector_refused: str | None = None  # why the model's vision projector was not loaded
        self.sampling_defaults: dict[str, float] = {}  # the model's recommended sampling (catalogue)

    # -- facts -------------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        """Tokens one request may use: prompt plus completion, or one embedding input."""
        return self.config.n_ctx

    @property
    def model(self) -> Any:
        """The llama_model pointer."""
        return self.llm._model.model

    @property
    def vocab(self) -> Any:
        """The llama_vocab pointer."""
        return self.llm._model.vocab

    @property
    def n_vocab(self) -> int:
        return int(self.llm.n_vocab())

    @functools.cached_property
    def end_tokens(self) -> tuple[int, ...]:
        """The vocabulary's end-of-generation tokens (end of text, of turn, of message...)."""
        vocab = self.vocab
        return tuple(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t))

    @property
    def n_embd(self) -> int:
        return int(self.llm.n_embd())

    @property
    def ranks(self) -> bool:
        """A reranker: its context pools by rank, one relevance score per sequence."""
        return self.config.embedding and int(llama_cpp.llama_pooling_type(self.llm._ctx.ctx)) == RANK_POOLING

    @property
    def output_width(self) -> int:
        """Numbers per pooled sequence: the embedding's width, or a reranker's scores (one)."""
        return max(1, int(llama_cpp.llama_model_n_cls_out(self.model))) if self.ranks else self.n_embd

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return token_bytes(self.vocab, token).decode("utf-8", errors="ignore")

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
        bos = self.bos_to_add
        if bos is not None and (not tokens or tokens[0] != bos):
            tokens.insert(0, bos)
        return tokens

    @property
    def bos_to_add(self) -> int | None:
        """The token a prompt starts with when its text does not write it, if the model has one."""
        bos = int(self.llm.token_bos())
        if bos >= 0 and self.llm.metadata.get("tokenizer.ggml.add_bos_token", "true") != "false":
            return bos
        return None

    # -- embeddings --------------------------------------------------------------------------

    @property
    def embed_limits(self) -> tuple[int, int]:
        """What one embedding decode holds: (tokens, sequences), the batch and the context's
        n_seq_max. The batch is the whole context for embedding models (see `registry.py`)."""
        return int(self.llm.n_batch), max(1, int(self.llm.context_params.n_seq_max))

    def embed_decode(self, inputs: list[list[int]]) -> np.ndarray:
        """One llama.cpp decode of `inputs`, each its own sequence: their pooled, L2-normalized
        embeddings as float32 rows (a reranker's: its raw scores). Together they must fit
        `embed_limits`."""
        max_tokens, max_sequences = self.embed_limits
        total = sum(len(tokens) for tokens in inputs)
        if not inputs or total > max_tokens or len(inputs) > max_sequences:
            raise ValueError(
                f"{len(inputs)} sequences of {total} tokens do not fit one decode "
                f"({max_sequences} sequences, {max_tokens} tokens)"
            )
        llm = self.llm
        batch, ctx = llm._batch, llm._ctx
        batch.reset()
        for seq, tokens in enumerate(inputs):
            batch.add_sequence(tokens, seq, True)
        ctx.kv_cache_clear()
        try:
            ctx.decode(batch)
        finally:
            batch.reset()
        self.decode_calls += 1
        width = self.output_width
        pooled = np.empty((len(inputs), width), dtype=np.float64)
        for seq in range(len(inputs)):
            ptr = llama_cpp.llama_get_embeddings_seq(ctx.ctx, seq)
            if not ptr:
                raise RuntimeError("llama.cpp returned no pooled embedding (is the pooling type none?)")
            pooled[seq] = np.ctypeslib.as_array(ptr, shape=(width,))
        if self.ranks:
            return pooled.astype(np.float32)  # scores, not directions: never normalized
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        np.divide(pooled, norms, out=pooled, where=(norms > 0) & np.isfinite(norms))
        return pooled.astype(np.float32)

    def embed(self, inputs: list[list[int]], token_budget: int | None = None) -> np.ndarray:
        """Pooled, L2-normalized embeddings of token sequences as float32 rows, packing as many
        whole sequences into each decode as `token_budget` (default: the batch) and the sequence
        limit allow; a sequence longer than the budget is decoded alone."""
        max_tokens, max_sequences = self.embed_limits
        budget = min(token_budget or max_tokens, max_tokens)
        out = np.empty((len(inputs), self.output_width), dtype=np.float32)
        start = used = 0
        for i, tokens in enumerate(inputs):
            if len(tokens) > max_tokens:
                raise ValueError(f"sequence of {len(tokens)} tokens exceeds the batch of {max_tokens}")
            if i > start and (used + len(tokens) > budget or i - start >= max_sequences):
                out[start:i] = self.embed_decode(inputs[start:i])
                start, used = i, 0
            used += len(tokens)
        if start < len(inputs):
            out[start:] = self.embed_decode(inputs[start:])
        self.llm.reset()
        return out

    def close(self) -> None:
        self.llm.close()


_LOADING = threading.local()  # this thread's Llama construction loads the MTP blocks
_WRAPPED = threading.Lock()


@contextlib.contextmanager
def _model_params(load_mtp: bool) -> Iterator[None]:
    """llama-cpp-python's `Llama` takes no `load_mtp`: the model parameters it starts from
    (`llama_model_default_params`, wrapped once) load the MTP blocks for constructions inside this
    context on this thread only."""
    if not load_mtp:
        yield
        return
    module = llama_cpp.llama_cpp
    with _WRAPPED:
        if not getattr(module.llama_model_default_params, "pendra_wrapped", False):
            default = module.llama_model_default_params

            def params() -> Any:
                chosen = default()
                if getattr(_LOADING, "mtp", False):
                    chosen.load_mtp = True
                return chosen

            params.pendra_wrapped = True  # type: ignore[attr-defined]
            module.llama_model_default_params = params
    _LOADING.mtp = True
    try:
        yield
    finally:
        _LOADING.mtp = False
