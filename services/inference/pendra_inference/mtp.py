"""Speculative decoding with the model's own multi-token-prediction (MTP, "NextN") block.

Qwen3.5/3.6 (and DeepSeek V3, GLM 4.5, Step 3.5...) ship a small extra decoder block trained to
predict the token after next from the trunk's last hidden state and the next token. llama.cpp
loads it with the model (`load_mtp`) and runs it in a second context of type
`LLAMA_CONTEXT_TYPE_MTP` over the same weights, with a KV cache of its own for that one block:

* after every decode of the model, the MTP context decodes the same tokens, each paired with the
  trunk's hidden state at the token before it (`process`), so its cache follows the sequence;
* to draft, it decodes the pending token with the hidden state before it and picks the likeliest
  next token, then that token with the block's own hidden state, and so on (`draft`); the model
  checks the drafts as it checks any (scheduler `_verify`), so the answer is the one without
  speculation.

The hidden states cross between the contexts through `llama_set_embeddings_nextn` and
`llama_get_embeddings_nextn(_ith)`, which llama.cpp exports from its staging header
(`src/llama-ext.h`) as C++ functions: they are looked up here by their mangled names (Itanium on
Linux and macOS, MSVC on Windows). Where the library lacks them, or the file has no MTP block,
the model serves without speculation and says why. Chosen per model: `{"kind": "mtp",
"draft_tokens": 3}` in the sidecar's `options.speculative` or the catalogue entry's `speculative`.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import llama_cpp
import numpy as np

from pendra_inference.batch import Batch
from pendra_inference.sequence import common_prefix

logger = logging.getLogger(__name__)

LLAMA_CONTEXT_TYPE_MTP = 1

# The staging functions: (Itanium name, MSVC name), argument types, result type.
_SYMBOLS: dict[str, tuple[tuple[str, str], list[Any], Any]] = {
    "set_embeddings_nextn": (
        (
            "_Z26llama_set_embeddings_nextnP13llama_contextbb",
            "?llama_set_embeddings_nextn@@YAXPEAUllama_context@@_N1@Z",
        ),
        [ctypes.c_void_p, ctypes.c_bool, ctypes.c_bool],
        None,
    ),
    "get_embeddings_nextn": (
        (
            "_Z26llama_get_embeddings_nextnP13llama_context",
            "?llama_get_embeddings_nextn@@YAPEAMPEAUllama_context@@@Z",
        ),
        [ctypes.c_void_p],
        ctypes.POINTER(ctypes.c_float),
    ),
    "get_embeddings_nextn_ith": (
        (
            "_Z30llama_get_embeddings_nextn_ithP13llama_contexti",
            "?llama_get_embeddings_nextn_ith@@YAPEAMPEAUllama_context@@H@Z",
        ),
        [ctypes.c_void_p, ctypes.c_int32],
        ctypes.POINTER(ctypes.c_float),
    ),
}


def _library() -> Any:
    return llama_cpp.llama_cpp._lib  # noqa: SLF001 - the loaded libllama, whose symbols we need


def staging_functions() -> dict[str, Any]:
    """llama.cpp's MTP hand-off functions; ValueError where this build does not export them."""
    lib, found = _library(), {}
    for name, (mangled, argtypes, restype) in _SYMBOLS.items():
        for symbol in mangled:
            try:
                function = getattr(lib, symbol)
            except AttributeError:
                continue
            function.argtypes, function.restype = argtypes, restype
            found[name] = function
            break
        else:
            raise ValueError(f"this llama.cpp build does not export llama_{name} (the MTP hand-off)")
    return found


def has_mtp_block(model: Any) -> bool:
    return int(llama_cpp.llama_model_n_layer_nextn(model)) > 0


class MtpDraft:
    """The MTP block's context beside the model's, drafting for many sequences at once."""

    def __init__(
        self,
        model: Any,
        target: Any,
        *,
        n_ctx: int,
        n_seq_max: int,
        n_batch: int,
        n_ubatch: int,
        n_threads: int,
        flash_attn_type: int = -1,
        name: str = "",
    ) -> None:
        """An MTP context on `model` (loaded with its MTP block) beside the model's context
        `target`; ValueError, saying why, where it cannot draft."""
        self.name = name
        blocks = int(llama_cpp.llama_model_n_layer_nextn(model))
        if blocks == 0:
            raise ValueError("the model's file has no multi-token-prediction block")
        if blocks > 1:  # (Step 3.5's chained heads, one per draft step)
            raise ValueError(f"the model has {blocks} chained MTP blocks; Pendra drafts with one only")
        width = int(llama_cpp.llama_model_n_embd_out(model))
        if width != int(llama_cpp.llama_model_n_embd(model)):
            raise ValueError("the model's hidden state is not as wide as its embeddings: no MTP drafts")
        self.api = staging_functions()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_ubatch, n_batch)
        params.n_seq_max = n_seq_max
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = n_threads
        params.no_perf = True
        params.flash_attn_type = flash_attn_type
        params.ctx_type = LLAMA_CONTEXT_TYPE_MTP
        params.ctx_other = target
        params.n_rs_seq = 0
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise ValueError("llama.cpp could not create the model's MTP context")
        self.target = target
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))
        self.n_embd = width
        # Every row of the model's decodes carries its hidden state out; the MTP context's only
        # its output rows'.
        self.api["set_embeddings_nextn"](target, True, False)
        self.api["set_embeddings_nextn"](self.ctx, True, True)
        # Token ids, each with the hidden state it is paired with (as many as llama.cpp takes).
        self.size = int(llama_cpp.llama_n_batch(self.ctx))
        self.batch = Batch(self.size, embd=self.n_embd)
        assert self.batch.embd is not None
        self.embd = self.batch.embd
        # Sequence id: (the first position its MTP cells hold, the tokens they hold from there).
        self.held: dict[int, tuple[int, list[int]]] = {}
        # Sequence id: (position of the first row, the model's hidden states from there), kept
        # from its last decode for the next drafts and the next decode's first token.
        self.hidden: dict[int, tuple[int, np.ndarray]] = {}
        self.keep_rows = 1

    # -- following the model ------------------------------------------------------------------

    def process(
        self, token: np.ndarray, pos: np.ndarray, seq: np.ndarray, before: dict[int, list[int]]
    ) -> None:
        """After the model decoded `token`/`pos`/`seq` (its batch's rows), decode them in the MTP
        context too, for the sequences in `before` (id: the tokens it held before this decode):
        each token with the model's hidden state at the token before it."""
        try:
            self._process(token, pos, seq, before)
        except Exception as exc:  # noqa: BLE001 - the model goes on; drafts start again
            logger.warning("%s: the MTP context failed (%s); its cache starts again", self.name, exc)
            self.reset()

    def _process(
        self, token: np.ndarray, pos: np.ndarray, seq: np.ndarray, before: dict[int, list[int]]
    ) -> None:
        n = len(token)
        pointer = self.api["get_embeddings_nextn"](self.target)
        if not pointer or not n:
            return
        states = np.ctypeslib.as_array(pointer, shape=(n, self.n_embd))
        count = 0
        for seq_id, tokens in before.items():
            rows = np.flatnonzero(seq == seq_id)
            if not len(rows):
                continue
            rows = rows[np.argsort(pos[rows], kind="stable")]
            first = int(pos[rows[0]])
            # What its cells hold that is still the sequence's; the rest (a rejected draft, the
            # drafting cells, another prompt's) goes.
            base, held = self.held.get(seq_id, (0, []))
            end = base + common_prefix(held, tokens[base:] if base else tokens, max(0, first - base))
            llama_cpp.llama_memory_seq_rm(self.memory, seq_id, end, -1)
            del held[end - base :]
            if end < first or base > first:  # a gap (a prefix shared from elsewhere): start here
                llama_cpp.llama_memory_seq_rm(self.memory, seq_id, -1, -1)
                base, held = first, []
            if count + len(rows) > self.size:
                self._decode(count, set(before))
                count = 0
            at = count
            given = token[rows].tolist()
            count = self.batch.put(at, given, first, seq_id)
            state = self._state_at(seq_id, first - 1)
            self.embd[at] = 0.0 if state is None else state  # (zeros: only this cell is the worse)
            self.embd[at + 1 : count] = states[rows[:-1]]
            held.extend(given)
            self.held[seq_id] = (base, held)
            kept = rows[-self.keep_rows :]
            self.hidden[seq_id] = (int(pos[kept[0]]), states[kept].copy())
        if count:
            self._decode(count, set(before))

    def _state_at(self, seq_id: int, position: int) -> np.ndarray | None:
        """The model's hidden state at `position` of the sequence, where its last decode gave it."""
        start, rows = self.hidden.get(seq_id, (0, None))
        if rows is not None and start <= position < start + len(rows):
            return rows[position - start]  # type: ignore[no-any-return]
        return None

    def _decode(self, count: int, running: set[int]) -> None:
        """Decode the batch's first `count` rows; where the cache is full, the cells of sequences
        other than `running` ones (cached prefixes) make room first."""
        self.batch.raw.n_tokens = count
        rc = int(llama_cpp.llama_decode(self.ctx, self.batch.raw))
        if rc == 1:
            for seq_id in [s for s in self.held if s not in running]:
                self.forget(seq_id)
            rc = int(llama_cpp.llama_decode(self.ctx, self.batch.raw))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for the MTP batch")

    # -- drafting -----------------------------------------------------------------------------

    def draft(self, wanted: list[tuple[int, list[int], int, int]]) -> dict[int, list[int]]:
        """For each (sequence id, its tokens, its pending token, at most how many): the tokens the
        MTP block writes next, greedily; only for sequences whose hidden state before the pending
        token the last decode gave."""
        try:
            return self._draft(wanted)
        except Exception as exc:  # noqa: BLE001 - the model goes on without drafts
            logger.warning("%s: the MTP context failed (%s); its cache starts again", self.name, exc)
            self.reset()
            return {}

    def _draft(self, wanted: list[tuple[int, list[int], int, int]]) -> dict[int, list[int]]:
        going: list[tuple[int, int]] = []  # (sequence id, position of the token it decodes next)
        limits: dict[int, int] = {}
        for seq_id, tokens, pending, limit in wanted:
            position = len(tokens)
            base, held = self.held.get(seq_id, (0, []))
            state = self._state_at(seq_id, position - 1)
            short = base > position or base + len(held) < position
            if limit <= 0 or state is None or short or len(going) == self.size:
                continue  # its cells or the hidden state before its pending token are not there
            # Its cells from the pending token's on are the last step's drafts: they go.
            llama_cpp.llama_memory_seq_rm(self.memory, seq_id, position, -1)
            del held[position - base :]
            row = len(going)
            self.batch.put(row, [pending], position, seq_id, last=True)
            self.embd[row] = state
            going.append((seq_id, position))
            limits[seq_id] = limit
        drafts: dict[int, list[int]] = {seq_id: [] for seq_id, _ in going}
        get_state = self.api["get_embeddings_nextn_ith"]
        while going:
            self._decode(len(going), set(limits))
            following: list[tuple[int, int]] = []
            for row, (seq_id, position) in enumerate(going):
                logits = llama_cpp.llama_get_logits_ith(self.ctx, row)
                token = int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())
                drafts[seq_id].append(token)
                if len(drafts[seq_id]) < limits[seq_id]:
                    # The next draft: this token, with the block's own hidden state before it.
                    at = len(following)
                    self.embd[at] = np.ctypeslib.as_array(get_state(self.ctx, row), shape=(self.n_embd,))
                    self.batch.put(at, [token], position + 1, seq_id, last=True)
                    following.append((seq_id, position + 1))
            going = following
        return {seq_id: d for seq_id, d in drafts.items() if d}

    # -- the cache ----------------------------------------------------------------------------

    def forget(self, seq_id: int) -> None:
        """The model's cells of the sequence went: its MTP cells go too."""
        self.hidden.pop(seq_id, None)
        if self.held.pop(seq_id, None) is not None:
            llama_cpp.llama_memory_seq_rm(self.memory, seq_id, -1, -1)

    def cached(self, seq_id: int, size: int) -> None:
        """The sequence is cached with its first `size` cells for its prefix: the block's cells
        stay with them, and those after them (the last step's drafts) go."""
        llama_cpp.llama_memory_seq_rm(self.memory, seq_id, size, -1)
        if seq_id in self.hidden:  # (the states of the cut drafts go too)
            start, rows = self.hidden[seq_id]
            if size > start:
                self.hidden[seq_id] = (start, rows[: size - start])
            else:
                del self.hidden[seq_id]
        if seq_id in self.held:
            base, held = self.held[seq_id]
            del held[max(0, size - base) :]

    def copy(self, source: int, target: int, size: int) -> None:
        """The model shared `size` cells of `source` with `target`: the MTP cells follow."""
        llama_cpp.llama_memory_seq_rm(self.memory, target, -1, -1)
        self.hidden.pop(target, None)
        base, held = self.held.get(source, (0, []))
        if base == 0 and len(held) >= size:
            llama_cpp.llama_memory_seq_cp(self.memory, source, target, 0, size)
            self.held[target] = (0, held[:size])
        else:
            self.held.pop(target, None)

    def reset(self) -> None:
        llama_cpp.llama_memory_clear(self.memory, True)
        self.held.clear()
        self.hidden.clear()

    def close(self) -> None:
        if self.ctx:
            self.api["set_embeddings_nextn"](self.target, False, False)
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
            self.batch.free()
