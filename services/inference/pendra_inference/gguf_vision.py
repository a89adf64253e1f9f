"""Random-weight vision projectors (llama.cpp's `mmproj` GGUFs) for the tests.

A projector is a GGUF of architecture `clip`: a vision transformer that turns an image into
embeddings of the text model's width, which the text model reads in place of token embeddings.
`write_qwen3vl_projector` writes the one Qwen3-VL, Qwen3.5 and Qwen3.6 ship
(`clip.projector_type` `qwen3vl_merger`): patches of two frames (a still image is two equal frames),
a pre-norm ViT with M-RoPE attention, then 2x2 patches merged and projected by a two-layer MLP.
Keys, tensor names and shapes follow the vendored llama.cpp's loader (`tools/mtmd/clip.cpp`,
`clip-impl.h`), its graph (`tools/mtmd/models/qwen3vl.cpp`) and converter (`conversion/qwen3vl.py`).
The model answers noise about an image, as the text models written here do about text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np


@dataclass(frozen=True)
class VisionShape:
    n_embd: int  # the vision transformer's width
    n_layer: int
    n_head: int
    n_ff: int
    image_size: int = 128  # the learned position embeddings' side, in pixels
    patch_size: int = 16
    merge: int = 2  # patches merged per side into one image token


QWEN3VL_TINY = VisionShape(n_embd=64, n_layer=2, n_head=2, n_ff=128)


def write_qwen3vl_projector(
    path: Path,
    shape: VisionShape,
    text_n_embd: int,
    *,
    name: str | None = None,
    seed: int = 0,
    omit: tuple[str, ...] = (),
) -> Path:
    """A `qwen3vl_merger` projector of `shape` whose image embeddings are `text_n_embd` wide
    (the text model's `embedding_length`; any other width is a mismatched projector). The tensors
    named in `omit` are left out (a broken file, for the tests)."""
    if shape.n_embd % shape.n_head or (shape.n_embd // shape.n_head) % 4:
        raise ValueError("the head size must be a multiple of 4 (M-RoPE's four sections)")
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name(name or "random weights, qwen3vl_merger projector")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_string("clip.projector_type", "qwen3vl_merger")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.use_gelu", True)
    vision = "clip.vision."
    writer.add_uint32(vision + "embedding_length", shape.n_embd)
    writer.add_uint32(vision + "feed_forward_length", shape.n_ff)
    writer.add_uint32(vision + "block_count", shape.n_layer)
    writer.add_uint32(vision + "projection_dim", text_n_embd)
    writer.add_uint32(vision + "attention.head_count", shape.n_head)
    writer.add_float32(vision + "attention.layer_norm_epsilon", 1e-6)
    writer.add_uint32(vision + "image_size", shape.image_size)
    writer.add_uint32(vision + "patch_size", shape.patch_size)
    writer.add_uint32(vision + "spatial_merge_size", shape.merge)
    writer.add_array(vision + "image_mean", [0.5, 0.5, 0.5])
    writer.add_array(vision + "image_std", [0.5, 0.5, 0.5])
    rng = np.random.default_rng(seed)
    d, p = shape.n_embd, shape.patch_size
    merged = d * shape.merge * shape.merge

    def add(tensor: str, *dims: int, scale: float | None = None) -> None:
        # numpy's order: the outermost dimension first (ggml's ne reversed)
        data = rng.standard_normal(dims, dtype=np.float32) / np.float32(scale or math.sqrt(dims[-1]))
        if tensor not in omit:
            writer.add_tensor(tensor, data)

    def norm(prefix: str) -> None:
        for part, value in (
            ("weight", np.ones(d, dtype=np.float32)),
            ("bias", np.zeros(d, dtype=np.float32)),
        ):
            if f"{prefix}.{part}" not in omit:
                writer.add_tensor(f"{prefix}.{part}", value)

    add("v.patch_embd.weight", d, 3, p, p, scale=p * math.sqrt(3))
    add("v.patch_embd.weight.1", d, 3, p, p, scale=p * math.sqrt(3))
    add("v.patch_embd.bias", d)
    add("v.position_embd.weight", (shape.image_size // p) ** 2, d)
    for i in range(shape.n_layer):
        blk = f"v.blk.{i}."
        norm(blk + "ln1")
        add(blk + "attn_qkv.weight", 3 * d, d)
        add(blk + "attn_qkv.bias", 3 * d)
        add(blk + "attn_out.weight", d, d)
        add(blk + "attn_out.bias", d)
        norm(blk + "ln2")
        add(blk + "ffn_up.weight", shape.n_ff, d)
        add(blk + "ffn_up.bias", shape.n_ff)
        add(blk + "ffn_down.weight", d, shape.n_ff)
        add(blk + "ffn_down.bias", d)
    norm("v.post_ln")  # the merger's norm, on each patch before the 2x2 merge
    add("mm.0.weight", merged, merged)
    add("mm.0.bias", merged)
    add("mm.2.weight", text_n_embd, merged)
    add("mm.2.bias", text_n_embd)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
