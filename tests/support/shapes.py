"""GGUF files with the shape of real models and random weights, written with the `gguf` package.

Model weights cannot travel to a GPU machine lent for a check; a file of a real model's shape can
be made there in seconds. It loads, offloads and decodes exactly like the real model (the same
tensor sizes, so the same memory traffic and tokens/s); only the text it writes is noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np


@dataclass(frozen=True)
class Shape:
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    rope_base: float
    context: int


SHAPES = {
    # meta-llama/Llama-3.2-1B (config.json): 1.24 B parameters, tied embeddings.
    "llama-3.2-1b": Shape(2048, 16, 32, 8, 8192, 128256, 500000.0, 131072),
    # meta-llama/Llama-3.1-8B: 8.0 B parameters.
    "llama-3.1-8b": Shape(4096, 32, 32, 8, 14336, 128256, 500000.0, 131072),
}


def write_shaped_gguf(path: Path, shape_name: str, *, f16: bool = True, seed: int = 0) -> Path:
    """A llama-architecture GGUF of `shape_name`'s exact dimensions (F16 or F32 weights) with a
    byte-level SentencePiece vocabulary padded to the real vocabulary size."""
    shape = SHAPES[shape_name]
    dtype = np.float16 if f16 else np.float32
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"random weights in the shape of {shape_name}")
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.n_embd // shape.n_head)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    tokens = [b"<unk>", b"<s>", b"</s>", *(f"<0x{i:02X}>".encode() for i in range(256))]
    tokens += [f"w{i}".encode() for i in range(shape.n_vocab - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([2, 3, 3, *([6] * 256), *([1] * (len(tokens) - 259))])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def weights(*dims: int) -> np.ndarray:
        scale = 1.0 / np.sqrt(dims[-1])
        return (rng.standard_normal(dims, dtype=np.float32) * scale).astype(dtype)

    ones = np.ones(shape.n_embd, dtype=np.float32)
    head_dim = shape.n_embd // shape.n_head
    writer.add_tensor("token_embd.weight", weights(shape.n_vocab, shape.n_embd))
    writer.add_tensor("output_norm.weight", ones)
    for i in range(shape.n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.attn_q.weight", weights(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weights(shape.n_head_kv * head_dim, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weights(shape.n_head_kv * head_dim, shape.n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weights(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weights(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weights(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weights(shape.n_embd, shape.n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
