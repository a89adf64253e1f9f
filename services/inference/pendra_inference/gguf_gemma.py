"""Random-weight GGUFs of Gemma 3 (`gemma3`): attention whose window slides on most layers.

A Gemma 3 layer attends either to the last `sliding_window` positions (a sliding-window layer, its
keys and values in llama.cpp's SWA cache) or to every position (a global layer, in the base cache);
of every `sliding_window_pattern` layers the last is global (llama.cpp's default pattern is 6). Each
layer has query and key norms and norms after attention and after the GELU feed-forward; the
embeddings are scaled by sqrt(n_embd) and tied to the output. Tensor names, shapes and keys follow
the vendored llama.cpp's loader (`src/models/gemma3.cpp`) and converter (`Gemma3Model`).

The vocabulary is the byte-level one `gguf_writer` gives its llamas (`<unk>`, `<s>`, `</s>`, 256
byte tokens, then filler), so prompts are written as token ids; only the text such a model writes
is noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from pendra_inference.gguf_writer import add_byte_vocab


@dataclass(frozen=True)
class GemmaShape:
    """The dimensions of a Gemma 3 model. Layer i slides when i % swa_pattern < swa_pattern - 1."""

    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    sliding_window: int
    swa_pattern: int = 6
    context: int = 4096
    rope_base: float = 1_000_000.0  # the global layers'
    rope_base_swa: float = 10_000.0  # the sliding-window layers'


# Four layers, the second and fourth global, and a window of 32 positions: prompts of a hundred
# tokens outgrow it.
GEMMA3_TINY = GemmaShape(
    n_embd=128, n_layer=4, n_head=4, n_head_kv=2, head_dim=32, n_ff=256, n_vocab=320,
    sliding_window=32, swa_pattern=2,
)  # fmt: skip


def write_gemma3_gguf(
    path: Path,
    shape: GemmaShape = GEMMA3_TINY,
    *,
    name: str = "tiny random gemma3",
    weights: str = "q8_0",
    seed: int = 0,
) -> Path:
    """A complete `gemma3` GGUF of `shape`: matrices in `weights` ("q8_0", "f16" or "f32"; random,
    about 1/sqrt(row length)), norms F32 ones, and the byte-level vocabulary padded to `n_vocab`."""
    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[weights.upper()]
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType["ALL_F32" if weights == "f32" else f"MOSTLY_{weights.upper()}"])
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_rope_freq_base_swa(shape.rope_base_swa)
    writer.add_sliding_window(shape.sliding_window)
    writer.add_sliding_window_pattern(shape.swa_pattern)
    add_byte_vocab(writer, shape.n_vocab)

    def matrix(tensor: str, rows: int, cols: int) -> None:
        data = rng.standard_normal((rows, cols), dtype=np.float32) / np.float32(np.sqrt(cols))
        writer.add_tensor(tensor, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def ones(tensor: str, size: int) -> None:
        writer.add_tensor(tensor, np.ones(size, dtype=np.float32))

    e, q, kv = shape.n_embd, shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim
    matrix("token_embd.weight", shape.n_vocab, e)
    ones("output_norm.weight", e)
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        ones(b + "attn_norm.weight", e)
        matrix(b + "attn_q.weight", q, e)
        matrix(b + "attn_k.weight", kv, e)
        matrix(b + "attn_v.weight", kv, e)
        matrix(b + "attn_output.weight", e, q)
        ones(b + "attn_q_norm.weight", shape.head_dim)
        ones(b + "attn_k_norm.weight", shape.head_dim)
        ones(b + "post_attention_norm.weight", e)
        ones(b + "ffn_norm.weight", e)
        matrix(b + "ffn_gate.weight", shape.n_ff, e)
        matrix(b + "ffn_up.weight", shape.n_ff, e)
        matrix(b + "ffn_down.weight", e, shape.n_ff)
        ones(b + "post_ffw_norm.weight", e)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
