"""GGUF files written byte by byte, so that a test can get any field wrong.

`gguf.GGUFWriter` refuses most of what these tests need (duplicate names, lying lengths, nested
arrays, misaligned offsets), so this writer encodes each field itself. The defaults give a small
valid model; every argument overrides one thing. Values are packed little-endian; integers are
masked to their width, so -1 is written as all ones. `llama_cpp_verdicts()` asks the vendored
llama.cpp's own GGUF parser about files, in a child process.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

T = GGUFValueType
_FORMATS = {
    T.UINT8: "B",
    T.INT8: "B",
    T.UINT16: "H",
    T.INT16: "H",
    T.UINT32: "I",
    T.INT32: "I",
    T.UINT64: "Q",
    T.INT64: "Q",
    T.FLOAT32: "f",
    T.FLOAT64: "d",
    T.BOOL: "B",
}


def _int(fmt: str, value: int) -> bytes:
    bits = struct.calcsize(fmt) * 8
    return struct.pack("<" + fmt, value & ((1 << bits) - 1))


def u32(value: int) -> bytes:
    return _int("I", value)


def u64(value: int) -> bytes:
    return _int("Q", value)


def string(text: str | bytes, *, length: int | None = None) -> bytes:
    """A GGUF string: u64 length, then the bytes; `length` makes the prefix lie."""
    raw = text.encode() if isinstance(text, str) else text
    return u64(len(raw) if length is None else length) + raw


def scalar(vtype: int, value: object) -> bytes:
    if vtype == T.STRING:
        assert isinstance(value, str | bytes)
        return string(value)
    fmt = _FORMATS[T(vtype)]
    if fmt in "fd":
        assert isinstance(value, int | float)
        return struct.pack("<" + fmt, value)
    assert isinstance(value, int)
    return _int(fmt, value)


@dataclass(frozen=True)
class KV:
    """One metadata entry: the key, its type id and the encoded value that follows."""

    key: str | bytes
    vtype: int
    payload: bytes

    def encode(self) -> bytes:
        return string(self.key) + u32(self.vtype) + self.payload


def kv(key: str | bytes, vtype: int, value: object) -> KV:
    return KV(key, vtype, scalar(vtype, value))


def kv_array(key: str | bytes, item_type: int, items: Sequence[object], *, length: int | None = None) -> KV:
    """An array entry; `length` makes the declared item count lie."""
    body = b"".join(scalar(item_type, item) for item in items)
    return KV(key, T.ARRAY, u32(item_type) + u64(len(items) if length is None else length) + body)


@dataclass(frozen=True)
class Tensor:
    """One tensor-table entry. `offset` None packs it after the previous one; `n_dims` overrides
    the count written before the shape."""

    name: str | bytes
    shape: Sequence[int] = (8, 8)
    ggml_type: int = GGMLQuantizationType.F32
    offset: int | None = None
    n_dims: int | None = None

    def n_bytes(self) -> int:
        block, size = _type_sizes(self.ggml_type)
        n = 1
        for ne in self.shape:
            n *= ne
        return max(0, n // block * size)


def _type_sizes(ggml_type: int) -> tuple[int, int]:
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return (1, 1)


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment if alignment > 0 else n


def model_kvs(arch: str = "llama", *, vocab: int = 8) -> list[KV]:
    """The metadata of a small model llama.cpp's loader would read: sizes and a tokenizer."""
    return [
        kv("general.architecture", T.STRING, arch),
        kv("general.name", T.STRING, "hostile test model"),
        kv(f"{arch}.context_length", T.UINT32, 256),
        kv(f"{arch}.embedding_length", T.UINT32, 8),
        kv(f"{arch}.block_count", T.UINT32, 1),
        kv_array("tokenizer.ggml.tokens", T.STRING, [f"t{i}" for i in range(vocab)]),
        kv_array("tokenizer.ggml.scores", T.FLOAT32, [0.0] * vocab),
        kv_array("tokenizer.ggml.token_type", T.INT32, [1] * vocab),
    ]


def model_tensors() -> list[Tensor]:
    return [Tensor("blk.0.weight"), Tensor("blk.1.weight")]


def gguf_bytes(
    kvs: Sequence[KV] | None = None,
    tensors: Sequence[Tensor] | None = None,
    *,
    magic: bytes = b"GGUF",
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    alignment: int = 32,
    data_size: int | None = None,
) -> bytes:
    """A whole file: header, metadata, tensor table, padding and zeroed tensor data.

    `alignment` is the one the data section is laid out with (set general.alignment to match);
    `data_size` overrides how many data bytes follow (default: all tensors, packed and padded).
    """
    kvs = model_kvs() if kvs is None else kvs
    tensors = model_tensors() if tensors is None else tensors
    out = bytearray(magic + u32(version))
    out += u64(len(tensors) if n_tensors is None else n_tensors)
    out += u64(len(kvs) if n_kv is None else n_kv)
    for entry in kvs:
        out += entry.encode()
    packed = 0
    for tensor in tensors:
        offset = packed if tensor.offset is None else tensor.offset
        dims = len(tensor.shape) if tensor.n_dims is None else tensor.n_dims
        out += string(tensor.name) + u32(dims) + b"".join(u64(ne) for ne in tensor.shape)
        out += u32(tensor.ggml_type) + u64(offset)
        packed = _pad(offset + tensor.n_bytes(), alignment)
    if data_size is None:
        data_size = packed if packed < 1 << 24 else 0
    if tensors:
        out += bytes(_pad(len(out), alignment) - len(out))
    return bytes(out) + bytes(data_size)


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def write_sparse(path: Path, head: bytes, size: int) -> Path:
    """`head`, then zeros up to `size` bytes, as a sparse file: large on paper, small on disk."""
    with path.open("wb") as fh:
        fh.write(head)
        fh.truncate(size)
    return path


# -- llama.cpp's own verdict -------------------------------------------------------------------

_PROBE = """
import ctypes, json, sys

class Params(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

lib = ctypes.CDLL(sys.argv[1])
lib.gguf_init_from_file.restype = ctypes.c_void_p
lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, Params]
lib.gguf_free.argtypes = [ctypes.c_void_p]
lib.ggml_commit.restype = ctypes.c_char_p
verdicts = {}
for name in sys.argv[2:]:
    ctx = lib.gguf_init_from_file(name.encode(), Params(True, None))
    verdicts[name] = bool(ctx)
    if ctx:
        lib.gguf_free(ctx)
print(json.dumps({"commit": lib.ggml_commit().decode(), "accepts": verdicts}))
"""


def llama_cpp_lib_dir() -> Path | None:
    """The folder of llama-cpp-python's native libraries, found without importing llama_cpp."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return lib if (lib / "libggml-base.so").is_file() else None


def llama_cpp_verdicts(paths: Sequence[Path]) -> tuple[str, dict[Path, bool]]:
    """Whether the vendored `gguf_init_from_file` (header only, no tensor data) accepts each file,
    asked in a child process so that a crash cannot take the tests down; and the ggml commit."""
    lib = llama_cpp_lib_dir()
    assert lib is not None, "llama-cpp-python's libraries are not installed"
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(lib / "libggml-base.so"), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    answer = json.loads(done.stdout.splitlines()[-1])
    return answer["commit"], {Path(name): ok for name, ok in answer["accepts"].items()}
