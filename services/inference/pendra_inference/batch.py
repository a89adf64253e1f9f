"""llama.cpp's batch for the scheduler, the draft model and the MTP block: rows written a slice at
a time."""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np

_INT32_P = ctypes.POINTER(ctypes.c_int32)


class Batch:
    """llama.cpp's batch, its arrays seen through numpy so that rows are written a slice at a time.
    Each row holds one sequence id, in one array of ours (llama_batch_init gives each row its own
    allocation, which `free` puts back before llama.cpp frees them). With `embd`, each row carries
    an embedding of that width beside its token id (llama.cpp's MTP input: the model's hidden state
    paired with the token); llama_batch_init then gives no token array, so it is one of ours too."""

    def __init__(self, size: int, embd: int = 0) -> None:
        self.raw = llama_cpp.llama_batch_init(size, embd, 1)
        raw = self.raw
        self.embd: np.ndarray | None = None
        if embd:
            self.embd = np.ctypeslib.as_array(raw.embd, shape=(size, embd))
            self._tokens = np.zeros(size, dtype=np.int32)
            raw.token = ctypes.cast(self._tokens.ctypes.data, _INT32_P)
        self.token = np.ctypeslib.as_array(raw.token, shape=(size,))
        self.pos = np.ctypeslib.as_array(raw.pos, shape=(size,))
        self.logits = np.ctypeslib.as_array(raw.logits, shape=(size,))
        np.ctypeslib.as_array(raw.n_seq_id, shape=(size,))[:] = 1
        self.seq_id = np.zeros(size, dtype=np.int32)
        # (addresses as ints: ctypes' raw.seq_id[i] is a view of the slot, not a copy of it)
        self._given = [ctypes.cast(raw.seq_id[i], ctypes.c_void_p).value or 0 for i in range(size)]
        base = self.seq_id.ctypes.data
        for i in range(size):
            raw.seq_id[i] = ctypes.cast(base + 4 * i, _INT32_P)

    def put(
        self,
        at: int,
        tokens: list[int],
        position: int,
        seq_id: int,
        *,
        last: bool = False,
        every: bool = False,
    ) -> int:
        """Rows from `at` for `tokens` of one sequence from `position` on, logits for each (`every`)
        or the last one (`last`); returns the next free row."""
        end = at + len(tokens)
        self.token[at:end] = tokens
        self.pos[at:end] = np.arange(position, position + len(tokens), dtype=np.int32)
        self.seq_id[at:end] = seq_id
        self.logits[at:end] = 1 if every else 0
        if last and end > at:
            self.logits[end - 1] = 1
        return end

    def free(self) -> None:
        for i, given in enumerate(self._given):
            self.raw.seq_id[i] = ctypes.cast(given, _INT32_P)
        if self.embd is not None:
            self.raw.token = _INT32_P()  # ours: llama.cpp must not free it
        llama_cpp.llama_batch_free(self.raw)
