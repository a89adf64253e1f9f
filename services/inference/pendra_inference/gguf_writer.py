"""Pendra's own GGUF writer: llama-architecture models of any shape with random weights.

The start-up self-check decodes one (`SELFCHECK_MODEL`: every matrix type the catalogue's files
carry, attention and mixture-of-experts layers, so the kernels serving runs run in the child); the
tests write tiny ones that llama.cpp loads and decodes exactly as it does real models; GPU
benchmarks write files of a real model's shape where weights cannot be copied. Only the text such
a model writes is noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a llama-architecture model."""

    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    rope_base: float = 10000.0
    context: int = 256
    n_expert: int = 0  # > 0: every layer's feed-forward is a mixture of this many experts
    n_expert_used: int = 0


# The smallest model that loads: what the tests probe and crash with.
PROBE = LlamaShape(n_embd=64, n_layer=1, n_head=2, n_head_kv=2, n_ff=128, n_vocab=320)


@dataclass(frozen=True)
class SelfCheckModel:
    """The self-check's model: one layer per matrix type, every dimension a multiple of what
    llama.cpp's AMX and repacked kernels ask (rows of 32, K-quant rows of 256), so that the
    CPU variant under test puts the weights where serving would and runs those kernels."""

    shape: LlamaShape
    layer_types: tuple[str, ...]
    embedding_type: str
    output_type: str


SELFCHECK_MODEL = SelfCheckModel(
    shape=LlamaShape(
        n_embd=256,
        n_layer=7,
        n_head=4,
        n_head_kv=2,
        n_ff=256,
        n_vocab=512,
        context=512,
        n_expert=4,
        n_expert_used=2,
    ),
    # Q4_K_M files are Q4_K and Q6_K; Q8_0, F16, BF16 and Q4_0 (Gemma's QAT) files; MXFP4 (gpt-oss).
    layer_types=("q4_k", "q6_k", "q8_0", "f16", "bf16", "q4_0", "mxfp4"),
    embedding_type="q4_k",
    output_type="q6_k",
)

# Bytes per block and block length of the types written from random blocks (ggml-common.h).
BLOCKS = {"q4_k": (144, 256), "q5_k": (176, 256), "q6_k": (210, 256), "mxfp4": (17, 32)}


def _half(value: float) -> Any:
    import numpy as np

    return np.array([value], dtype=np.float16).view(np.uint8)


def random_blocks(kind: str, shape: tuple[int, ...], rng: Any) -> Any:
    """Random weights of a type gguf cannot quantize, as raw blocks with scales chosen so each
    weight is about 1/sqrt(row length) in size. `shape` is the tensor's, rows last."""
    import numpy as np

    size, per_block = BLOCKS[kind]
    *outer, cols = shape
    n_blocks = int(np.prod(outer)) * (cols // per_block)
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    if kind in ("q4_k", "q5_k"):  # d, dmin (f16), 6-bit scales and mins, quants
        d = 0.25 / cols**0.5 / (32 * (7.5 if kind == "q4_k" else 15.5))
        raw[:, 0:2] = _half(d)
        raw[:, 2:4] = _half(d)
    elif kind == "q6_k":  # quants, then int8 scales, then d (f16) last
        raw[:, 208:210] = _half(0.25 / cols**0.5 / (64 * 16))
    elif kind == "mxfp4":  # an E8M0 exponent, then 4-bit values
        raw[:, 0] = 120
    return raw.reshape(*outer, (cols // per_block) * size)


def add_byte_vocab(writer: Any, n_vocab: int) -> None:
    """A byte-level SentencePiece vocabulary padded to `n_vocab`: <unk>, BOS 1 and EOS 2 (control),
    the 256 byte tokens, then plain ones."""
    tokens = [b"<unk>", b"<s>", b"</s>", *(f"<0x{i:02X}>".encode() for i in range(256))]
    tokens += [f"w{i}".encode() for i in range(n_vocab - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([2, 3, 3, *([6] * 256), *([1] * (len(tokens) - 259))])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def write_llama_gguf(
    path: Path,
    shape: LlamaShape,
    *,
    name: str,
    weights: str = "q8_0",
    seed: int = 0,
    layer_types: Sequence[str] | None = None,
    embedding_type: str | None = None,
    output_type: str | None = None,
) -> Path:
    """A complete llama GGUF of `shape` with random weights and a byte-level vocabulary padded to
    `n_vocab`. Matrices are in `weights` ("q8_0", so quantized kernels run, or "f16"), or layer i's
    in `layer_types[i]` (also "q4_0", "bf16", "q4_k", "q5_k", "q6_k", "mxfp4"); the embeddings are
    tied to the output unless `output_type` names a type for a separate output matrix."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.n_embd // shape.n_head)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_layer_norm_rms_eps(1e-5)
    if shape.n_expert:
        writer.add_expert_count(shape.n_expert)
        writer.add_expert_used_count(shape.n_expert_used)
    f16 = weights == "f16"
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.MOSTLY_Q8_0)
    add_byte_vocab(writer, shape.n_vocab)

    def random(*dims: int) -> Any:
        return (rng.standard_normal(dims, dtype=np.float32) / np.sqrt(dims[-1])).astype(np.float32)

    def matrix(tensor: str, kind: str, *dims: int) -> None:
        if kind in BLOCKS:
            qtype = gguf.GGMLQuantizationType[kind.upper()]
            writer.add_tensor(tensor, random_blocks(kind, dims, rng), raw_dtype=qtype)
            return
        data = random(*dims)
        if kind == "f16":
            writer.add_tensor(tensor, data.astype(np.float16))
        elif kind == "f32":
            writer.add_tensor(tensor, data)
        else:
            qtype = gguf.GGMLQuantizationType[kind.upper()]
            writer.add_tensor(tensor, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    ones = np.ones(shape.n_embd, dtype=np.float32)
    kv = shape.n_head_kv * (shape.n_embd // shape.n_head)
    if embedding_type is None:
        embeddings = random(shape.n_vocab, shape.n_embd)
        writer.add_tensor("token_embd.weight", embeddings.astype(np.float16) if f16 else embeddings)
    else:
        matrix("token_embd.weight", embedding_type, shape.n_vocab, shape.n_embd)
    writer.add_tensor("output_norm.weight", ones)
    if output_type is not None:
        matrix("output.weight", output_type, shape.n_vocab, shape.n_embd)
    for i in range(shape.n_layer):
        kind = layer_types[i % len(layer_types)] if layer_types else weights
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        matrix(f"blk.{i}.attn_q.weight", kind, shape.n_embd, shape.n_embd)
        matrix(f"blk.{i}.attn_k.weight", kind, kv, shape.n_embd)
        matrix(f"blk.{i}.attn_v.weight", kind, kv, shape.n_embd)
        matrix(f"blk.{i}.attn_output.weight", kind, shape.n_embd, shape.n_embd)
        if shape.n_expert:  # the router stays F32, as converters write it
            writer.add_tensor(f"blk.{i}.ffn_gate_inp.weight", random(shape.n_expert, shape.n_embd))
            matrix(f"blk.{i}.ffn_gate_exps.weight", kind, shape.n_expert, shape.n_ff, shape.n_embd)
            matrix(f"blk.{i}.ffn_up_exps.weight", kind, shape.n_expert, shape.n_ff, shape.n_embd)
            matrix(f"blk.{i}.ffn_down_exps.weight", kind, shape.n_expert, shape.n_embd, shape.n_ff)
        else:
            matrix(f"blk.{i}.ffn_gate.weight", kind, shape.n_ff, shape.n_embd)
            matrix(f"blk.{i}.ffn_up.weight", kind, shape.n_ff, shape.n_embd)
            matrix(f"blk.{i}.ffn_down.weight", kind, shape.n_embd, shape.n_ff)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_selfcheck_model(path: Path) -> Path:
    model = SELFCHECK_MODEL
    return write_llama_gguf(
        path,
        model.shape,
        name="pendra self-check",
        layer_types=model.layer_types,
        embedding_type=model.embedding_type,
        output_type=model.output_type,
    )
