"""Random-weight GGUFs of llama.cpp's hybrid architectures, with real tokenizers and templates.

`qwen35` and `qwen35moe` (Qwen3.5/3.6): Gated DeltaNet layers (a recurrent state per sequence) with
a gated full-attention layer every `attention_interval`-th; `qwen35moe` has routed experts plus a
gated shared expert. `granitehybrid` (Granite 4.0 "-h"): Mamba-2 layers and attention layers
without positions (NoPE), the attention layers marked by their non-zero `head_count_kv`.
Tensor names, shapes and keys follow the vendored llama.cpp's loaders (`src/models/qwen35.cpp`,
`qwen35moe.cpp`, `granite-hybrid.cpp`) and converters (`conversion/qwen.py`, `granite.py`).

The tokenizer is copied from one of llama.cpp's vocab-only GGUFs and the chat template is a real
one (`gguf_vocab.TOKENIZERS` names both per architecture), so prompts tokenize as the real models'
do. Tensors are generated and written one at a time, so a file of a real model's full shape
(`QWEN36_27B`, for GPU benchmarks) needs memory for one tensor only; write those in "q4_k" or
"q6_k" (random blocks: about 2 minutes for the 27B here) rather than "q8_0" (numpy quantizes at
some 10M weights a second: most of an hour).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from pendra_inference.gguf_vocab import Writer, add_tokenizer
from pendra_inference.gguf_writer import BLOCKS, random_blocks

ARCHITECTURES = ("qwen35", "qwen35moe", "granitehybrid", "mamba2")


MAMBA = ("granitehybrid", "mamba2")  # architectures whose recurrent layers are Mamba-2


@dataclass(frozen=True)
class HybridShape:
    """The dimensions of a hybrid model. Layer i attends when (i + 1) % attention_interval == 0;
    the others are recurrent: Gated DeltaNet (`linear_*`) in qwen35/qwen35moe, Mamba-2 (`mamba_*`,
    d_inner = 2 * n_embd, the only expansion llama.cpp supports) in granitehybrid."""

    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int  # the dense feed-forward's width, or each routed expert's
    attention_interval: int = 4
    conv_kernel: int = 4
    linear_k_heads: int = 0  # DeltaNet query/key heads (llama.cpp's ssm.group_count)
    linear_v_heads: int = 0  # DeltaNet value heads (ssm.time_step_rank)
    linear_head_dim: int = 0  # DeltaNet key and value head size (ssm.state_size)
    mamba_state: int = 0  # Mamba-2 d_state
    mamba_heads: int = 0
    mamba_groups: int = 1
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_shexp: int = 0  # the shared expert's width (0: none in granitehybrid, n_ff in qwen35moe)
    n_vocab: int = 0  # 0: the tokenizer's count; more: padded with unused tokens
    context: int = 4096
    rope_base: float = 10_000_000.0
    tied_embeddings: bool = True
    nextn_layers: int = 0  # qwen35: multi-token-prediction blocks after the trunk (Qwen3.6 has one)

    def recurrent(self, layer: int) -> bool:
        return self.attention_interval == 0 or (layer + 1) % self.attention_interval != 0

    def ssm(self, arch: str) -> tuple[int, int, int, int, int]:
        """llama.cpp's ssm.conv_kernel, inner_size, state_size, time_step_rank, group_count."""
        if arch in MAMBA:
            return self.conv_kernel, 2 * self.n_embd, self.mamba_state, self.mamba_heads, self.mamba_groups
        d_inner = self.linear_head_dim * self.linear_v_heads
        return self.conv_kernel, d_inner, self.linear_head_dim, self.linear_v_heads, self.linear_k_heads

    def state_bytes(self, arch: str) -> int:
        """The F32 recurrent state of one sequence, as llama.cpp sizes it (n_embd_r + n_embd_s)."""
        d_conv, d_inner, d_state, _, n_group = self.ssm(arch)
        per_layer = (d_conv - 1) * (d_inner + 2 * n_group * d_state) + d_state * d_inner
        return 4 * per_layer * sum(self.recurrent(i) for i in range(self.n_layer))


# Tiny shapes for tests: four layers, the fourth attending (4 heads, 2 KV heads); DeltaNet with
# three value heads per query/key head as in the real models; Granite's Mamba-2 with 4 heads.
QWEN35_TINY = HybridShape(
    n_embd=64, n_layer=4, n_head=4, n_head_kv=2, head_dim=64, n_ff=128,
    linear_k_heads=2, linear_v_heads=6, linear_head_dim=32,
)  # fmt: skip
QWEN35MOE_TINY = HybridShape(
    n_embd=64, n_layer=4, n_head=4, n_head_kv=2, head_dim=64, n_ff=64,
    linear_k_heads=2, linear_v_heads=6, linear_head_dim=32, n_expert=4, n_expert_used=2, n_ff_shexp=64,
)  # fmt: skip
GRANITE_HYBRID_TINY = HybridShape(
    n_embd=64, n_layer=4, n_head=4, n_head_kv=2, head_dim=16, n_ff=128,
    mamba_state=16, mamba_heads=4, rope_base=10000.0,
)  # fmt: skip
# Pure Mamba-2 (every layer recurrent, no attention): llama.cpp's `recurrent` memory kind.
MAMBA2_TINY = HybridShape(
    n_embd=64, n_layer=2, n_head=0, n_head_kv=0, head_dim=0, n_ff=0, attention_interval=0,
    mamba_state=16, mamba_heads=4,
)  # fmt: skip
# Qwen3.6-27B's DeltaNet (config.json: 48 value heads, 16 query/key heads of 128, conv kernel 4), so
# a sequence's recurrent state is as large as in the real model's layers (3 MiB + 120 KiB each),
# in a few layers and the smallest n_embd Q8_0 rows allow, so the file stays small.
QWEN36_27B_DELTANET = HybridShape(
    n_embd=32, n_layer=4, n_head=4, n_head_kv=2, head_dim=64, n_ff=64,
    linear_k_heads=16, linear_v_heads=48, linear_head_dim=128,
)  # fmt: skip
# Qwen3.6-27B (and Qwen3.5-27B) in full, from its config.json: 64 layers, hidden 5120, 24 heads /
# 4 KV heads of 256 (partial rotary 0.25: 64 rope dims), FFN 17408, rope theta 1e7, 262144
# positions, 248320 vocabulary rows, untied output, and its one MTP block.
QWEN36_27B = HybridShape(
    n_embd=5120, n_layer=64, n_head=24, n_head_kv=4, head_dim=256, n_ff=17408, linear_k_heads=16,
    linear_v_heads=48, linear_head_dim=128, n_vocab=248320, context=262144, tied_embeddings=False,
    nextn_layers=1,
)  # fmt: skip


def _check(arch: str, shape: HybridShape) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"not a hybrid architecture this writer knows: {arch}")
    granite = arch in MAMBA
    mamba, linear = (
        ("mamba_state", "mamba_heads", "mamba_groups"),
        ("linear_k_heads", "linear_v_heads", "linear_head_dim"),
    )
    unset = [field for field in (mamba if granite else linear) if not getattr(shape, field)]
    if unset:
        raise ValueError(f"{arch} needs {', '.join(unset)}")
    if not granite and (arch == "qwen35moe") != (shape.n_expert > 0):
        raise ValueError(f"{arch} {'needs' if arch == 'qwen35moe' else 'has no'} experts")
    if shape.nextn_layers and arch != "qwen35":
        raise ValueError(f"this writer writes multi-token-prediction blocks for qwen35 only, not {arch}")


def _keys(writer: Any, arch: str, shape: HybridShape) -> None:
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer + shape.nextn_layers)
    if shape.nextn_layers:
        writer.add_uint32(f"{arch}.nextn_predict_layers", shape.nextn_layers)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_base)
    d_conv, d_inner, d_state, dt_rank, n_group = shape.ssm(arch)
    writer.add_ssm_conv_kernel(d_conv)
    writer.add_ssm_inner_size(d_inner)
    writer.add_ssm_state_size(d_state)
    writer.add_ssm_time_step_rank(dt_rank)
    writer.add_ssm_group_count(n_group)
    if shape.n_expert:
        writer.add_expert_count(shape.n_expert)
        writer.add_expert_used_count(shape.n_expert_used)
    if arch == "mamba2":  # every layer recurrent: nothing but the state-space keys
        writer.add_layer_norm_rms_eps(1e-5)
        return
    if arch == "granitehybrid":  # NoPE attention; recurrent layers have no KV heads
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_scaling_finetuned(False)
        writer.add_head_count_kv([0 if shape.recurrent(i) else shape.n_head_kv for i in range(shape.n_layer)])
        if shape.n_ff_shexp:
            writer.add_expert_shared_feed_forward_length(shape.n_ff_shexp)
        return
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_full_attention_interval(shape.attention_interval)
    rope = shape.head_dim // 4  # partial_rotary_factor 0.25; interleaved M-RoPE sections 11:11:10
    half = round(rope / 2 * 11 / 32)
    writer.add_rope_dimension_count(rope)
    writer.add_rope_dimension_sections([half, half, rope // 2 - 2 * half, 0])
    if arch == "qwen35moe":
        writer.add_expert_feed_forward_length(shape.n_ff)
        writer.add_expert_shared_feed_forward_length(shape.n_ff_shexp or shape.n_ff)


# A tensor: name, numpy shape (rows last), and either a weight type or an F32 fill: "ones",
# "zeros", "small" (random), "decay" (A = -exp(A_log)), "dt" (a dt bias) or "router".
Plan = tuple[str, tuple[int, ...], str]


def _plan(arch: str, shape: HybridShape, weights: str) -> Iterator[Plan]:
    e, w = shape.n_embd, weights
    _, d_inner, d_state, heads, groups = shape.ssm(arch)
    conv = d_inner + 2 * groups * d_state  # the convolved channels: x, B, C or v, q, k
    q, kv = shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim
    yield "token_embd.weight", (shape.n_vocab, e), w
    yield "output_norm.weight", (e,), "ones"
    if not shape.tied_embeddings:
        yield "output.weight", (shape.n_vocab, e), w
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (e,), "ones"
        if arch in MAMBA and shape.recurrent(i):
            yield b + "ssm_in.weight", (d_inner + conv + heads, e), w  # z, x B C, dt
            yield b + "ssm_conv1d.weight", (conv, shape.conv_kernel), "small"
            yield b + "ssm_conv1d.bias", (conv,), "zeros"
            yield b + "ssm_dt.bias", (heads,), "dt"
            yield b + "ssm_a", (heads, 1), "decay"
            yield b + "ssm_d", (heads, 1), "ones"
            yield b + "ssm_norm.weight", (groups, d_inner // groups), "ones"
            yield b + "ssm_out.weight", (e, d_inner), w
        elif shape.recurrent(i):  # Gated DeltaNet
            yield b + "attn_qkv.weight", (conv, e), w
            yield b + "attn_gate.weight", (d_inner, e), w
            yield b + "ssm_conv1d.weight", (conv, shape.conv_kernel), "small"
            yield b + "ssm_dt.bias", (heads,), "dt"
            yield b + "ssm_a", (heads,), "decay"
            yield b + "ssm_beta.weight", (heads, e), w
            yield b + "ssm_alpha.weight", (heads, e), w
            yield b + "ssm_norm.weight", (d_state,), "ones"
            yield b + "ssm_out.weight", (e, d_inner), w
        else:
            yield b + "attn_q.weight", (q * (1 if arch == "granitehybrid" else 2), e), w  # qwen: query + gate
            yield b + "attn_k.weight", (kv, e), w
            yield b + "attn_v.weight", (kv, e), w
            yield b + "attn_output.weight", (e, q), w
            if arch != "granitehybrid":
                yield b + "attn_q_norm.weight", (shape.head_dim,), "ones"
                yield b + "attn_k_norm.weight", (shape.head_dim,), "ones"
        if arch == "mamba2":
            continue  # a Mamba-2 block is its mixer alone
        yield (
            b + ("ffn_norm.weight" if arch == "granitehybrid" else "post_attention_norm.weight"),
            (e,),
            "ones",
        )
        ff, shared = shape.n_ff, shape.n_ff_shexp or (shape.n_ff if arch == "qwen35moe" else 0)
        if shape.n_expert:
            yield b + "ffn_gate_inp.weight", (shape.n_expert, e), "router"
            yield b + "ffn_gate_exps.weight", (shape.n_expert, ff, e), w
            yield b + "ffn_up_exps.weight", (shape.n_expert, ff, e), w
            yield b + "ffn_down_exps.weight", (shape.n_expert, e, ff), w
            if arch == "qwen35moe":
                yield b + "ffn_gate_inp_shexp.weight", (e,), "router"
            ff = shared
        if ff:
            suffix = "_shexp" if shape.n_expert else ""
            yield b + f"ffn_gate{suffix}.weight", (ff, e), w
            yield b + f"ffn_up{suffix}.weight", (ff, e), w
            yield b + f"ffn_down{suffix}.weight", (e, ff), w
    for i in range(shape.n_layer, shape.n_layer + shape.nextn_layers):
        yield from _nextn_block(f"blk.{i}.", shape, w)


def _nextn_block(b: str, shape: HybridShape, w: str) -> Iterator[Plan]:
    """A Qwen3.5/3.6 multi-token-prediction block (`qwen35.cpp`'s load_block_mtp): the token's
    embedding and the trunk's last hidden state, each normed, concatenated and projected back to
    n_embd, then a gated full-attention decoder block; the model's own embedding and output head."""
    e, q, kv = shape.n_embd, shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim
    yield b + "attn_norm.weight", (e,), "ones"
    yield b + "attn_q.weight", (2 * q, e), w
    yield b + "attn_k.weight", (kv, e), w
    yield b + "attn_v.weight", (kv, e), w
    yield b + "attn_output.weight", (e, q), w
    yield b + "attn_q_norm.weight", (shape.head_dim,), "ones"
    yield b + "attn_k_norm.weight", (shape.head_dim,), "ones"
    yield b + "post_attention_norm.weight", (e,), "ones"
    yield b + "ffn_gate.weight", (shape.n_ff, e), w
    yield b + "ffn_up.weight", (shape.n_ff, e), w
    yield b + "ffn_down.weight", (e, shape.n_ff), w
    yield b + "nextn.eh_proj.weight", (e, 2 * e), w
    yield b + "nextn.enorm.weight", (e,), "ones"
    yield b + "nextn.hnorm.weight", (e,), "ones"
    yield b + "nextn.shared_head_norm.weight", (e,), "ones"


def _qtype(kind: str) -> Any:
    if kind in ("ones", "zeros", "small", "router", "decay", "dt"):  # the F32 fills
        return gguf.GGMLQuantizationType.F32
    return gguf.GGMLQuantizationType[kind.upper()]


def _data(dims: tuple[int, ...], kind: str, rng: Any) -> Any:
    """The tensor's bytes: F32 fills, or random weights of about 1/sqrt(row length) in `kind`,
    generated a slab of rows at a time."""
    n = int(np.prod(dims))
    if kind in ("ones", "zeros"):
        return np.full(n, 1.0 if kind == "ones" else 0.0, dtype=np.float32).view(np.uint8)
    if kind == "decay":  # A_log ~ log U(1, 16), as Mamba-2 and Gated DeltaNet initialise it
        return (-rng.uniform(1.0, 16.0, n)).astype(np.float32).view(np.uint8)
    if kind == "dt":  # the inverse softplus of dt ~ logU(0.001, 0.1)
        dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), n))
        return np.log(np.expm1(dt)).astype(np.float32).view(np.uint8)
    *outer, cols = dims
    rows, step, slabs = n // cols, max(1, (1 << 24) // cols), []
    for start in range(0, rows, step):
        count = min(step, rows - start)
        if kind in BLOCKS:
            blocks = random_blocks(kind, (count, cols), rng)
            if kind in ("q4_k", "q5_k"):  # dmin as large as d biases every weight: centre them
                view = blocks.reshape(-1, BLOCKS[kind][0])
                d = view[:, 0:2].copy().view(np.float16)
                view[:, 2:4] = (d * np.float16(7.5 if kind == "q4_k" else 15.5)).view(np.uint8)
            slabs.append(blocks)
            continue
        x = rng.standard_normal((count, cols), dtype=np.float32) / np.float32(math.sqrt(cols))
        slabs.append(_encode(x, kind))
    return np.concatenate(slabs).reshape(*outer, -1)


def _encode(x: np.ndarray, kind: str) -> Any:
    """A given float32 tensor in the plan's type (no random-block types)."""
    qtype = _qtype(kind)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F32:
        data = x
    elif qtype == gguf.GGMLQuantizationType.F16:
        data = x.astype(np.float16)
    elif kind in BLOCKS:
        raise ValueError(f"a given tensor cannot be written in {kind}")
    else:
        data = gguf.quants.quantize(x, qtype)
    return np.ascontiguousarray(data).view(np.uint8).reshape(*x.shape[:-1], -1)


def write_hybrid_gguf(
    path: Path,
    arch: str,
    shape: HybridShape,
    *,
    vocab: Path,
    chat_template: str | None = None,
    name: str | None = None,
    weights: str = "q8_0",
    seed: int = 0,
    special: dict[int, str] | None = None,
    fixed: dict[str, np.ndarray] | None = None,
) -> Path:
    """A complete `arch` GGUF of `shape` with random weights (matrices in `weights`: "q8_0",
    "q4_0", "f16", "bf16", "f32", or from random blocks "q4_k", "q5_k", "q6_k"; norms and the
    recurrent layers' small vectors F32) and `vocab`'s tokenizer (`special`: token ids renamed and
    made control tokens, e.g. `gguf_vocab.QWEN_VISION_TOKENS`; `fixed`: tensors given by name, as
    float32 arrays of their shape, instead of random ones)."""
    _check(arch, shape)
    writer = Writer(str(path), arch)
    writer.add_name(name or f"random weights, {arch}")
    names = {"f32": "ALL_F32", "q4_k": "MOSTLY_Q4_K_M", "q5_k": "MOSTLY_Q5_K_M"}
    writer.add_file_type(gguf.LlamaFileType[names.get(weights, f"MOSTLY_{weights.upper()}")])
    shape = dataclasses.replace(
        shape, n_vocab=add_tokenizer(writer, vocab, chat_template, shape.n_vocab, special)
    )
    _keys(writer, arch, shape)
    plan = list(_plan(arch, shape, weights))
    for tensor, dims, kind in plan:
        qtype = _qtype(kind)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        byte_shape = (*dims[:-1], dims[-1] // block * size)
        writer.add_tensor_info(tensor, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    fixed = fixed or {}
    for tensor, dims, kind in plan:
        writer.write_tensor_data(_encode(fixed[tensor], kind) if tensor in fixed else _data(dims, kind, rng))
    writer.close()
    return path
