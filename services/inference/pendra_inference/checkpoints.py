"""Checkpoints: the part of a sequence that cannot be cut back, saved at a position.

A recurrent or hybrid model's state after `n` tokens cannot be recovered from a longer sequence's
(llama.cpp refuses to remove a recurrent tail, and copies whole states only). So the scheduler
saves that part of a sequence (`llama_state_seq_get_data_ext` with
`LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY`: only the recurrent layers of a hybrid) at the positions where a
later request is likely to diverge, keyed by the very tokens it follows. A new prompt starting
with those tokens gets a sequence whose attention cells are shared up to exactly that position and
whose recurrent part is the checkpoint, and decodes only the rest.

A sliding-window model (Gemma 3) has the same trouble in its sliding-window layers: llama.cpp
reuses the cells a sequence no longer sees, so a strict prefix of a sequence as long as the window
may have lost cells its last window needs. There the part saved (PARTIAL_ONLY: only the sliding-
window cache, `llama_kv_cache_iswa::state_write`) is those layers' cells of the last window, and a
restored checkpoint replaces the ones the new sequence got with the shared prefix.

Checkpoints live in host memory under a byte budget (counted in the model's memory figure), least
recently used first out; those at the end of a prompt's first message (a system prompt many
conversations share) go last, while they hold at most half the budget. One thread uses a store:
the scheduler's.
"""

from __future__ import annotations

import collections
import ctypes
from dataclasses import dataclass
from typing import Any

import llama_cpp

PARTIAL = llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY


@dataclass
class Checkpoint:
    tokens: tuple[int, ...]  # the prefix whose state this is: its position is len(tokens)
    data: bytearray

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass
class CheckpointStats:
    held: int = 0
    held_bytes: int = 0
    saved: int = 0
    restored: int = 0
    evicted: int = 0


class CheckpointStore:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, budget_bytes)
        self._by_tokens: collections.OrderedDict[tuple[int, ...], Checkpoint] = collections.OrderedDict()
        self._lasting: set[tuple[int, ...]] = set()  # first messages' ends: evicted last
        self.stats = CheckpointStats()

    def __len__(self) -> int:
        return len(self._by_tokens)

    def has(self, tokens: list[int]) -> bool:
        key = tuple(tokens)
        if key in self._by_tokens:
            self._by_tokens.move_to_end(key)
            return True
        return False

    def matching(self, prompt: list[int], limit: int) -> list[Checkpoint]:
        """The checkpoints of at most `limit` tokens that `prompt` starts with, longest first."""
        found = []
        for c in self._by_tokens.values():
            size = len(c.tokens)
            if size <= limit and c.tokens[0] == prompt[0] and tuple(prompt[:size]) == c.tokens:
                found.append(c)
        return sorted(found, key=lambda c: len(c.tokens), reverse=True)

    def used(self, checkpoint: Checkpoint) -> None:
        """`checkpoint` was restored: counted, and evicted last."""
        self.stats.restored += 1
        if checkpoint.tokens in self._by_tokens:
            self._by_tokens.move_to_end(checkpoint.tokens)

    def drop(self, checkpoint: Checkpoint) -> None:
        """Forget `checkpoint` (it could not be restored: it would fail again)."""
        if self._by_tokens.pop(checkpoint.tokens, None) is not None:
            self._lasting.discard(checkpoint.tokens)
            self._count()

    def save(self, ctx: Any, seq_id: int, tokens: list[int], lasting: bool = False) -> bool:
        """Save the recurrent part of `seq_id`, which has decoded exactly `tokens` (`lasting`: the
        end of its first message, which other conversations may share: evicted last)."""
        key = tuple(tokens)
        if not key or self.has(tokens):
            return bool(key)
        size = int(llama_cpp.llama_state_seq_get_size_ext(ctx, seq_id, PARTIAL))
        if size <= 0 or size > self.budget_bytes:
            return False
        while self.stats.held_bytes + size > self.budget_bytes and self._by_tokens:
            self._drop_oldest()
        data = bytearray(size)
        buffer = (ctypes.c_uint8 * size).from_buffer(data)
        written = int(llama_cpp.llama_state_seq_get_data_ext(ctx, buffer, size, seq_id, PARTIAL))
        del buffer  # the bytearray may not be resized while a ctypes view holds it
        if written != size:
            return False
        self._by_tokens[key] = Checkpoint(key, data)
        if lasting:
            self._lasting.add(key)
        self.stats.saved += 1
        self._count()
        return True

    def restore(self, ctx: Any, seq_id: int, checkpoint: Checkpoint) -> bool:
        """Replace the recurrent part of `seq_id` with `checkpoint` (its attention cells, if any,
        must already hold the checkpoint's tokens)."""
        size = checkpoint.size
        buffer = (ctypes.c_uint8 * size).from_buffer(checkpoint.data)
        try:
            read = int(llama_cpp.llama_state_seq_set_data_ext(ctx, buffer, size, seq_id, PARTIAL))
        finally:
            del buffer
        return read == size

    def clear(self) -> None:
        self._by_tokens.clear()
        self._lasting.clear()
        self._count()

    def _drop_oldest(self) -> None:
        """The least recently used checkpoint goes, a lasting one only when nothing else is left or
        the lasting ones hold more than half the budget."""
        lasting_bytes = sum(self._by_tokens[k].size for k in self._lasting)
        others = (k for k in self._by_tokens if k not in self._lasting)
        victim = None if 2 * lasting_bytes > self.budget_bytes else next(others, None)
        if victim is None:  # (the oldest lasting one)
            victim = next((k for k in self._by_tokens if k in self._lasting), next(iter(self._by_tokens)))
        del self._by_tokens[victim]
        self._lasting.discard(victim)
        self.stats.evicted += 1
        self._count()

    def _count(self) -> None:
        self.stats.held = len(self._by_tokens)
        self.stats.held_bytes = sum(c.size for c in self._by_tokens.values())
