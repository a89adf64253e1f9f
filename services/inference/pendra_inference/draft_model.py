"""Speculative decoding with a draft model: a small model of the same vocabulary (a Qwen3 0.6B
for a Qwen3 32B) writes the next few tokens of every speculating sequence, and the scheduler checks
them with the target model in one batch, as it checks n-gram drafts (see speculation.py): the
target's own sampler keeps a drafted token only where it picks it too, so the answer is the one
without speculation, in fewer target steps where the draft guessed right.

The draft model runs in a context of its own, with a unified cache holding, per sequence id of the
target, the tokens it has decoded for it. Each step, `draft` brings every speculating sequence up
to date (only the tokens it lacks: the last step's accepted drafts and new pending token; a
rejected draft's cells are removed first), then writes the drafts greedily, one token for all of
them per draft-model decode. A draft model must share the target's vocabulary (checked when it is
loaded) and be plain attention (a recurrent or sliding-window draft could not drop a rejected
draft's cells). Chosen per model: `{"kind": "draft", "model": "<installed model>", "draft_tokens":
4}` in the sidecar's `options.speculative` or the catalogue entry's `speculative`.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from pendra_inference.batch import Batch
from pendra_inference.detokenize import token_bytes
from pendra_inference.model_memory import ATTENTION, kind_of
from pendra_inference.sequence import common_prefix

logger = logging.getLogger(__name__)

# Token ids whose pieces must be the same in both vocabularies (beside their sizes and their
# begin and end tokens): every 97th, the first 256 and the last 256.
VOCAB_STRIDE = 97


def check_vocabularies(target: Any, draft: Any) -> None:
    """Raise ValueError, saying why, where the draft's vocabulary is not the target's."""
    n_target, n_draft = (
        int(llama_cpp.llama_vocab_n_tokens(target)),
        int(llama_cpp.llama_vocab_n_tokens(draft)),
    )
    if n_target != n_draft:
        raise ValueError(f"the draft model has {n_draft} tokens, the model {n_target}")
    for which in ("bos", "eos"):
        a = int(getattr(llama_cpp, f"llama_vocab_{which}")(target))
        b = int(getattr(llama_cpp, f"llama_vocab_{which}")(draft))
        if a != b:
            raise ValueError(f"the draft model's {which} token is {b}, the model's {a}")
    buffer = ctypes.create_string_buffer(256)
    ids = {
        *range(min(256, n_target)),
        *range(max(0, n_target - 256), n_target),
        *range(0, n_target, VOCAB_STRIDE),
    }
    for token in sorted(ids):
        if token_bytes(target, token, buffer) != token_bytes(draft, token, buffer):
            raise ValueError(f"token {token} differs between the model's vocabulary and the draft's")


class DraftModel:
    """A draft model's context, drafting for many sequences of one target at once."""

    def __init__(
        self,
        path: Path,
        target_vocab: Any,
        *,
        n_ctx: int,
        n_seq_max: int,
        n_batch: int,
        n_threads: int,
        n_gpu_layers: int = 0,
        use_mmap: bool = False,
        catch_up: int = 256,
        flash_attn_type: int = -1,
        name: str = "",
    ) -> None:
        """Load the draft model from `path`; raises ValueError where it cannot draft for the target
        (another vocabulary, not plain attention) and RuntimeError where llama.cpp fails."""
        self.name = name
        self.catch_up = catch_up  # tokens a step decodes to bring sequences up to date
        self.ctx: Any = None
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        # Mapped only where a pinned install verified it: a mapped file cut short under a running
        # server kills it (SIGBUS), as for the model itself (engine.py).
        model_params.use_mmap = use_mmap
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load the draft model {path.name}")
        try:
            self._open(target_vocab, n_ctx, n_seq_max, n_batch, n_threads, flash_attn_type)
        except BaseException:
            if self.ctx:
                llama_cpp.llama_free(self.ctx)
            llama_cpp.llama_model_free(self.model)
            raise

    def _open(
        self,
        target_vocab: Any,
        n_ctx: int,
        n_seq_max: int,
        n_batch: int,
        n_threads: int,
        flash_attn_type: int,
    ) -> None:
        model = self.model
        vocab = llama_cpp.llama_model_get_vocab(model)
        kind = kind_of(model)
        if kind != ATTENTION:
            raise ValueError(
                f"a {kind} draft model could not drop a rejected draft; only attention models draft"
            )
        check_vocabularies(target_vocab, vocab)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = max(n_batch, n_seq_max)
        params.n_ubatch = min(512, params.n_batch)
        params.n_seq_max = n_seq_max
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = n_threads
        params.no_perf = True
        params.flash_attn_type = flash_attn_type
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create the draft model's context of {n_ctx} cells")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.batch_size = int(params.n_batch)
        self.batch = Batch(self.batch_size)
        self.held: dict[int, list[int]] = {}  # sequence id: the tokens its cells hold, in order

    def draft(self, wanted: list[tuple[int, list[int], int, int]]) -> dict[int, list[int]]:
        """For each (sequence id, its tokens, its pending token, at most how many): the tokens the
        draft model writes next, greedily. A sequence that lacks more than `catch_up` tokens in
        all (a new prompt) gets them over several steps, with no drafts until it is up to date, so
        that no step of the running streams waits for a long prompt. {} where llama.cpp could not
        decode (the scheduler then goes on without drafts; the draft cache starts again)."""
        try:
            return self._draft(wanted)
        except Exception as exc:  # noqa: BLE001 - the model goes on without drafts
            logger.warning("%s: the draft model failed (%s); its cache starts again", self.name, exc)
            llama_cpp.llama_memory_clear(self.memory, True)
            self.held.clear()
            return {}

    def _draft(self, wanted: list[tuple[int, list[int], int, int]]) -> dict[int, list[int]]:
        most: dict[int, int] = {}
        missing: list[tuple[int, list[int], int, bool]] = []  # id, tokens to decode, from, complete
        budget = self.catch_up
        for seq_id, tokens, pending, limit in wanted:
            if limit <= 0:
                continue
            held = self.held.get(seq_id, [])
            want = [*tokens, pending]
            common = common_prefix(held, want, len(want) - 1)  # the last one's row is needed
            if common < len(held):
                llama_cpp.llama_memory_seq_rm(self.memory, seq_id, common, -1)
            lacking = want[common:]
            complete = len(lacking) <= max(budget, 1)
            if not complete:
                lacking = lacking[: max(budget, 0)]
            budget -= len(lacking)
            self.held[seq_id] = want[: common + len(lacking)]
            if complete:
                most[seq_id] = limit
            if lacking:
                missing.append((seq_id, lacking, common, complete))
        drafts: dict[int, list[int]] = {seq_id: [] for seq_id in most}
        # Catch up: every sequence's missing tokens, a row of logits at each one's last.
        rows: list[tuple[int, int]] = []  # (row, sequence id) of this decode's last tokens
        count = 0
        for seq_id, tokens, start, complete in missing:
            done = 0
            while done < len(tokens):
                if count == self.batch_size:
                    self._decode(count, rows, drafts)
                    count, rows = 0, []
                take = min(len(tokens) - done, self.batch_size - count)
                last = complete and done + take == len(tokens)
                count = self.batch.put(count, tokens[done : done + take], start + done, seq_id, last=last)
                if last:
                    rows.append((count - 1, seq_id))
                done += take
        if count:
            self._decode(count, rows, drafts)
        # Then one drafted token of every sequence still short of its limit per decode.
        while True:
            going = [seq_id for seq_id, d in drafts.items() if d and len(d) < most[seq_id]]
            if not going:
                break
            rows = []
            for row, seq_id in enumerate(going):
                token = drafts[seq_id][-1]
                self.batch.put(row, [token], len(self.held[seq_id]), seq_id, last=True)
                self.held[seq_id].append(token)
                rows.append((row, seq_id))
            self._decode(len(going), rows, drafts)
        return {seq_id: d for seq_id, d in drafts.items() if d}

    def _decode(self, count: int, rows: list[tuple[int, int]], drafts: dict[int, list[int]]) -> None:
        self.batch.raw.n_tokens = count
        if llama_cpp.llama_decode(self.ctx, self.batch.raw) != 0:
            raise RuntimeError("llama_decode refused the draft batch")
        for row, seq_id in rows:
            logits = llama_cpp.llama_get_logits_ith(self.ctx, row)
            drafts[seq_id].append(int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax()))

    def forget(self, seq_id: int) -> None:
        """The target's sequence ended: its draft cells go."""
        if self.held.pop(seq_id, None) is not None:
            llama_cpp.llama_memory_seq_rm(self.memory, seq_id, -1, -1)

    def cached(self, seq_id: int, size: int) -> None:
        """The target's sequence is cached for its prefix: the draft's cells go all the same (a
        later request catches up on what it lacks)."""
        self.forget(seq_id)

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
            self.batch.free()
            llama_cpp.llama_model_free(self.model)
