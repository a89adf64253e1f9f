"""Small, real GGUF files written with the `gguf` package, for edge cases."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    name: str = "tiny test model",
    pooling_type: int | None = None,
    chat_template: str | None = None,
    context_length: int = 256,
    tensors: int = 2,
    general_type: str | None = None,
) -> Path:
    """A valid little GGUF: a few F32 tensors and the metadata the store reads."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    if general_type:
        writer.add_type(general_type)
    writer.add_context_length(context_length)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if pooling_type is not None:
        writer.add_pooling_type(gguf.PoolingType(pooling_type))
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_token_list([f"tok{i}".encode() for i in range(100)])
    for i in range(tensors):
        writer.add_tensor(f"blk.{i}.weight", np.arange(64, dtype=np.float32).reshape(8, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
