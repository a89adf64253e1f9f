"""A fast, strict, bounds-checked reader for the GGUF header: metadata and tensor table, no tensor data.

`gguf.GGUFReader` builds a numpy view for every element of every array (a 262k-token vocabulary
takes seconds), which is too slow for listing a store on each request. This reader walks the same
format with plain reads through a small window (no mmap, so a file truncated while it is read gives
an error, not SIGBUS), skips array contents it does not need, and refuses everything the native
loader (`ggml/src/gguf.cpp` in the vendored llama.cpp) refuses, and more (zero dimensions,
overlaps, gaps), so that only headers of the shape that loader is known to handle reach it. The
checks, in file order:

- magic, version 2 or 3, little-endian; tensor and metadata counts the file can hold;
- keys: non-empty UTF-8, no duplicates; value types known, no arrays of arrays; strings at most
  `max_string_bytes`, arrays at most `max_array_len` items, both refused before they are read;
- `general.alignment` a u32 power of two;
- tensors: names of 1..63 bytes (GGML_MAX_NAME is 64 with the NUL), UTF-8 without NUL, no
  duplicates; 1..4 dimensions, each at least 1, at most 2^62 elements; a known ggml type whose block
  size divides the row; data aligned, inside the file, not overlapping, packed in table order.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

# The defaults of Settings.gguf_max_string_bytes and Settings.gguf_max_array_len (a test checks).
DEFAULT_MAX_STRING_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_ARRAY_LEN = 8 * 1024 * 1024
# Arrays up to this many items are decoded; longer ones (vocabularies, merges) are skipped and
# recorded as ArrayInfo.
MAX_DECODED_ARRAY = 64

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3  # the newest version llama.cpp reads
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # bytes, with the terminating NUL
MAX_ELEMENTS = 2**62  # per tensor; llama.cpp overflows past 2^63 and intermediate sizes before that

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
# (elements per block, bytes per block) for each ggml type, as ggml.c's type_traits has them.
# The gguf package still gives Q8_1 the old 40-byte block; ggml's block_q8_1 is two halves + 32.
GGML_TYPE_SIZES: dict[GGMLQuantizationType, tuple[int, int]] = {
    **GGML_QUANT_SIZES,
    GGMLQuantizationType.Q8_1: (32, 36),
}
# Ids ggml once used and no longer loads (type_traits has block size 0 for them).
REMOVED_GGML_TYPES = {
    4: "Q4_2",
    5: "Q4_3",
    31: "Q4_0_4_4",
    32: "Q4_0_4_8",
    33: "Q4_0_8_8",
    36: "IQ4_NL_4_4",
    37: "IQ4_NL_4_8",
    38: "IQ4_NL_8_8",
}
_WINDOW = 1 << 20


class HeaderError(ValueError):
    """The bytes are not a well-formed GGUF header; the message says why."""


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
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    file_size: int
    # Each key's stored type: a scalar type, or ArrayInfo for arrays (decoded or not).
    value_types: dict[str, GGUFValueType | ArrayInfo] = field(default_factory=dict)
    alignment: int = GGUF_DEFAULT_ALIGNMENT
    data_start: int = 0  # where the tensor data section starts


class _Reader:
    """Sequential reads of a file through a window of about 1 MiB; every length is checked against
    the file's size before anything is read or skipped."""

    def __init__(self, fh: BinaryIO, size: int, max_string_bytes: int, max_array_len: int) -> None:
        self.fh = fh
        self.size = size
        self.max_string_bytes = max_string_bytes
        self.max_array_len = max_array_len
        self.pos = 0
        self.window = b""
        self.window_start = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise HeaderError(f"truncated header: {what} runs past the end of the file")

    def take(self, n: int, what: str) -> int:
        """Make `n` bytes at the cursor available in self.window; return their index there."""
        self.need(n, what)
        index = self.pos - self.window_start
        if index < 0 or index + n > len(self.window):
            self.fh.seek(self.pos)
            self.window = self.fh.read(max(n, _WINDOW))
            self.window_start, index = self.pos, 0
            if len(self.window) < n:
                raise HeaderError("truncated header: the file shrank while it was read")
        self.pos += n
        return index

    def scalar(self, fmt: str, what: str) -> Any:
        index = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from("<" + fmt, self.window, index)[0]

    def u32(self, what: str) -> int:
        return int(self.scalar("I", what))

    def u64(self, what: str) -> int:
        return int(self.scalar("Q", what))

    def raw_string(self, what: str, limit: int) -> bytes:
        length = self.u64(what)
        if length > limit:
            raise HeaderError(f"{what} is {length} bytes long (the limit is {limit})")
        index = self.take(length, what)
        return self.window[index : index + length]

    def skip_strings(self, count: int, what: str) -> None:
        limit, size, unpack = self.max_string_bytes, self.size, struct.Struct("<Q").unpack_from
        for _ in range(count):
            index = self.take(8, what)
            (length,) = unpack(self.window, index)
            if length > limit:
                raise HeaderError(f"{what}: an item is {length} bytes long (the limit is {limit})")
            if self.pos + length > size:
                raise HeaderError(f"truncated header: {what} runs past the end of the file")
            self.pos += length

    def value(self, vtype: GGUFValueType, key: str) -> tuple[Any, GGUFValueType | ArrayInfo]:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], key), vtype
        if vtype == GGUFValueType.STRING:
            return _text(self.raw_string(key, self.max_string_bytes)), vtype
        item_type = _value_type(self.u32(key), key)
        if item_type == GGUFValueType.ARRAY:
            raise HeaderError(f"{key}: arrays of arrays are not allowed")
        length = self.u64(key)
        if length > self.max_array_len:
            raise HeaderError(f"{key}: an array of {length} items (the limit is {self.max_array_len})")
        info = ArrayInfo(item_type, length)
        if item_type == GGUFValueType.STRING:
            if length <= MAX_DECODED_ARRAY:
                return [_text(self.raw_string(key, self.max_string_bytes)) for _ in range(length)], info
            self.skip_strings(length, key)
            return info, info
        fmt = _SCALARS[item_type]
        n_bytes = struct.calcsize(fmt) * length
        if length <= MAX_DECODED_ARRAY:
            index = self.take(n_bytes, key)
            return list(struct.unpack_from(f"<{length}{fmt}", self.window, index)), info
        self.need(n_bytes, key)
        self.pos += n_bytes
        return info, info


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _value_type(raw: int, what: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise HeaderError(f"{what}: unknown value type {raw}") from None


def _ggml_type(raw: int, name: str) -> GGMLQuantizationType:
    if raw in REMOVED_GGML_TYPES:
        raise HeaderError(f"tensor {name!r}: type {REMOVED_GGML_TYPES[raw]} ({raw}) is no longer supported")
    try:
        ggml_type = GGMLQuantizationType(raw)
    except ValueError:
        raise HeaderError(f"tensor {name!r}: unknown type {raw}") from None
    if ggml_type not in GGML_TYPE_SIZES:
        raise HeaderError(f"tensor {name!r}: type {ggml_type.name} has no known block size")
    return ggml_type


def read_header(
    path: Path,
    *,
    max_string_bytes: int = DEFAULT_MAX_STRING_BYTES,
    max_array_len: int = DEFAULT_MAX_ARRAY_LEN,
) -> GGUFHeader:
    """Parse and check the header of the GGUF file at `path`; raises HeaderError or OSError."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below).
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb", buffering=0) as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HeaderError("not a regular file")
        return parse_header(fh, st.st_size, max_string_bytes=max_string_bytes, max_array_len=max_array_len)


def parse_header(
    fh: BinaryIO,
    size: int,
    *,
    max_string_bytes: int = DEFAULT_MAX_STRING_BYTES,
    max_array_len: int = DEFAULT_MAX_ARRAY_LEN,
) -> GGUFHeader:
    """Parse and check the GGUF header of the `size` bytes readable from `fh`; raises HeaderError."""
    if size < 24:
        raise HeaderError(f"truncated header: the file has only {size} bytes")
    cur = _Reader(fh, size, max_string_bytes, max_array_len)
    index = cur.take(4, "magic")
    magic = cur.window[index : index + 4]
    if magic != GGUF_MAGIC:
        raise HeaderError(f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
    version = cur.u32("version")
    if version & 0xFFFF == 0 and version != 0:
        raise HeaderError(f"GGUF version {version:#x}: the byte order does not match (a big-endian file?)")
    if version < 2:
        raise HeaderError(f"GGUF version {version} is too old (2 or later is supported)")
    if version > GGUF_VERSION:
        raise HeaderError(f"GGUF version {version} is too new (up to {GGUF_VERSION} is supported)")
    tensor_count = cur.u64("tensor count")
    kv_count = cur.u64("metadata count")
    # Each entry takes at least 8 bytes, so larger counts cannot be real.
    if tensor_count > size // 8 or kv_count > size // 8:
        raise HeaderError(
            f"damaged header: impossible tensor or metadata count ({tensor_count}, {kv_count}) "
            f"for a file of {size} bytes"
        )

    metadata: dict[str, Any] = {}
    value_types: dict[str, GGUFValueType | ArrayInfo] = {}
    for index in range(kv_count):
        raw_key = cur.raw_string(f"metadata key #{index}", max_string_bytes)
        key = _name(raw_key, f"metadata key #{index}")
        if key in metadata:
            raise HeaderError(f"damaged header: duplicate metadata key {key!r}")
        metadata[key], value_types[key] = cur.value(_value_type(cur.u32(key), key), key)
    alignment = _alignment(metadata, value_types)

    raw_tensors: list[TensorInfo] = []  # data offsets relative to the data section, for now
    names: set[str] = set()
    for index in range(tensor_count):
        tensor = _tensor_entry(cur, index)
        if tensor.name in names:
            raise HeaderError(f"damaged header: duplicate tensor name {tensor.name!r}")
        names.add(tensor.name)
        raw_tensors.append(tensor)
    data_start = -(-cur.pos // alignment) * alignment
    if raw_tensors and data_start > size:
        raise HeaderError(f"truncated: the tensor data starts at byte {data_start} but the file has {size}")
    tensors = [replace(t, data_offset=data_start + t.data_offset) for t in raw_tensors]
    _check_layout(tensors, data_start, alignment, size)
    return GGUFHeader(version, metadata, tensors, size, value_types, alignment, data_start)


def _name(raw: bytes, what: str) -> str:
    if not raw:
        raise HeaderError(f"damaged header: {what} is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError(f"damaged header: {what} is not UTF-8") from None


def _alignment(metadata: dict[str, Any], value_types: dict[str, GGUFValueType | ArrayInfo]) -> int:
    key = "general.alignment"
    if key not in metadata:
        return GGUF_DEFAULT_ALIGNMENT
    alignment = metadata[key]
    if value_types[key] != GGUFValueType.UINT32:
        raise HeaderError(f"damaged header: {key} must be a u32, not {type_name(value_types[key])}")
    if alignment <= 0 or alignment & (alignment - 1):
        raise HeaderError(f"damaged header: {key} is {alignment}, not a power of two")
    return int(alignment)


def type_name(kind: GGUFValueType | ArrayInfo) -> str:
    """`uint32`, or `an array of string`: a stored type, for messages."""
    if isinstance(kind, ArrayInfo):
        return f"an array of {kind.item_type.name.lower()}"
    return kind.name.lower()


def _tensor_entry(cur: _Reader, index: int) -> TensorInfo:
    """One tensor-table entry, its data offset relative to the data section."""
    name = _name(cur.raw_string(f"tensor #{index} name", GGML_MAX_NAME - 1), f"tensor #{index} name")
    if "\0" in name:
        raise HeaderError(f"damaged header: tensor #{index} name {name!r} contains NUL")
    n_dims = cur.u32(name)
    if not 1 <= n_dims <= GGML_MAX_DIMS:
        raise HeaderError(f"tensor {name!r}: {n_dims} dimensions (1 to {GGML_MAX_DIMS} are allowed)")
    shape = tuple(int(cur.scalar("q", name)) for _ in range(n_dims))
    if any(ne <= 0 for ne in shape):
        raise HeaderError(f"tensor {name!r}: shape {list(shape)} has a dimension below 1")
    n_elements = 1
    for ne in shape:
        n_elements *= ne
    if n_elements > MAX_ELEMENTS:
        raise HeaderError(f"tensor {name!r}: shape {list(shape)} has more than 2^62 elements")
    ggml_type = _ggml_type(cur.u32(name), name)
    block_size, type_size = GGML_TYPE_SIZES[ggml_type]
    if shape[0] % block_size:
        raise HeaderError(
            f"tensor {name!r}: rows of {shape[0]} are not a multiple of the {ggml_type.name} block size "
            f"{block_size}"
        )
    offset = cur.u64(name)
    return TensorInfo(name, n_elements, ggml_type, offset, n_elements // block_size * type_size, shape)


def _check_layout(tensors: list[TensorInfo], data_start: int, alignment: int, size: int) -> None:
    """Each tensor's data aligned, inside the file and apart from the others, packed in table order
    with padding to the alignment (the only layout llama.cpp's loader accepts)."""
    for tensor in tensors:
        relative = tensor.data_offset - data_start
        if relative % alignment:
            raise HeaderError(
                f"damaged header: tensor {tensor.name!r} data offset {relative} is not a multiple of "
                f"the alignment {alignment}"
            )
        end = tensor.data_offset + tensor.n_bytes
        if end > size:
            raise HeaderError(f"truncated: tensor {tensor.name!r} ends at byte {end} but the file has {size}")
    ordered = sorted(tensors, key=lambda t: t.data_offset)
    for before, after in zip(ordered, ordered[1:], strict=False):
        if after.data_offset < before.data_offset + before.n_bytes:
            raise HeaderError(f"damaged header: tensors {before.name!r} and {after.name!r} overlap")
    expected = 0
    for tensor in tensors:
        relative = tensor.data_offset - data_start
        if relative != expected:
            raise HeaderError(
                f"damaged header: tensor {tensor.name!r} data offset {relative}, expected {expected} "
                "(tensor data must follow the table's order without gaps)"
            )
        expected += -(-tensor.n_bytes // alignment) * alignment
