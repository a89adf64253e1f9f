"""Hypothesis fuzz of the GGUF header reader (hardening §1.1, CVE-2025-66960 class).

Two sources of input: a small valid model damaged a few bytes at a time (flips, overwrites with
extreme lengths and counts at the fields that hold them, cuts, splices), and headers generated
field by field with hostile values. The properties: reading raises nothing but HeaderError or
InvalidGGUF, never starts a read at or past the end of the file, and is quick; what it accepts
is laid out the way llama.cpp needs, and llama.cpp's own parser accepts it too. The profile is
derandomized and keeps no example database, so CI runs the same examples every time.
"""

from __future__ import annotations

import io
import random
import struct
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pendra_shared.gguf_header import GGML_MAX_DIMS, GGUFHeader, HeaderError, parse_header
from pendra_shared.gguf_info import InvalidGGUF, gguf_facts

from tests.support.hostile_ggufs import (
    KV,
    T,
    Tensor,
    gguf_bytes,
    kv,
    kv_array,
    llama_cpp_lib_dir,
    llama_cpp_verdicts,
    model_kvs,
    u32,
    u64,
    write,
)

FUZZ = settings(
    max_examples=200,
    deadline=timedelta(milliseconds=500),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# A valid model with a 70-token vocabulary (arrays over 64 items are skipped, not decoded).
SEED = gguf_bytes(model_kvs(vocab=70))
EXTREMES = [0, 1, 7, 63, 64, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
# Value and ggml type ids worth trying in a type field: string, array, f64, unknown; removed, Q2_0.
TYPE_IDS = [4, 8, 9, 12, 13, 31, 42, 43]


def field_offsets(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every count, length, type and offset field of a valid file."""
    fields = [(8, 8), (16, 8)]
    pos = 24

    def string(record: bool = True) -> None:
        nonlocal pos
        if record:
            fields.append((pos, 8))
        pos += 8 + struct.unpack_from("<Q", data, pos)[0]

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    for _ in range(n_kv):
        string()
        fields.append((pos, 4))
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if vtype == T.STRING:
            string()
        elif vtype == T.ARRAY:
            item_type, length = struct.unpack_from("<IQ", data, pos)
            fields += [(pos, 4), (pos + 4, 8)]
            pos += 12
            for index in range(length):
                if item_type == T.STRING:
                    string(record=index < 2)  # not every token: the tensor fields must get a turn
                else:
                    pos += sizes[item_type]
        else:
            pos += sizes[vtype]
    for _ in range(n_tensors):
        string()
        (n_dims,) = struct.unpack_from("<I", data, pos)
        fields.append((pos, 4))
        fields += [(pos + 4 + 8 * i, 8) for i in range(n_dims)]
        pos += 4 + 8 * n_dims
        fields += [(pos, 4), (pos + 4, 8)]
        pos += 12
    return fields


FIELDS = field_offsets(SEED)


class WatchedFile(io.BytesIO):
    """A file in memory that fails the test if the reader starts a read at or past its end."""

    def read(self, size: int | None = -1, /) -> bytes:
        assert self.tell() < len(self.getbuffer()), "a read at or past the end of the file"
        return super().read(size)


def read(data: bytes) -> GGUFHeader | None:
    """The header if the reader accepts `data` as a model; None if it refuses it with a reason."""
    start = time.perf_counter()
    try:
        header = parse_header(WatchedFile(data), len(data))
        gguf_facts(header)
    except HeaderError as exc:
        assert "shrank" not in str(exc)  # the file never changes here
        return None
    except InvalidGGUF:
        return None
    finally:
        assert time.perf_counter() - start < 0.25
    return header


def assert_llama_cpp_layout(header: GGUFHeader, size: int) -> None:
    """What an accepted header promises: tensors packed, aligned and inside the file."""
    assert header.data_start % header.alignment == 0
    expected = header.data_start
    for tensor in header.tensors:
        assert 1 <= len(tensor.shape) <= GGML_MAX_DIMS and min(tensor.shape) >= 1
        assert tensor.data_offset == expected
        assert tensor.data_offset + tensor.n_bytes <= size
        expected += -(-tensor.n_bytes // header.alignment) * header.alignment
    assert len({t.name for t in header.tensors}) == len(header.tensors)


def mutate(data: bytes, draw_int: Any, draw_bytes: Any, steps: int) -> bytes:
    """Damage `data` `steps` times; draw_int(lo, hi) and draw_bytes(n) supply the choices."""
    out = bytearray(data)
    for _ in range(steps):
        op = draw_int(0, 6)
        pos = draw_int(0, max(0, len(out) - 1))
        if op == 0:  # flip one bit
            if out:
                out[pos] ^= 1 << draw_int(0, 7)
        elif op in (1, 2):  # an extreme value in a count, length, type or offset field
            field_pos, width = FIELDS[draw_int(0, len(FIELDS) - 1)]
            choices = EXTREMES + TYPE_IDS if width == 4 else EXTREMES
            value = choices[draw_int(0, len(choices) - 1)] if op == 1 else draw_int(0, 2**64 - 1)
            out[field_pos : field_pos + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        elif op == 3:  # cut
            del out[pos:]
        elif op == 4:  # splice in new bytes
            out[pos:pos] = draw_bytes(draw_int(1, 64))
        elif op == 5:  # drop some bytes
            del out[pos : pos + draw_int(1, 64)]
        else:  # overwrite one byte
            if out:
                out[pos] = draw_int(0, 255)
    return bytes(out)


@st.composite
def damaged_models(draw: st.DrawFn) -> bytes:
    def draw_int(lo: int, hi: int) -> int:
        return draw(st.integers(lo, hi))

    def draw_bytes(n: int) -> bytes:
        return draw(st.binary(min_size=n, max_size=n))

    return mutate(SEED, draw_int, draw_bytes, draw(st.integers(1, 4)))


KEYS = [
    "general.architecture",
    "general.alignment",
    "llama.block_count",
    "llama.context_length",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.chat_template",
    "x",
]
ints = st.one_of(st.sampled_from(EXTREMES), st.integers(-3, 300))


@st.composite
def metadata_entries(draw: st.DrawFn) -> KV:
    key = draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)))
    kind = draw(st.integers(0, 4))
    if kind == 0:  # a scalar of a valid type
        vtype = draw(st.sampled_from([t for t in T if t not in (T.ARRAY, T.STRING)]))
        if vtype in (T.FLOAT32, T.FLOAT64):
            return kv(key, vtype, draw(st.floats(width=32)))
        return kv(key, vtype, draw(ints))
    if kind == 1:
        return kv(key, T.STRING, draw(st.sampled_from(["llama", ""]) | st.text(max_size=20)))
    if kind == 2:
        item_type = draw(st.sampled_from([T.STRING, T.FLOAT32, T.INT32, T.UINT8]))
        items: list[object] = ["t"] * draw(st.integers(0, 70))
        if item_type != T.STRING:
            items = [0] * len(items)
        length = draw(st.none() | ints)
        return kv_array(key, item_type, items, length=length)
    if kind == 3:  # an array of arrays, of an unknown type, or of bools: raw items
        raw_type: int = draw(st.sampled_from([T.ARRAY, T.BOOL, 13, 2**32 - 1]))
        body = draw(st.binary(max_size=24))
        return KV(key, T.ARRAY, u32(raw_type) + u64(draw(st.integers(0, 30) | ints)) + body)
    return KV(key, draw(st.integers(0, 20) | st.sampled_from([2**32 - 1])), draw(st.binary(max_size=24)))


@st.composite
def tensor_entries(draw: st.DrawFn) -> Tensor:
    return Tensor(
        name=draw(st.sampled_from(["a", "b", "n" * 64]) | st.binary(max_size=8)),
        shape=draw(st.lists(ints, max_size=6)),
        ggml_type=draw(st.integers(0, 45) | st.sampled_from([2**32 - 1])),
        offset=draw(st.none() | st.sampled_from([0, 32, 256, 2**64 - 32]) | st.integers(0, 4096)),
        n_dims=draw(st.none() | st.integers(0, 9)),
    )


@st.composite
def generated_headers(draw: st.DrawFn) -> bytes:
    base = model_kvs() if draw(st.booleans()) else []
    return gguf_bytes(
        base + draw(st.lists(metadata_entries(), max_size=5)),
        draw(st.lists(tensor_entries(), max_size=4)),
        version=draw(st.sampled_from([3, 2]) | st.integers(0, 2**32 - 1)),
        n_kv=draw(st.none() | st.sampled_from(EXTREMES)),
        n_tensors=draw(st.none() | st.sampled_from(EXTREMES)),
        alignment=draw(st.sampled_from([32, 1, 64, 3])),
        data_size=draw(st.none() | st.integers(0, 2048)),
    )


def test_the_seed_is_valid() -> None:
    header = read(SEED)
    assert header is not None
    assert_llama_cpp_layout(header, len(SEED))
    assert len(FIELDS) > 20


@FUZZ
@given(damaged_models())
def test_damaged_models_fail_cleanly(data: bytes) -> None:
    header = read(data)
    if header is not None:
        assert_llama_cpp_layout(header, len(data))


@FUZZ
@given(generated_headers())
def test_generated_headers_fail_cleanly(data: bytes) -> None:
    header = read(data)
    if header is not None:
        assert_llama_cpp_layout(header, len(data))


def every_field_at_every_extreme() -> list[bytes]:
    """The seed with one field overwritten, for each field and each value worth trying there."""
    out = []
    for pos, width in FIELDS:
        for value in EXTREMES + TYPE_IDS if width == 4 else EXTREMES:
            data = bytearray(SEED)
            data[pos : pos + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
            out.append(bytes(data))
    return out


def test_every_field_at_every_extreme_fails_cleanly() -> None:
    # Exhaustive where random draws are thin: each count, length, type, shape and offset field.
    accepted = 0
    for data in every_field_at_every_extreme():
        header = read(data)
        if header is not None:
            assert_llama_cpp_layout(header, len(data))
            accepted += 1
    assert accepted > 10


@pytest.mark.skipif(llama_cpp_lib_dir() is None, reason="llama-cpp-python is not installed")
def test_what_pendra_accepts_llama_cpp_accepts(tmp_path: Path) -> None:
    # Stricter, never looser: every damaged model Pendra still accepts parses in llama.cpp too.
    rng = random.Random(9)
    candidates = every_field_at_every_extreme()
    candidates += [mutate(SEED, rng.randint, rng.randbytes, rng.randint(1, 3)) for _ in range(600)]
    accepted = [
        write(tmp_path / f"{index}.gguf", data)
        for index, data in enumerate(candidates)
        if read(data) is not None
    ]
    assert len(accepted) > 50
    _, verdicts = llama_cpp_verdicts(accepted)
    assert [path.name for path, ok in verdicts.items() if not ok] == []
