"""What a chat model's memory is made of, and how much of it a context holds.

A model keeps one of four kinds of memory per sequence, and the scheduler has one policy per kind:

- `attention`: a KV cell per token (llama, Qwen 3). Any prefix of a cached sequence can be shared
  with a new request: llama.cpp copies cell ranges.
- `swa`: attention whose window slides on most layers (Gemma 2 and 3): cells a sequence no longer
  sees may be reused, so a cached sequence as long as the window is shared whole, or up to a
  checkpoint of its sliding-window layers' last window (`swa_state_bytes`).
- `recurrent`: one state per sequence whatever its length (Mamba, RWKV). A state cannot be cut back
  to an earlier position: it is shared whole, or restored from a checkpoint saved at a position.
- `hybrid`: both (Qwen3.5/3.6 `qwen35`, `qwen35moe`: three Gated DeltaNet layers to one attention
  layer; Granite 4 `-h`: Mamba-2 and attention). Attention cells are shared by range and the
  recurrent part comes from a checkpoint at exactly the shared position.

llama.cpp allocates a recurrent state for every sequence a context may hold (`n_seq_max`), so for
the last two kinds that count comes from the memory budget, never from llama.cpp's maximum.

The figures here are read from the GGUF header before loading (the registry's budget, the
console's fit); they follow llama.cpp's own sizes (`llama_hparams::n_embd_r/n_embd_s`, F16 KV cells,
F32 recurrent states), and a test holds them to what llama.cpp allocates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pendra_shared.gguf_header import ArrayInfo, read_header

ATTENTION, SWA, RECURRENT, HYBRID = "attention", "swa", "recurrent", "hybrid"
KINDS = (ATTENTION, SWA, RECURRENT, HYBRID)
# Architectures whose every layer is recurrent (no attention at all).
PURELY_RECURRENT = ("mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7")
# Hybrids that say which layers attend by an interval (every n-th layer), llama.cpp's default 4.
BY_INTERVAL = ("qwen35", "qwen35moe", "qwen3next")
# Hybrids whose every layer has both attention and a state-space mixer (Falcon-H1).
EVERY_LAYER_BOTH = ("falcon-h1",)


def kind_of(model: Any) -> str:
    """The kind of a loaded llama.cpp model, as llama.cpp itself reports it."""
    import llama_cpp

    if llama_cpp.llama_model_is_hybrid(model):
        return HYBRID
    if llama_cpp.llama_model_is_recurrent(model):
        return RECURRENT
    return SWA if int(llama_cpp.llama_model_n_swa(model)) > 0 else ATTENTION


@dataclass(frozen=True)
class MemoryShape:
    """Per-token and per-sequence bytes of a model's memory, read from its GGUF header."""

    kind: str
    kv_bytes_per_token: int  # F16 keys and values of every attention layer
    state_bytes: int  # F32 recurrent state of one sequence, every recurrent layer (0: none)
    overhead_bytes: int = 0  # the tokenizer's tables and llama.cpp's compute and output buffers
    swa_state_bytes: int = 0  # a `swa` model's checkpoint: one window of its sliding-window layers
    mtp_kv_bytes_per_token: int = 0  # the multi-token-prediction blocks' cache, where they are used

    def kv_bytes(self, cells: int) -> int:
        return self.kv_bytes_per_token * cells

    def context_bytes(self, cells: int, sequences: int) -> int:
        """A context of `cells` KV cells holding `sequences` recurrent states."""
        return self.kv_bytes(cells) + self.state_bytes * sequences


# Beside its weights and cache a loaded model holds its tokenizer's tables and llama.cpp's compute
# and output buffers. Measured here (RSS) on a 152k-token Qwen vocabulary with small layers: the
# model and its tokenizer 55 MB beyond the weights, a context's buffers about 15 MB.
BYTES_PER_VOCAB_TOKEN = 384
BUFFER_BYTES = 24 * 1024**2


UNKNOWN = MemoryShape(ATTENTION, 0, 0)

# The sliding-window pattern llama.cpp assumes when a file gives none (`load_swa_pattern`): of every
# n layers the last attends to every position. Other architectures are counted as sliding on every
# layer, an upper bound.
SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "gemma-embedding": 6, "gpt-oss": 2, "cohere2": 4}
# Besides its keys and values llama.cpp saves a cell's position, sequence count and sequence id.
SWA_CELL_BYTES = 12


def memory_shape(path: Path, **limits: int) -> MemoryShape:
    """The memory shape of the GGUF at `path` (read with the store's header `limits`); an
    unreadable header gives zeros, as the registry's other estimates do."""
    try:
        meta = read_header(path, **limits).metadata
    except (OSError, ValueError):
        return UNKNOWN
    return shape_of(meta)


def shape_of(meta: dict[str, Any]) -> MemoryShape:
    arch = str(meta.get("general.architecture", ""))

    def value(key: str, default: Any = 0) -> Any:
        return meta.get(f"{arch}.{key}", default)

    def num(key: str, default: int = 0) -> int:
        v = value(key, default)
        if isinstance(v, list):
            v = max(v) if v else default
        return int(v) if isinstance(v, int | float) else default

    # Multi-token-prediction layers come last in the block count; llama.cpp skips them unless
    # speculation asks for them (their cache: mtp_kv_bytes_per_token).
    layers = max(0, num("block_count") - num("nextn_predict_layers"))
    n_embd = num("embedding_length")
    heads = num("attention.head_count", 1) or 1
    kv_heads = value("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        per_layer_kv = [int(h) for h in kv_heads]
    else:
        per_layer_kv = [int(kv_heads or heads)] * layers
    per_layer_kv = (per_layer_kv + [per_layer_kv[-1] if per_layer_kv else heads] * layers)[:layers]
    key_dim = num("attention.key_length", n_embd // heads)
    value_dim = num("attention.value_length", n_embd // heads)

    recurrent_layers = _recurrent_layers(arch, meta, layers, per_layer_kv, value)
    if arch in EVERY_LAYER_BOTH:
        attention = list(range(layers))
    else:
        attention = [i for i in range(layers) if i not in recurrent_layers]
    kv_per_token = sum(per_layer_kv[i] * (key_dim + value_dim) * 2 for i in attention)
    state = len(recurrent_layers) * _state_floats(num, n_embd) * 4
    if recurrent_layers and attention:
        kind = HYBRID
    elif recurrent_layers:
        kind = RECURRENT
    else:
        kind = SWA if num("attention.sliding_window") > 0 else ATTENTION
    swa_state = 0
    if kind == SWA:
        sliding = _swa_layers(arch, layers, value)
        per_cell = sum(per_layer_kv[i] * (key_dim + value_dim) * 2 for i in sliding) + SWA_CELL_BYTES
        swa_state = num("attention.sliding_window") * per_cell
    tokens = meta.get("tokenizer.ggml.tokens")
    n_vocab = tokens.length if isinstance(tokens, ArrayInfo) else len(tokens or ())
    overhead = BYTES_PER_VOCAB_TOKEN * n_vocab + BUFFER_BYTES
    # An MTP block attends like the trunk's attention layers, in a context of its own.
    mtp_kv = (
        num("nextn_predict_layers")
        * (per_layer_kv[attention[-1]] if attention else heads)
        * (key_dim + value_dim)
        * 2
    )
    return MemoryShape(kind, kv_per_token, state, overhead, swa_state, mtp_kv)


def _swa_layers(arch: str, layers: int, value: Any) -> list[int]:
    """The layers whose window slides: a per-layer flag array, or every layer but the last of each
    `sliding_window_pattern` (llama_hparams::set_swa_pattern; 0: all of them)."""
    pattern = value("attention.sliding_window_pattern", None)
    if isinstance(pattern, list) and pattern:
        return [i for i, f in enumerate(pattern[:layers]) if f]
    n = pattern if isinstance(pattern, int) else SWA_PATTERN.get(arch, 0)
    return [i for i in range(layers) if n == 0 or i % n < n - 1]


def _recurrent_layers(
    arch: str, meta: dict[str, Any], layers: int, per_layer_kv: list[int], value: Any
) -> set[int]:
    if arch in PURELY_RECURRENT or arch in EVERY_LAYER_BOTH:
        return set(range(layers))
    flags = value("attention.recurrent_layers", None)
    if isinstance(flags, list) and flags:
        return {i for i, f in enumerate(flags[:layers]) if f}
    if arch in BY_INTERVAL or f"{arch}.full_attention_interval" in meta:
        interval = int(value("full_attention_interval", 4) or 4)
        return {i for i in range(layers) if (i + 1) % interval != 0}
    # Hybrids that mark their recurrent layers with no KV heads (Granite 4 -h, LFM2).
    state_keys = ("ssm.state_size", "shortconv.l_cache", "wkv.head_size")
    if any(f"{arch}.{key}" in meta for key in state_keys):
        return {i for i, h in enumerate(per_layer_kv) if h == 0}
    return set()


def _state_floats(num: Callable[..., int], n_embd: int) -> int:
    """Floats of one recurrent layer's state for one sequence: llama_hparams' n_embd_r + n_embd_s."""
    wkv = num("wkv.head_size")
    if wkv:
        return num("token_shift_count", 2) * n_embd + n_embd * wkv
    l_cache = num("shortconv.l_cache")
    if l_cache:
        return n_embd * (l_cache - 1)
    d_conv, d_inner = num("ssm.conv_kernel"), num("ssm.inner_size")
    d_state, n_group = num("ssm.state_size"), num("ssm.group_count")
    conv = max(0, d_conv - 1) * (d_inner + 2 * n_group * d_state)
    return conv + d_state * d_inner
