"""Facts read from a GGUF file's header with the `gguf` package, and the purpose they imply.

`read_gguf_facts()` never trusts the file: a bad magic number, a truncated header or tensor data
that runs past the end of the file all raise `InvalidGGUF` with a reason a user can act on.
A model's purpose is read from its metadata (encoder architectures and pooling mean embedding),
never from its file name.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gguf.constants import LlamaFileType

from pendra_shared.gguf_header import GGUFHeader, HeaderError, read_header

logger = logging.getLogger(__name__)

PURPOSES = ("chat", "embedding", "image", "transcription")

# Architectures llama.cpp runs as encoders that produce sentence embeddings.
EMBEDDING_ARCHITECTURES = frozenset(
    {
        "bert",
        "nomic-bert",
        "nomic-bert-moe",
        "jina-bert-v2",
        "jina-bert-v3",
        "modern-bert",
        "neo-bert",
        "eurobert",
        "t5encoder",
        "gemma-embedding",
    }
)
# GGUF files that are parts of a model, not models a user can serve on their own.
NOT_A_MODEL = {
    "clip": "a multimodal projector (mmproj), not a model on its own",
    "adapter": "a LoRA adapter, not a model on its own",
    "mmproj": "a multimodal projector (mmproj), not a model on its own",
}


class InvalidGGUF(Exception):
    """The file is not a usable GGUF model; the message says why."""


@dataclass(frozen=True)
class GGUFFacts:
    architecture: str
    name: str | None
    size_label: str | None
    parameters: int
    quantization: str | None
    context_length: int | None
    embedding_length: int | None
    pooling_type: int | None
    has_chat_template: bool
    license: str | None
    gguf_version: int

    @property
    def purpose(self) -> str:
        return infer_purpose(self.architecture, self.pooling_type)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "purpose": self.purpose}


def infer_purpose(architecture: str, pooling_type: int | None) -> str:
    """Embedding for encoder architectures or a declared pooling type; chat otherwise."""
    if architecture in EMBEDDING_ARCHITECTURES:
        return "embedding"
    if pooling_type is not None and pooling_type > 0:
        return "embedding"
    return "chat"


def _quantization(header: GGUFHeader) -> str | None:
    file_type = header.metadata.get("general.file_type")
    if isinstance(file_type, int):
        try:
            return LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            logger.debug("unknown general.file_type %s", file_type)
    # No (known) file type: name the type most of the weights are stored in.
    counts: Counter[str] = Counter()
    for tensor in header.tensors:
        counts[tensor.ggml_type.name] += tensor.n_elements
    return counts.most_common(1)[0][0] if counts else None


def read_gguf_facts(path: Path) -> GGUFFacts:
    """Read the header of `path`. Raises InvalidGGUF when it is not a complete GGUF model."""
    try:
        header = read_header(path)
    except HeaderError as exc:
        raise InvalidGGUF(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise InvalidGGUF(f"cannot read file: {exc}") from None

    for tensor in header.tensors:
        end = tensor.data_offset + tensor.n_bytes
        if end > header.file_size:
            raise InvalidGGUF(
                f"truncated: tensor {tensor.name!r} ends at byte {end} but the file has {header.file_size}"
            )
    meta = header.metadata
    architecture = meta.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise InvalidGGUF("no general.architecture in the header")
    reason = NOT_A_MODEL.get(architecture) or NOT_A_MODEL.get(str(meta.get("general.type")))
    if reason:
        raise InvalidGGUF(reason)
    if not header.tensors:
        raise InvalidGGUF("the file holds no tensors")

    def text(key: str) -> str | None:
        value = meta.get(key)
        return value if isinstance(value, str) else None

    def arch_int(key: str) -> int | None:
        value = meta.get(f"{architecture}.{key}")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return GGUFFacts(
        architecture=architecture,
        name=text("general.name"),
        size_label=text("general.size_label"),
        parameters=sum(t.n_elements for t in header.tensors),
        quantization=_quantization(header),
        context_length=arch_int("context_length"),
        embedding_length=arch_int("embedding_length"),
        pooling_type=arch_int("pooling_type"),
        has_chat_template="tokenizer.chat_template" in meta,
        license=text("general.license"),
        gguf_version=header.version,
    )
