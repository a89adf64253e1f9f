"""Facts read from a GGUF file's header with the `gguf` package, and the purpose they imply.

`read_gguf_facts()` never trusts the file: a bad magic number, a truncated header, tensor data
that runs past the end of the file, or anything else `gguf_header` refuses raise `InvalidGGUF` with
a reason a user can act on. On top of the file format it checks what llama.cpp's model loader reads
as raw arrays or fixed-width numbers: the tokenizer arrays' element types and lengths and the sizes
every architecture declares. A model's purpose is read from its metadata (encoder architectures and
pooling mean embedding), never from its file name.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gguf.constants import GGUFValueType, LlamaFileType

from pendra_shared.gguf_header import (
    DEFAULT_MAX_ARRAY_LEN,
    DEFAULT_MAX_STRING_BYTES,
    ArrayInfo,
    GGUFHeader,
    HeaderError,
    read_header,
    type_name,
)

logger = logging.getLogger(__name__)

PURPOSES = ("chat", "embedding", "rerank", "image", "transcription")
RANK_POOLING = 4  # llama.cpp's LLAMA_POOLING_TYPE_RANK: a cross-encoder's relevance score

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
# Tokenizer arrays and the element types allowed. Older llama.cpp builds cast the raw array to one
# type (a u8 `scores` array read as float is a heap over-read); the vendored build checks, and so
# does Pendra, whatever build sits behind it. Scores are f32 only, although the vendored build
# also reads i32 ones: no converter writes them.
TOKENIZER_ARRAYS = {
    "tokenizer.ggml.tokens": (GGUFValueType.STRING,),
    "tokenizer.ggml.scores": (GGUFValueType.FLOAT32,),
    "tokenizer.ggml.token_type": (GGUFValueType.INT32,),
    "tokenizer.ggml.merges": (GGUFValueType.STRING,),
    "tokenizer.ggml.precompiled_charsmap": (GGUFValueType.UINT8, GGUFValueType.INT8),
}
# Arrays with one item per token.
PER_TOKEN_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
# `{architecture}.X` keys every architecture reads as a u32; zero makes no sense for any of them.
ARCHITECTURE_SIZES = ("block_count", "context_length", "embedding_length")


class InvalidGGUF(Exception):
    """The file is not a usable GGUF model; the message says why."""


class ProjectorGGUF(InvalidGGUF):
    """The file is a vision projector (mmproj): a part of a vision model, not a model of its own."""


def is_projector(header: GGUFHeader) -> bool:
    """Whether the header is a multimodal projector's, as llama.cpp's mmproj converter writes
    one (`general.architecture` clip; newer ones also `general.type` mmproj)."""
    meta = header.metadata
    return meta.get("general.architecture") == "clip" or meta.get("general.type") == "mmproj"


def check_projector(
    path: Path,
    *,
    max_string_bytes: int = DEFAULT_MAX_STRING_BYTES,
    max_array_len: int = DEFAULT_MAX_ARRAY_LEN,
) -> GGUFHeader:
    """The header of `path`; raises InvalidGGUF unless it is a well-formed GGUF vision projector
    with tensors."""
    header = _read(path, max_string_bytes, max_array_len)
    if not is_projector(header):
        arch = header.metadata.get("general.architecture")
        raise InvalidGGUF(f"not a vision projector (its GGUF architecture is {arch!r}, not 'clip')")
    if not header.tensors:
        raise InvalidGGUF("the projector holds no tensors")
    return header


def _read(path: Path, max_string_bytes: int, max_array_len: int) -> GGUFHeader:
    """The checked header of `path`; any failure to read one is InvalidGGUF."""
    try:
        return read_header(path, max_string_bytes=max_string_bytes, max_array_len=max_array_len)
    except HeaderError as exc:
        raise InvalidGGUF(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise InvalidGGUF(f"cannot read file: {exc}") from None


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
    # `tokenizer.chat_template` as read within the header's string limit: what the model can do
    # (tools, thinking) is read from it. Not in `as_dict` (`has_chat_template` says whether there
    # is one): listings stay small.
    chat_template: str | None = field(default=None, repr=False)

    @property
    def purpose(self) -> str:
        return infer_purpose(self.architecture, self.pooling_type)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["chat_template"]
        return {**data, "purpose": self.purpose}


def infer_purpose(architecture: str, pooling_type: int | None) -> str:
    """Rerank for rank pooling (a reranker's classifier head); embedding for encoder architectures
    or another declared pooling type; chat otherwise."""
    if pooling_type == RANK_POOLING:
        return "rerank"
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


def check_model_metadata(header: GGUFHeader, architecture: str) -> None:
    """Raise InvalidGGUF for metadata llama.cpp's model loader would misread (see the constants)."""
    kinds = header.value_types
    for key, item_types in TOKENIZER_ARRAYS.items():
        kind = kinds.get(key)
        if kind is not None and not (isinstance(kind, ArrayInfo) and kind.item_type in item_types):
            wanted = " or ".join(t.name.lower() for t in item_types)
            raise InvalidGGUF(f"{key} must be an array of {wanted}, not {type_name(kind)}")
    lengths = {key: kind.length for key in PER_TOKEN_ARRAYS if isinstance(kind := kinds.get(key), ArrayInfo)}
    if len(set(lengths.values())) > 1:
        found = ", ".join(f"{key} has {n}" for key, n in lengths.items())
        raise InvalidGGUF(f"the tokenizer arrays differ in length: {found}")
    for name in ARCHITECTURE_SIZES:
        key = f"{architecture}.{name}"
        if key not in kinds:
            continue
        if kinds[key] != GGUFValueType.UINT32:
            raise InvalidGGUF(f"{key} must be a u32, not {type_name(kinds[key])}")
        if header.metadata[key] < 1:
            raise InvalidGGUF(f"{key} is {header.metadata[key]}")


def read_gguf_facts(
    path: Path,
    *,
    max_string_bytes: int = DEFAULT_MAX_STRING_BYTES,
    max_array_len: int = DEFAULT_MAX_ARRAY_LEN,
) -> GGUFFacts:
    """Read and check the header of `path`. Raises InvalidGGUF when it is not a usable GGUF model.

    `max_string_bytes` and `max_array_len` are Settings.gguf_max_string_bytes and
    Settings.gguf_max_array_len (the defaults are theirs).
    """
    return gguf_facts(_read(path, max_string_bytes, max_array_len))


def gguf_facts(header: GGUFHeader) -> GGUFFacts:
    """The facts of a parsed header; raises InvalidGGUF when it is not a usable model."""
    meta = header.metadata
    architecture = meta.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise InvalidGGUF("no general.architecture in the header")
    if is_projector(header):
        raise ProjectorGGUF(NOT_A_MODEL["clip"])
    reason = NOT_A_MODEL.get(architecture) or NOT_A_MODEL.get(str(meta.get("general.type")))
    if reason:
        raise InvalidGGUF(reason)
    check_model_metadata(header, architecture)
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
        chat_template=text("tokenizer.chat_template"),
    )
