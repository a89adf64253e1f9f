"""Small, real GGUF files written with the `gguf` package, for edge cases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def install_like(store: Any, source: Path, name: str = "model:v1", *, pinned: bool = True) -> Path:
    """What a verified catalogue install leaves: the file, then a stamped sidecar (`pinned`: with
    the catalogue facts only an install writes)."""
    import shutil

    from pendra_shared.fsutil import sha256_file
    from pendra_shared.sidecar import Sidecar, now_utc, write_sidecar

    target = Path(store.root) / (name.replace(":", "-") + ".gguf")
    shutil.copyfile(source, target)
    write_sidecar(
        target,
        Sidecar(
            name=name,
            purpose="chat",
            sha256=sha256_file(target),
            source_url="https://example.test/model.gguf",
            size_bytes=target.stat().st_size,
            installed_at=now_utc(),
            catalogue={"name": name} if pinned else None,
        ),
    )
    return target
