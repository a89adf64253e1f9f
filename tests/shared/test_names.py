from __future__ import annotations

import pytest
from pendra_shared.errors import InvalidModelName
from pendra_shared.names import ModelRef, file_name_for, name_for_file, parse_name


@pytest.mark.parametrize(
    ("raw", "ref"),
    [
        ("qwen3", ModelRef("qwen3", None)),
        ("qwen3:0.6b", ModelRef("qwen3", "0.6b")),
        ("Qwen3:4B-Instruct-2507-Q8_0", ModelRef("qwen3", "4b-instruct-2507-q8_0")),
        ("nomic-embed-text:v1.5", ModelRef("nomic-embed-text", "v1.5")),
    ],
)
def test_valid_names(raw: str, ref: ModelRef) -> None:
    assert parse_name(raw) == ref


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "../etc/passwd",
        "..",
        "qwen3:../../x",
        "/abs/path",
        "qwen3/4b",
        r"..\win",
        "a\x00b",
        "qwen3:",
        ":tag",
        "qwen3:a:b",
        ".hidden",
        "-dash",
        "qwen\u2024:4b",
        "ｑwen3",
        "q" * 65,
        "qwen3 4b",
        r"C:\\model",
        "foo:x.mmproj",  # its file would be foo:x's vision projector's name
        "foo.mmproj",
    ],
)
def test_unsafe_names_are_refused(raw: str) -> None:
    with pytest.raises(InvalidModelName):
        parse_name(raw)


def test_store_file_names_are_plain() -> None:
    assert file_name_for(ModelRef("qwen3", "0.6b")) == "qwen3-0.6b.gguf"
    assert file_name_for(ModelRef("mymodel")) == "mymodel.gguf"


@pytest.mark.parametrize(
    ("file_name", "name"),
    [
        ("Qwen3-0.6B.Q4_K_M.gguf", "qwen3-0.6b.q4_k_m"),
        ("My Model (final).gguf", "my-model-final"),
        ("modèle.gguf", "modele"),
        ("---.gguf", None),
    ],
)
def test_hand_dropped_names(file_name: str, name: str | None) -> None:
    assert name_for_file(file_name) == name
