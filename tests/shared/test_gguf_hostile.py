"""Hostile GGUF files (hardening F9; checklist B1-B6 and B13).

Each file here is refused with a reason before llama.cpp sees it, quickly and without reading large
values into memory. The valid files at the end must keep passing, and the vendored llama.cpp must
carry the fixes for the native loader's known overflows.
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest
from pendra_shared.config import Settings
from pendra_shared.gguf_header import (
    DEFAULT_MAX_ARRAY_LEN,
    DEFAULT_MAX_STRING_BYTES,
    HeaderError,
    read_header,
)
from pendra_shared.gguf_info import InvalidGGUF, read_gguf_facts

from tests.support.ggufs import write_gguf
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
    write_sparse,
)

U64_MAX = 2**64 - 1


def refused(path: Path, match: str, **limits: int) -> str:
    """Assert `path` is refused with a reason matching `match`, in well under a second."""
    start = time.perf_counter()
    with pytest.raises(InvalidGGUF, match=match) as caught:
        read_gguf_facts(path, **limits)
    assert time.perf_counter() - start < 1.0
    return str(caught.value)


def with_kv(*extra: KV, drop: str = "") -> list[KV]:
    """The valid model's metadata with `drop` taken out and `extra` added."""
    return [entry for entry in model_kvs() if entry.key != drop] + list(extra)


# -- B1/B2: truncated files and absurd counts ---------------------------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "only 0 bytes"),
        (b"GGUF", "only 4 bytes"),
        (gguf_bytes(data_size=0), "truncated"),  # header, table and padding, no tensor data
        (gguf_bytes(data_size=0)[:-40], "truncated"),  # the tensor table cut short
        (gguf_bytes(alignment=1, data_size=0), "the tensor data starts at byte 640 but the file has 613"),
        (gguf_bytes()[:-1], r"truncated: tensor 'blk.1.weight' ends at byte \d+ but the file has"),
        (gguf_bytes(n_tensors=U64_MAX), "impossible tensor or metadata count"),
        (gguf_bytes(n_kv=U64_MAX), "impossible tensor or metadata count"),
        (gguf_bytes(n_tensors=2**63), "impossible tensor or metadata count"),  # negative as int64
        (gguf_bytes(magic=b"GGUG"), "not a GGUF file"),
        (gguf_bytes(version=0), "too old"),
        (gguf_bytes(version=1), "too old"),
        (gguf_bytes(version=4), "too new"),
        (gguf_bytes(version=0x03000000), "byte order"),  # a big-endian v3 file
    ],
    ids=[
        "empty",
        "magic-only",
        "header-only",
        "table-cut",
        "no-padding",
        "last-tensor-1-byte-short",
        "n_tensors-max",
        "n_kv-max",
        "n_tensors-negative",
        "magic",
        "v0",
        "v1",
        "v4",
        "big-endian",
    ],
)
def test_truncated_and_impossible_headers(tmp_path: Path, content: bytes, reason: str) -> None:
    refused(write(tmp_path / "bad.gguf", content), reason)


# -- B3: tensor shapes and types ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensor", "reason"),
    [
        (Tensor("t", shape=()), "0 dimensions"),
        (Tensor("t", shape=(8, 1, 1, 1, 1)), "5 dimensions"),
        (Tensor("t", shape=(8,) * 8), "8 dimensions"),
        (Tensor("t", shape=(8, 0)), "below 1"),  # ne[1] = 0: SIGFPE in gguf.cpp
        (Tensor("t", shape=(0, 8)), "below 1"),
        (Tensor("t", shape=(8, -1)), "below 1"),  # 2^64-1, negative as int64
        (Tensor("t", shape=(2**32, 2**32, 2**32)), "more than 2"),
        (Tensor("t", shape=(2**31, 2**31, 2)), "more than 2"),
        (Tensor("t", shape=(4, 2**30 - 1, 2**30 + 1)), "ends at byte"),  # 2^64-16 bytes: GGML_PAD wrap
        (Tensor("t", shape=(33, 2), ggml_type=2), "not a multiple of the Q4_0 block size 32"),
        (Tensor("t", shape=(32, 2), ggml_type=12), "not a multiple of the Q4_K block size 256"),
        (Tensor("t", ggml_type=43), "unknown type 43"),
        (Tensor("t", ggml_type=2**32 - 1), "unknown type"),  # -1 as int32
        (Tensor("t", ggml_type=4), r"Q4_2 \(4\) is no longer supported"),
        (Tensor("t", ggml_type=31), r"Q4_0_4_4 \(31\) is no longer supported"),
        (Tensor("t", ggml_type=42), "unknown type 42"),  # Q2_0: newer than the gguf package here
    ],
    ids=[
        "0-dims",
        "5-dims",
        "8-dims",
        "ne1-zero",
        "ne0-zero",
        "ne-negative",
        "2^96-elements",
        "2^63-elements",
        "pad-wrap-bytes",
        "q4_0-row",
        "q4_k-row",
        "type-43",
        "type-minus-1",
        "removed-q4_2",
        "removed-q4_0_4_4",
        "q2_0",
    ],
)
def test_bad_tensor_shapes_and_types(tmp_path: Path, tensor: Tensor, reason: str) -> None:
    refused(write(tmp_path / "bad.gguf", gguf_bytes(tensors=[tensor], data_size=4096)), reason)


# -- B4: names, offsets and alignment -----------------------------------------------------------


@pytest.mark.parametrize(
    ("tensors", "data_size", "reason"),
    [
        ([Tensor("a"), Tensor("b", offset=257)], 1024, "offset 257 is not a multiple of the alignment 32"),
        ([Tensor("a"), Tensor("b", offset=0)], None, "tensors 'a' and 'b' overlap"),
        ([Tensor("a", shape=(8, 16)), Tensor("b", offset=256)], None, "overlap"),
        ([Tensor("a"), Tensor("b", offset=512)], 1024, "data offset 512, expected 256"),  # a gap
        ([Tensor("a", offset=256), Tensor("b", offset=0)], 512, "'a' data offset 256, expected 0"),  # swapped
        ([Tensor("a"), Tensor("b", offset=4096)], 512, "truncated: tensor 'b' ends at byte"),
        ([Tensor("a"), Tensor("b", offset=2**64 - 32)], 512, "truncated: tensor 'b'"),  # wraps 2^64
        ([Tensor("a"), Tensor("a")], None, "duplicate tensor name 'a'"),
        ([Tensor("n" * 64)], None, "name is 64 bytes long"),  # GGML_MAX_NAME counts the NUL
        ([Tensor("n" * 100_000)], None, "name is 100000 bytes long"),
        ([Tensor(b"a\0b")], None, "contains NUL"),
        ([Tensor(b"")], None, "name is empty"),
        ([Tensor(b"\xff\xfe")], None, "not UTF-8"),
    ],
    ids=[
        "misaligned",
        "same-offset",
        "overlap",
        "gap",
        "out-of-order",
        "past-eof",
        "offset-wraps",
        "duplicate-name",
        "name-64",
        "name-100k",
        "name-nul",
        "name-empty",
        "name-not-utf8",
    ],
)
def test_bad_tensor_layout_and_names(
    tmp_path: Path, tensors: list[Tensor], data_size: int | None, reason: str
) -> None:
    refused(write(tmp_path / "bad.gguf", gguf_bytes(tensors=tensors, data_size=data_size)), reason)


def test_a_lying_name_length_is_refused_before_reading(tmp_path: Path) -> None:
    head = gguf_bytes(tensors=[], n_tensors=1) + u64(2**40)
    refused(write_sparse(tmp_path / "bad.gguf", head, len(head) + 10_000), "name is 1099511627776 bytes long")


@pytest.mark.parametrize(
    ("alignment", "reason"),
    [
        (kv("general.alignment", T.UINT32, 0), "general.alignment is 0, not a power of two"),
        (kv("general.alignment", T.UINT32, 3), "general.alignment is 3, not a power of two"),
        (kv("general.alignment", T.UINT32, 2**31 + 1), "not a power of two"),
        (kv("general.alignment", T.UINT64, 32), "general.alignment must be a u32, not uint64"),
        (kv("general.alignment", T.INT32, 32), "must be a u32, not int32"),
        (kv("general.alignment", T.STRING, "32"), "must be a u32, not string"),
        (kv_array("general.alignment", T.UINT32, [32]), "must be a u32, not an array of uint32"),
    ],
    ids=["zero", "three", "odd-large", "u64", "i32", "string", "array"],
)
def test_bad_alignment(tmp_path: Path, alignment: KV, reason: str) -> None:
    refused(write(tmp_path / "bad.gguf", gguf_bytes(with_kv(alignment))), reason)


# -- metadata keys and value types ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (kv("general.name", T.STRING, "again"), "duplicate metadata key 'general.name'"),
        (kv("", T.UINT8, 1), "metadata key #8 is empty"),
        (kv(b"\xc3\x28", T.UINT8, 1), "not UTF-8"),
        (KV("x", 13, b""), "unknown value type 13"),
        (KV("x", 2**32 - 1, b""), "unknown value type 4294967295"),
        (KV("x", T.ARRAY, u32(99) + u64(0)), "unknown value type 99"),
        (KV("x", T.ARRAY, u32(T.ARRAY) + u64(1) + u32(T.UINT8) + u64(1) + b"\0"), "arrays of arrays"),
        (KV("x", T.STRING, u64(U64_MAX)), "x is 18446744073709551615 bytes long"),
        (KV("x", T.ARRAY, u32(T.UINT8) + u64(U64_MAX)), "an array of 18446744073709551615 items"),
        (KV("x", T.ARRAY, u32(T.UINT32) + u64(1000)), "truncated header: x runs past the end"),
    ],
    ids=[
        "duplicate-key",
        "empty-key",
        "key-not-utf8",
        "type-13",
        "type-max",
        "array-of-type-99",
        "nested-array",
        "string-max-length",
        "array-max-length",
        "array-past-eof",
    ],
)
def test_bad_metadata_entries(tmp_path: Path, extra: KV, reason: str) -> None:
    refused(write(tmp_path / "bad.gguf", gguf_bytes(with_kv(extra))), reason)


# -- B5: tokenizer arrays and the sizes every architecture reads ---------------------------------


@pytest.mark.parametrize(
    ("replacement", "reason"),
    [
        (
            kv_array("tokenizer.ggml.scores", T.UINT8, [0] * 8),
            "scores must be an array of float32, not an array of uint8",
        ),
        (kv_array("tokenizer.ggml.scores", T.INT32, [0] * 8), "scores must be an array of float32"),
        (kv("tokenizer.ggml.scores", T.FLOAT32, 0.0), "must be an array of float32, not float32"),
        (kv_array("tokenizer.ggml.tokens", T.INT32, [0] * 8), "tokens must be an array of string"),
        (kv("tokenizer.ggml.tokens", T.STRING, "t0"), "tokens must be an array of string, not string"),
        (kv_array("tokenizer.ggml.token_type", T.UINT8, [1] * 8), "token_type must be an array of int32"),
        (kv_array("tokenizer.ggml.token_type", T.FLOAT32, [1.0] * 8), "token_type must be an array of int32"),
        (kv_array("tokenizer.ggml.scores", T.FLOAT32, [0.0] * 7), "differ in length.*scores has 7"),
        (kv_array("tokenizer.ggml.token_type", T.INT32, [1] * 100), "differ in length.*token_type has 100"),
        (kv_array("tokenizer.ggml.tokens", T.STRING, ["t"] * 9), "differ in length.*tokens has 9"),
    ],
    ids=[
        "scores-u8",
        "scores-i32",
        "scores-scalar",
        "tokens-i32",
        "tokens-scalar",
        "token_type-u8",
        "token_type-f32",
        "scores-short",
        "token_type-long",
        "tokens-long",
    ],
)
def test_bad_tokenizer_arrays(tmp_path: Path, replacement: KV, reason: str) -> None:
    assert isinstance(replacement.key, str)
    refused(write(tmp_path / "bad.gguf", gguf_bytes(with_kv(replacement, drop=replacement.key))), reason)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (
            kv_array("tokenizer.ggml.merges", T.INT32, [1, 2]),
            "merges must be an array of string, not an array of int32",
        ),
        (
            kv_array("tokenizer.ggml.precompiled_charsmap", T.FLOAT32, [1.0]),
            "must be an array of uint8 or int8",
        ),
    ],
    ids=["merges-i32", "charsmap-f32"],
)
def test_bad_optional_tokenizer_arrays(tmp_path: Path, extra: KV, reason: str) -> None:
    refused(write(tmp_path / "bad.gguf", gguf_bytes(with_kv(extra))), reason)


@pytest.mark.parametrize(
    ("replacement", "reason"),
    [
        (kv("llama.block_count", T.STRING, "1"), "llama.block_count must be a u32, not string"),
        (kv("llama.block_count", T.INT32, 1), "block_count must be a u32, not int32"),
        (kv("llama.block_count", T.UINT32, 0), "llama.block_count is 0"),
        (kv("llama.context_length", T.UINT64, 256), "context_length must be a u32, not uint64"),
        (kv("llama.context_length", T.UINT32, 0), "llama.context_length is 0"),
        (kv("llama.embedding_length", T.FLOAT32, 8.0), "embedding_length must be a u32, not float32"),
        (kv_array("llama.embedding_length", T.UINT32, [8]), "not an array of uint32"),
    ],
    ids=[
        "block_count-str",
        "block_count-i32",
        "block_count-0",
        "context_length-u64",
        "context_length-0",
        "embedding_length-f32",
        "embedding_length-array",
    ],
)
def test_bad_architecture_sizes(tmp_path: Path, replacement: KV, reason: str) -> None:
    assert isinstance(replacement.key, str)
    refused(write(tmp_path / "bad.gguf", gguf_bytes(with_kv(replacement, drop=replacement.key))), reason)


# -- B6: huge values are refused without being read ----------------------------------------------


def sparse_with(tmp_path: Path, entry: KV, payload_size: int) -> Path:
    """A file whose last metadata entry declares `payload_size` more bytes, which are sparse zeros."""
    head = gguf_bytes(with_kv(entry), tensors=[])
    return write_sparse(tmp_path / "huge.gguf", head, len(head) + payload_size + 4096)


@pytest.mark.parametrize(
    ("entry", "payload_size", "reason"),
    [
        (KV("tokenizer.chat_template", T.STRING, u64(500_000_000)), 500_000_000, "500000000 bytes long"),
        (KV("x", T.ARRAY, u32(T.UINT8) + u64(10**7)), 10**7, "an array of 10000000 items"),
        (KV("x", T.ARRAY, u32(T.STRING) + u64(10**7)), 8 * 10**7, "an array of 10000000 items"),
    ],
    ids=["template-500MB", "u8-array-10M", "string-array-10M"],
)
def test_huge_values_are_refused_fast_in_bounded_memory(
    tmp_path: Path, entry: KV, payload_size: int, reason: str
) -> None:
    path = sparse_with(tmp_path, entry, payload_size)
    tracemalloc.start()
    try:
        refused(path, reason)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024


def test_limits_are_the_settings_defaults() -> None:
    fields = Settings.model_fields
    assert fields["gguf_max_string_bytes"].default == DEFAULT_MAX_STRING_BYTES
    assert fields["gguf_max_array_len"].default == DEFAULT_MAX_ARRAY_LEN


def test_limits_are_passed_through(tmp_path: Path) -> None:
    template = write(
        tmp_path / "template.gguf", gguf_bytes(with_kv(kv("tokenizer.chat_template", T.STRING, "x" * 2000)))
    )
    assert read_gguf_facts(template).has_chat_template
    assert read_gguf_facts(template, max_string_bytes=2000).has_chat_template
    refused(template, "tokenizer.chat_template is 2000 bytes long", max_string_bytes=1999)
    with pytest.raises(HeaderError, match="the limit is 1999"):
        read_header(template, max_string_bytes=1999)

    # 2000 items: skipped, not decoded; one of them too long for the limit.
    vocab = [
        kv_array("tokenizer.ggml.tokens", T.STRING, ["t"] * 1999 + ["y" * 3000]),
        kv_array("tokenizer.ggml.scores", T.FLOAT32, [0.0] * 2000),
        kv_array("tokenizer.ggml.token_type", T.INT32, [1] * 2000),
    ]
    big = write(tmp_path / "vocab.gguf", gguf_bytes([*model_kvs()[:5], *vocab]))
    assert read_gguf_facts(big).architecture == "llama"
    refused(big, "tokenizer.ggml.tokens: an item is 3000 bytes long", max_string_bytes=2999)
    refused(big, "an array of 2000 items \\(the limit is 1999\\)", max_array_len=1999)
    assert read_gguf_facts(big, max_array_len=2000, max_string_bytes=3000).architecture == "llama"


# -- valid files keep passing ---------------------------------------------------------------------


VALID = {
    "model": gguf_bytes(),
    "no-tokenizer": gguf_bytes(model_kvs()[:5]),
    "alignment-64": gguf_bytes(with_kv(kv("general.alignment", T.UINT32, 64)), alignment=64),
    "alignment-1": gguf_bytes(with_kv(kv("general.alignment", T.UINT32, 1)), alignment=1),
    "name-63": gguf_bytes(tensors=[Tensor("n" * 63), Tensor("m")]),
    "4-dims": gguf_bytes(tensors=[Tensor("a", shape=(8, 2, 2, 2)), Tensor("b", shape=(3,))]),
    "quantized": gguf_bytes(
        tensors=[Tensor("q4_0", (64, 3), 2), Tensor("q4_k", (256, 2), 12), Tensor("f16", (5,), 1)]
    ),
    "merges-and-charsmap": gguf_bytes(
        with_kv(
            kv_array("tokenizer.ggml.merges", T.STRING, ["t0 t1"]),
            kv_array("tokenizer.ggml.precompiled_charsmap", T.UINT8, [1, 2, 3]),
            kv("other.block_count", T.STRING, "not read for a llama"),
        )
    ),
    "v2": gguf_bytes(version=2),
}


@pytest.mark.parametrize("name", VALID)
def test_valid_files_pass(tmp_path: Path, name: str) -> None:
    facts = read_gguf_facts(write(tmp_path / f"{name}.gguf", VALID[name]))
    assert facts.architecture == "llama"


def test_gguf_writer_files_pass(tmp_path: Path) -> None:
    for kwargs in ({}, {"tensors": 8}, {"chat_template": "{{ messages }}" * 1000}, {"arch": "bert"}):
        read_gguf_facts(write_gguf(tmp_path / "w.gguf", **kwargs))


# -- B13: the native loader behind the pre-validator ----------------------------------------------

needs_llama_cpp = pytest.mark.skipif(llama_cpp_lib_dir() is None, reason="llama-cpp-python is not installed")

# A string each fix added to the compiled library: CVE, fixed in, library, marker.
FIX_MARKERS = [
    ("CVE-2025-49847", "b5662", "libllama.so", b"invalid token size: %zu exceeds int32_t limit"),
    ("CVE-2025-52566", "b5721", "libllama.so", b"tokenization result size %zu exceeds int32_t limit"),
    ("CVE-2025-53630", "26a48ad", "libggml-base.so", b"size overflow, cannot accumulate size"),
    ("CVE-2026-27940", "b8146", "libggml-base.so", b"string length %lu exceeds maximum"),
    # The GGML_PAD wrap that bypassed the CVE-2025-53630 fix; fixed after b8146 (PR #26979).
    ("GHSA-vgg9 bypass", "after b8146", "libggml-base.so", b"overflows after padding"),
]


@needs_llama_cpp
@pytest.mark.parametrize(
    ("cve", "fixed_in", "library", "marker"), FIX_MARKERS, ids=[m[0] for m in FIX_MARKERS]
)
def test_vendored_llama_cpp_carries_the_fix(cve: str, fixed_in: str, library: str, marker: bytes) -> None:
    lib = llama_cpp_lib_dir()
    assert lib is not None
    assert marker in (lib / library).read_bytes(), f"{library} predates the fix for {cve} ({fixed_in})"


@needs_llama_cpp
def test_vendored_gguf_loader_refuses_the_overflow_pocs(tmp_path: Path) -> None:
    # The loader itself (not Pendra) must refuse both; the valid file shows the probe works.
    valid = write(tmp_path / "valid.gguf", gguf_bytes())
    # CVE-2025-53630: two 2^63-byte tensors; the running size wraps to 0 without the fix.
    accumulate = write(
        tmp_path / "accumulate.gguf",
        gguf_bytes(tensors=[Tensor("a", (2**61,)), Tensor("b", (2**61,), offset=2**63)], data_size=64),
    )
    # The bypass: one tensor of 2^64-16 bytes, which GGML_PAD rounds up to 0.
    pad_wrap = write(
        tmp_path / "pad-wrap.gguf", gguf_bytes(tensors=[Tensor("a", (4, 2**30 - 1, 2**30 + 1))], data_size=64)
    )
    commit, accepts = llama_cpp_verdicts([valid, accumulate, pad_wrap])
    assert commit
    assert accepts == {valid: True, accumulate: False, pad_wrap: False}
    for path in (accumulate, pad_wrap):
        with pytest.raises(InvalidGGUF):
            read_gguf_facts(path)
