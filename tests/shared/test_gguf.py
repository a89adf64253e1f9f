from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from gguf.constants import GGUFValueType
from pendra_shared.gguf_header import ArrayInfo, parse_header, read_header
from pendra_shared.gguf_info import InvalidGGUF, read_gguf_facts

from tests.support.ggufs import write_gguf


def test_real_gemma_facts(gemma_path: Path) -> None:
    facts = read_gguf_facts(gemma_path)
    assert facts.architecture == "gemma3"
    assert facts.purpose == "chat"
    assert facts.quantization == "Q4_K_M"
    assert facts.has_chat_template is False
    assert facts.context_length == 32768
    assert facts.embedding_length == 640
    assert 260_000_000 < facts.parameters < 280_000_000


def test_real_minilm_is_an_embedding_model(minilm_path: Path) -> None:
    facts = read_gguf_facts(minilm_path)
    assert (facts.architecture, facts.purpose, facts.embedding_length) == ("bert", "embedding", 384)
    assert facts.quantization == "F16"


@pytest.mark.parametrize(
    ("kwargs", "purpose"),
    [
        ({"arch": "llama"}, "chat"),
        ({"arch": "bert"}, "embedding"),
        ({"arch": "nomic-bert"}, "embedding"),
        ({"arch": "qwen3", "pooling_type": 1}, "embedding"),
        ({"arch": "bert", "pooling_type": 4}, "rerank"),  # rank pooling: a cross-encoder's score
        ({"arch": "qwen3", "pooling_type": 4}, "rerank"),
        ({"arch": "qwen3", "chat_template": "{{ messages }}"}, "chat"),
    ],
)
def test_purpose_comes_from_metadata(tmp_path: Path, kwargs: dict[str, object], purpose: str) -> None:
    # The file name says the opposite of what the metadata says; the metadata wins.
    name = "embedding-model.gguf" if purpose == "chat" else "chat-model.gguf"
    facts = read_gguf_facts(write_gguf(tmp_path / name, **kwargs))  # type: ignore[arg-type]
    assert facts.purpose == purpose
    assert facts.has_chat_template == ("chat_template" in kwargs)


def test_projector_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(InvalidGGUF, match="projector"):
        read_gguf_facts(write_gguf(tmp_path / "mmproj.gguf", arch="clip"))


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "only 0 bytes"),
        (b"NOTGGUF" + b"\x00" * 100, "not a GGUF file"),
        (b"GGUF\x03\x00\x00\x00" + b"\xff" * 16, "impossible"),
    ],
)
def test_garbage_is_invalid_with_a_reason(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(InvalidGGUF, match=reason):
        read_gguf_facts(path)


def test_truncated_files_are_invalid(tmp_path: Path, gemma_path: Path) -> None:
    data = gemma_path.read_bytes()
    cut_data = tmp_path / "cut-data.gguf"
    cut_data.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidGGUF, match="truncated: tensor"):
        read_gguf_facts(cut_data)
    cut_header = tmp_path / "cut-header.gguf"
    cut_header.write_bytes(data[:50_000])
    with pytest.raises(InvalidGGUF, match="truncated header"):
        read_gguf_facts(cut_header)


def test_real_files_pass_the_strict_checks_quickly(gemma_path: Path, minilm_path: Path) -> None:
    # Gemma's 262k-token vocabulary is skipped, not decoded: the header reads in well under 1 s.
    for path in (gemma_path, minilm_path):
        start = time.perf_counter()
        header = read_header(path)
        assert time.perf_counter() - start < 1.0
        assert header.alignment == 32
        assert header.data_start <= header.tensors[0].data_offset
        assert all(1 <= len(t.shape) <= 4 for t in header.tensors)
        read_gguf_facts(path)
    gemma = read_header(gemma_path)
    assert gemma.value_types["tokenizer.ggml.tokens"] == ArrayInfo(GGUFValueType.STRING, 262144)
    assert gemma.value_types["tokenizer.ggml.scores"] == ArrayInfo(GGUFValueType.FLOAT32, 262144)
    assert gemma.value_types["gemma3.block_count"] == GGUFValueType.UINT32
    assert isinstance(gemma.metadata["tokenizer.ggml.tokens"], ArrayInfo)


def test_a_file_replaced_while_it_is_read_is_invalid_not_a_crash(tmp_path: Path) -> None:
    # The reader uses plain reads, not mmap: a file that shrinks under it gives an error, not SIGBUS.
    path = write_gguf(tmp_path / "shrinks.gguf", tensors=8)
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.truncate(size // 3)
        with pytest.raises(ValueError, match="shrank|truncated"):
            parse_header(fh, size)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_only_regular_files_are_read(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "odd.gguf"
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading must not wait for a writer
    else:
        path.mkdir()
    with pytest.raises(InvalidGGUF):
        read_gguf_facts(path)
