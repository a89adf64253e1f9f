"""Real tokenizers for the GGUFs Pendra writes: every `tokenizer.*` key of one of llama.cpp's
vocab-only GGUFs (`models/ggml-vocab-*.gguf` in its source, plain or gzipped), copied byte for byte.

`gguf.GGUFReader` builds a numpy view per array item and `gguf.GGUFWriter` packs them one by one
(seconds for a 150k-token vocabulary and its merges), so the values are sliced out of the file
as encoded and written back as they are (`Writer`); the vocab files hold no tensors.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

# The vocab GGUF and chat template of each architecture, as named in llama.cpp's `models/` and
# `models/templates/`. The Qwen vocab is llama.cpp's `qwen35` test vocabulary (Qwen2's 151,936
# tokens with the qwen35 pre-tokenizer); Granite 4.0's own (100,352 tokens) is not among them, so
# Granite gets Llama 3's: the same GPT-4-style pre-tokenizer and the same `<|end_of_text|>` end.
TOKENIZERS = {
    "qwen35": ("ggml-vocab-qwen35.gguf", "Qwen3.5-4B.jinja"),
    "qwen35moe": ("ggml-vocab-qwen35.gguf", "Qwen3.5-4B.jinja"),
    "granitehybrid": ("ggml-vocab-llama-bpe.gguf", "ibm-granite-granite-4.0.jinja"),
    "mamba2": ("ggml-vocab-llama-bpe.gguf", "ibm-granite-granite-4.0.jinja"),
}

_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF scalar types
STRING, ARRAY, INT32 = 8, 9, 5
UNUSED_TOKEN = 5  # llama.cpp's token type "unused"
CONTROL_TOKEN = 3
# The vision tokens of the real Qwen2.5/3/3.5 vocabularies, which llama.cpp's test vocabulary
# leaves as padding: mtmd wraps each image in the first two.
QWEN_VISION_TOKENS = {
    151652: "<|vision_start|>",
    151653: "<|vision_end|>",
    151654: "<|vision_pad|>",
    151655: "<|image_pad|>",
    151656: "<|video_pad|>",
}


@dataclass(frozen=True)
class Encoded:
    """A GGUF metadata value as the file encodes it, without its leading type."""

    kind: int
    data: bytes

    def count(self) -> int:
        assert self.kind == ARRAY
        return int(struct.unpack_from("<Q", self.data, 4)[0])

    def extended(self, items: list[bytes]) -> Encoded:
        """This array with `items` (encoded) appended."""
        item, count = struct.unpack_from("<IQ", self.data)
        return Encoded(ARRAY, struct.pack("<IQ", item, count + len(items)) + self.data[12:] + b"".join(items))

    def items(self) -> list[bytes]:
        """A string array's items, each encoded (its length, then its bytes)."""
        item, count = struct.unpack_from("<IQ", self.data)
        assert item == STRING
        out, pos = [], 12
        for _ in range(count):
            (size,) = struct.unpack_from("<Q", self.data, pos)
            out.append(self.data[pos : pos + 8 + size])
            pos += 8 + size
        return out

    def replaced(self, items: list[bytes]) -> Encoded:
        """This array with its items replaced by `items` (encoded)."""
        item = struct.unpack_from("<I", self.data)[0]
        return Encoded(ARRAY, struct.pack("<IQ", item, len(items)) + b"".join(items))


class Writer(gguf.GGUFWriter):
    """A GGUFWriter that also writes `Encoded` values as they are."""

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool, sub_type: Any = None) -> bytes:
        if isinstance(val, Encoded):
            return (struct.pack("<I", vtype) if add_vtype else b"") + val.data
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def tokenizer_files(arch: str, directory: Path) -> tuple[Path, Path]:
    """The vocab GGUF (gzipped or plain, whichever `directory` has) and template of `arch`."""
    vocab, template = TOKENIZERS[arch]
    gz = directory / f"{vocab}.gz"
    return (gz if gz.is_file() else directory / vocab), directory / template


def read_tokenizer(path: Path) -> dict[str, Encoded]:
    """Every `tokenizer.*` key of the GGUF at `path` (gzipped or not), its value as encoded."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw[:4] != b"GGUF" or struct.unpack_from("<I", raw, 4)[0] not in (2, 3):
        raise ValueError(f"{path} is not a GGUF file of version 2 or 3")
    pos = 24  # magic, version, tensor count, metadata count

    def skip(kind: int) -> None:
        nonlocal pos
        if kind == STRING:
            pos += 8 + struct.unpack_from("<Q", raw, pos)[0]
        elif kind == ARRAY:
            item, count = struct.unpack_from("<IQ", raw, pos)
            pos += 12
            if item == STRING:
                for _ in range(count):
                    pos += 8 + struct.unpack_from("<Q", raw, pos)[0]
            else:
                pos += count * _SIZES[item]
        else:
            pos += _SIZES[kind]

    fields: dict[str, Encoded] = {}
    for _ in range(struct.unpack_from("<Q", raw, 16)[0]):
        start = pos + 8
        skip(STRING)
        key = raw[start:pos].decode()
        (kind,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        start = pos
        skip(kind)
        if key.startswith("tokenizer."):
            fields[key] = Encoded(kind, raw[start:pos])
    return fields


def add_tokenizer(
    writer: Writer,
    vocab: Path,
    chat_template: str | None,
    n_vocab: int = 0,
    special: dict[int, str] | None = None,
) -> int:
    """Copy `vocab`'s tokenizer into `writer` (its own chat template replaced by `chat_template`,
    or dropped), padded to `n_vocab` tokens with unused ones, the ids in `special` renamed and made
    control tokens; returns the token count."""
    fields = read_tokenizer(vocab)
    fields.pop("tokenizer.chat_template", None)
    if special:
        names = fields["tokenizer.ggml.tokens"].items()
        kinds = list(struct.unpack_from(f"<{len(names)}i", fields["tokenizer.ggml.token_type"].data, 12))
        for token, text in special.items():
            raw = text.encode()
            names[token] = struct.pack("<Q", len(raw)) + raw
            kinds[token] = CONTROL_TOKEN
        fields["tokenizer.ggml.tokens"] = fields["tokenizer.ggml.tokens"].replaced(names)
        fields["tokenizer.ggml.token_type"] = Encoded(
            ARRAY, struct.pack("<IQ", INT32, len(kinds)) + struct.pack(f"<{len(kinds)}i", *kinds)
        )
    count = fields["tokenizer.ggml.tokens"].count()
    if n_vocab and n_vocab < count:
        raise ValueError(f"n_vocab {n_vocab} is below the {count} tokens of {vocab.name}")
    pad = [f"[PAD{i}]".encode() for i in range(count, max(n_vocab, count))]
    if pad:
        tokens = fields["tokenizer.ggml.tokens"].extended([struct.pack("<Q", len(p)) + p for p in pad])
        types = fields["tokenizer.ggml.token_type"]
        assert struct.unpack_from("<I", types.data)[0] == INT32
        fields["tokenizer.ggml.tokens"] = tokens
        fields["tokenizer.ggml.token_type"] = types.extended([struct.pack("<i", UNUSED_TOKEN)] * len(pad))
    for key, value in fields.items():
        writer.add_key_value(key, value, gguf.GGUFValueType(value.kind))
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    return count + len(pad)
