"""A fast, bounds-checked reader for the GGUF header: metadata and tensor table, no tensor data.

`gguf.GGUFReader` builds a numpy view for every element of every array (a 262k-token vocabulary
takes seconds), which is too slow for listing a store on each request. This reader walks the same
format with the `gguf` package's own constants, skips array contents it does not need, and checks
every length against the file's size, so a damaged file fails fast with a reason instead of hanging
or reading out of bounds.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
)

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.FLOAT64: "d",
    GGUFValueType.BOOL: "?",
}
# Arrays up to this many items are decoded; longer ones (vocabularies, merges) are skipped and
# recorded as ArrayInfo.
MAX_DECODED_ARRAY = 64


class HeaderError(ValueError):
    """The bytes are not a well-formed GGUF header."""


@dataclass(frozen=True)
class ArrayInfo:
    item_type: GGUFValueType
    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    n_elements: int
    ggml_type: GGMLQuantizationType
    data_offset: int  # absolute, in the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    file_size: int


class _Cursor:
    def __init__(self, buf: mmap.mmap, endian: str) -> None:
        self.buf = buf
        self.endian = endian
        self.pos = 0
        self.size = len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise HeaderError(f"truncated header: {what} runs past the end of the file")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(self.endian + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        length = self.scalar("Q", what)
        self.need(length, what)
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int, what: str) -> None:
        for _ in range(count):
            length = self.scalar("Q", what)
            self.need(length, what)
            self.pos += length

    def value(self, vtype: GGUFValueType, what: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            item_type = _value_type(self.scalar("I", what), what)
            length = self.scalar("Q", what)
            if length <= MAX_DECODED_ARRAY:
                return [self.value(item_type, what) for _ in range(length)]
            if item_type == GGUFValueType.STRING:
                self.skip_strings(length, what)
            elif item_type in _SCALARS:
                n = struct.calcsize(_SCALARS[item_type]) * length
                self.need(n, what)
                self.pos += n
            else:
                for _ in range(length):
                    self.value(item_type, what)
            return ArrayInfo(item_type, length)
        raise HeaderError(f"{what}: unknown value type {vtype}")


def _value_type(raw: int, what: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise HeaderError(f"{what}: unknown value type {raw}") from None


def read_header(path: Path) -> GGUFHeader:
    """Parse the header of the GGUF file at `path`; raises HeaderError or OSError."""
    with path.open("rb") as fh:
        size = path.stat().st_size
        if size < 24:
            raise HeaderError(f"truncated header: the file has only {size} bytes")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, size)


def _parse(buf: mmap.mmap, size: int) -> GGUFHeader:
    (magic,) = struct.unpack_from("<I", buf, 0)
    if magic != GGUF_MAGIC:
        raise HeaderError(f"not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
    (version,) = struct.unpack_from("<I", buf, 4)
    endian = "<"
    if version & 0xFFFF == 0:  # a big-endian file reads as a huge little-endian version
        endian, (version,) = ">", struct.unpack_from(">I", buf, 4)
    if version < 2:
        raise HeaderError(f"GGUF version {version} is too old (2 or later is supported)")
    cur = _Cursor(buf, endian)
    cur.pos = 8
    tensor_count = cur.scalar("Q", "tensor count")
    kv_count = cur.scalar("Q", "metadata count")
    # Each entry takes at least 8 bytes, so larger counts cannot be real.
    if tensor_count > size // 8 or kv_count > size // 8:
        raise HeaderError("damaged header: impossible tensor or metadata count")

    metadata: dict[str, Any] = {}
    for index in range(kv_count):
        key = cur.string(f"metadata key #{index}")
        vtype = _value_type(cur.scalar("I", key), key)
        metadata[key] = cur.value(vtype, key)

    raw_tensors = []
    for index in range(tensor_count):
        name = cur.string(f"tensor #{index} name")
        n_dims = cur.scalar("I", name)
        if n_dims > 8:
            raise HeaderError(f"tensor {name!r}: {n_dims} dimensions")
        n_elements = 1
        for _ in range(n_dims):
            n_elements *= cur.scalar("Q", name)
        raw_type = cur.scalar("I", name)
        offset = cur.scalar("Q", name)
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise HeaderError(f"tensor {name!r}: unknown type {raw_type}") from None
        raw_tensors.append((name, n_elements, ggml_type, offset))

    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise HeaderError(f"damaged header: general.alignment is {alignment!r}")
    data_start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, n_elements, ggml_type, offset in raw_tensors:
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        tensors.append(
            TensorInfo(name, n_elements, ggml_type, data_start + offset, n_elements * type_size // block_size)
        )
    return GGUFHeader(version=version, metadata=metadata, tensors=tensors, file_size=size)
