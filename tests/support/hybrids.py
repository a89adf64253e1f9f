"""Tiny random-weight GGUFs of llama.cpp's hybrid architectures (`pendra_inference.gguf_hybrid`),
with the real tokenizers and chat templates kept in `tests/data/llama.cpp/`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pendra_inference.gguf_hybrid import (
    GRANITE_HYBRID_TINY,
    QWEN35_TINY,
    QWEN35MOE_TINY,
    HybridShape,
    write_hybrid_gguf,
)
from pendra_inference.gguf_vision import QWEN3VL_TINY, write_qwen3vl_projector
from pendra_inference.gguf_vocab import QWEN_VISION_TOKENS, tokenizer_files

LLAMA_CPP_DATA = Path(__file__).resolve().parents[1] / "data" / "llama.cpp"


def write_hybrid(
    path: Path,
    arch: str,
    shape: HybridShape,
    *,
    seed: int = 0,
    special: dict[int, str] | None = None,
    fixed: dict[str, np.ndarray] | None = None,
) -> Path:
    vocab, template = tokenizer_files(arch, LLAMA_CPP_DATA)
    name = f"tiny random {arch}"
    return write_hybrid_gguf(
        path,
        arch,
        shape,
        vocab=vocab,
        chat_template=template.read_text(),
        name=name,
        seed=seed,
        special=special,
        fixed=fixed,
    )


def write_qwen35(
    path: Path,
    moe: bool = False,
    shape: HybridShape | None = None,
    *,
    seed: int = 0,
    fixed: dict[str, np.ndarray] | None = None,
) -> Path:
    """A Qwen3.5/3.6 file (`qwen35`, or `qwen35moe` with `moe`), tiny unless `shape` is given."""
    if moe:
        return write_hybrid(path, "qwen35moe", shape or QWEN35MOE_TINY, seed=seed, fixed=fixed)
    return write_hybrid(path, "qwen35", shape or QWEN35_TINY, seed=seed, fixed=fixed)


def write_granite_hybrid(path: Path, shape: HybridShape = GRANITE_HYBRID_TINY, *, seed: int = 0) -> Path:
    """A Granite 4.0 "-h" file (`granitehybrid`: Mamba-2 and attention layers)."""
    return write_hybrid(path, "granitehybrid", shape, seed=seed)


def write_qwen35_vision(directory: Path) -> tuple[Path, Path]:
    """The tiny Qwen3.5 (the real Qwen tokenizer with its vision tokens, Qwen3.5's template) and a
    random `qwen3vl_merger` projector of its width, as Qwen3.6 ships: `qwen.gguf`, `mmproj.gguf`."""
    model = write_hybrid(directory / "qwen.gguf", "qwen35", QWEN35_TINY, special=QWEN_VISION_TOKENS)
    return model, write_qwen3vl_projector(directory / "mmproj.gguf", QWEN3VL_TINY, QWEN35_TINY.n_embd)


def agreeing_mtp_weights(shape: HybridShape) -> dict[str, np.ndarray]:
    """Weights under which the model and its MTP block agree: every block of the trunk adds nothing
    (its output projections are zero), so the model's next token depends on the current token
    alone, through the tied embeddings; the MTP block passes the next token's embedding through
    (its projection is [I 0], its attention and feed-forward add nothing), so it predicts, from the
    pending token, the very token the model will pick after it."""
    e = shape.n_embd
    _, d_inner, *_ = shape.ssm("qwen35")
    fixed = {}
    for i in range(shape.n_layer + shape.nextn_layers):
        b = f"blk.{i}."
        fixed[b + "ffn_down.weight"] = np.zeros((e, shape.n_ff), np.float32)
        if i < shape.n_layer and shape.recurrent(i):
            fixed[b + "ssm_out.weight"] = np.zeros((e, d_inner), np.float32)
        else:
            fixed[b + "attn_output.weight"] = np.zeros((e, shape.n_head * shape.head_dim), np.float32)
    fixed[f"blk.{shape.n_layer}.nextn.eh_proj.weight"] = np.eye(e, 2 * e, dtype=np.float32)
    return fixed
