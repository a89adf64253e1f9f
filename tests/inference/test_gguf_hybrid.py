"""Pendra's random-weight GGUFs of llama.cpp's hybrid architectures load and decode in llama.cpp
through the low-level API, as the scheduler drives it (one unified KV cache, several sequences):
`qwen35` and `qwen35moe` (Gated DeltaNet + gated attention), `granitehybrid` (Mamba-2 + attention).
llama.cpp calls each hybrid; a prompt rendered with the file's own chat template and tokenized
with its real vocabulary decodes to finite, varied logits and greedy text that is noise but not one
token repeated; a recurrent tail cannot be cut back; and a sequence's recurrent state at
Qwen3.6-27B's DeltaNet widths is as large as those widths say."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest
from pendra_inference.backends import activate
from pendra_inference.formats.templates import ChatTemplate
from pendra_inference.gguf_hybrid import QWEN36_27B_DELTANET

from tests.support.hybrids import write_granite_hybrid, write_qwen35

WRITERS: dict[str, Callable[[Path], Path]] = {
    "qwen35": lambda path: write_qwen35(path),
    "qwen35moe": lambda path: write_qwen35(path, moe=True),
    "granitehybrid": write_granite_hybrid,
}
QUESTION = (
    "Tell me about the tides of the northern seas and the moon that pulls them, in several long "
    "sentences, with the names of the harbours where the difference is greatest."
)
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": QUESTION},
]
PARTIAL_ONLY = llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY


@dataclass
class Loaded:
    model: Any
    vocab: Any
    ctx: Any
    batch: Any

    def decode(self, tokens: list[int], start: int, seq: int = 0) -> Any:
        """Decode `tokens` at positions from `start` in `seq`; the last one's logits."""
        batch = self.batch
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = i == len(tokens) - 1
        assert llama_cpp.llama_decode(self.ctx, batch) == 0
        n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, -1), shape=(n_vocab,)).copy()

    def piece(self, token: int) -> str:
        buf = ctypes.create_string_buffer(256)
        size = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(size, 0)].decode(errors="replace")

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        buf = (llama_cpp.llama_token * (len(raw) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), False, True)
        assert n > 0
        return list(buf[:n])


@pytest.fixture
def load() -> Iterator[Any]:
    activate()
    opened: list[Loaded] = []

    def open_model(path: Path) -> Loaded:
        model = llama_cpp.llama_model_load_from_file(
            str(path).encode(), llama_cpp.llama_model_default_params()
        )
        assert model, f"llama.cpp did not load {path.name}"
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = 512
        params.n_seq_max = 4
        params.kv_unified = True
        # One thread: two on a busy two-core host made decoding up to 100 times slower here.
        params.n_threads = params.n_threads_batch = 1
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, params)
        assert ctx, "llama.cpp could not create a context"
        loaded = Loaded(
            model, llama_cpp.llama_model_get_vocab(model), ctx, llama_cpp.llama_batch_init(512, 0, 1)
        )
        opened.append(loaded)
        return loaded

    yield open_model
    for loaded in opened:
        llama_cpp.llama_batch_free(loaded.batch)
        llama_cpp.llama_free(loaded.ctx)
        llama_cpp.llama_model_free(loaded.model)


@pytest.mark.parametrize("arch", list(WRITERS))
def test_hybrid_loads_and_generates_varied_text(arch: str, tmp_path: Path, load: Any) -> None:
    m = load(WRITERS[arch](tmp_path / f"{arch}.gguf"))
    assert llama_cpp.llama_model_is_hybrid(m.model)
    assert not llama_cpp.llama_model_is_recurrent(m.model)

    source = llama_cpp.llama_model_chat_template(m.model, None)
    assert source, "the file carries its chat template"
    eos = m.piece(llama_cpp.llama_vocab_eos(m.vocab))
    prompt = m.tokenize(ChatTemplate("gguf", source.decode(), (), True).render(MESSAGES, bos="", eos=eos))
    assert len(prompt) >= 50
    if arch.startswith("qwen35"):  # ChatML's markers are the vocabulary's special tokens
        assert m.piece(prompt[0]) == "<|im_start|>"

    logits = m.decode(prompt, 0)
    greedy = []
    for i in range(20):
        assert np.isfinite(logits).all()
        assert logits.max() > logits.min()
        greedy.append(int(np.argmax(logits)))
        logits = m.decode(greedy[-1:], len(prompt) + i)
    assert len(set(greedy)) > 1, f"greedy text is one token repeated: {greedy}"

    # A recurrent tail cannot be cut back: the scheduler restores checkpoints instead.
    memory = llama_cpp.llama_get_memory(m.ctx)
    assert not llama_cpp.llama_memory_seq_rm(memory, 0, len(prompt), -1)
    assert llama_cpp.llama_memory_seq_pos_max(memory, 0) == len(prompt) + 19


def test_recurrent_state_at_qwen36_27b_deltanet_widths(tmp_path: Path, load: Any) -> None:
    path = write_qwen35(tmp_path / "deltanet.gguf", shape=QWEN36_27B_DELTANET)
    assert path.stat().st_size < 20 * 1024 * 1024
    m = load(path)
    m.decode(m.tokenize("The state of one sequence is large."), 0)

    # Three DeltaNet layers (every 4th layer attends): each holds 48 value heads' 128 x 128 state
    # and the last 3 columns of the convolution over q, k (16 heads of 128 each) and v, in F32.
    shape = QWEN36_27B_DELTANET
    assert (shape.linear_v_heads, shape.linear_k_heads, shape.linear_head_dim, shape.conv_kernel) == (
        48,
        16,
        128,
        4,
    )
    per_layer = 48 * 128 * 128 + (4 - 1) * (2 * 16 * 128 + 48 * 128)
    expected = 3 * per_layer * 4
    assert shape.state_bytes("qwen35") == expected == 9_805_824
    size = llama_cpp.llama_state_seq_get_size_ext(m.ctx, 0, PARTIAL_ONLY)
    assert expected <= size <= expected + 4096  # plus llama.cpp's small per-sequence header
