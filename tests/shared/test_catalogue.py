from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pendra_shared.catalogue import Catalogue, bundled_entries
from pendra_shared.config import load_settings
from pendra_shared.errors import CatalogueError, InvalidModelName, ModelNotFound

from tests.conftest import gemma_entry
from tests.support.httpserver import FileServer

# The public pins the bundled catalogue must carry (../shared/catalogue-facts.md and the
# nomic-embed-text Q4_K_M manifest), so a typo in catalogue.yaml fails here.
PINS = {
    "qwen3:0.6b": "dc4503da5d7cc7254055a86cd90e1a8c9d16c6ac71eb3a32b34bf48a1f4e0999",
    "qwen3:1.7b": "ea2aa5f1cce3c8df81ae5fd292a6ed265b8393cc89534dc21fc5327cc974116a",
    "qwen3:4b": "f6f851777709861056efcdad3af01da38b31223a3ba26e61a4f8bf3a2195813a",
    "qwen3:4b-instruct-2507-q8_0": "260b5b5b6ad73e44df81a43ea1f5c11c37007b6bac18eb3cd2016e8667c19662",
    "gemma3:1b": "8ccc5cd1f1b3602548715ae25a66ed73fd5dc68a210412eea643eb20eb75a135",
    "gemma3:270m-it-qat": "3626e245220ca4a1c5911eb4010b3ecb7bdbf5bc53c79403c21355354d1e2dc6",
    "nomic-embed-text:v1.5": "af8cb9e4ca0bf19eb54d08c612fdf325059264abbbd2c619527e5d2dda8de655",
    "nomic-embed-text:v1.5-q4_k_m": "d4e388894e09cf3816e8b0896d81d265b55e7a9fff9ab03fe8bf4ef5e11295ac",
    "embeddinggemma:300m": "6fa0c02a9c302be6f977521d399b4de3a46310a4f2621ee0063747881b673f67",
    "granite-embedding:125m": "e2950cf0228514e0e81c6f0701a62a9e4763990ce660b4a3c0329cd6a4acd4b9",
    "qwen3.6:27b": "5ed60d0af4650a854b1755bd392f9aef4872643dc25a254bc68043fa638392a0",
    "qwen3.6:27b-q8_0": "f93f517f38e696d35a1a7df2c0e3155a64f4c4dcd662107a146ae263f7fb14ce",
    "qwen3.6:35b-a3b": "ac0e2c1189e055faa36eff361580e79c5bd6f8e76bffb4ce547f167d53e31a61",
}


# Vision projectors, from LocalAI's gallery at the commit the catalogue cites: each from its model's
# repo, (file, the first 16 digits of its sha256).
PROJECTOR_PINS = {
    "qwen3.6:27b": ("mmproj-F32.gguf", "fdc443e974cad1f6"),
    "qwen3.6:27b-q8_0": ("mmproj-F32.gguf", "fdc443e974cad1f6"),
    "qwen3.6:35b-a3b": ("mmproj-F32.gguf", "0a1c1cd2772ae6de"),
    "qwen3.6:35b-a3b-q8_0": ("mmproj-F32.gguf", "0a1c1cd2772ae6de"),
    "gemma3:4b": ("mmproj-model-f16.gguf", "8c0fb064b019a697"),
    "gemma3:12b": ("mmproj-model-f16.gguf", "30c02d0564108482"),
    "gemma3:27b": ("mmproj-model-f16.gguf", "54cb61c842fe49ac"),
    "gemma3:27b-it-qat": ("mmproj-google_gemma-3-27b-it-qat-f16.gguf", "54cb61c842fe49ac"),
    "ministral-3:8b": ("mmproj-F32.gguf", "242d11ff65ef844b"),
}


def billions(parameters: str) -> float:
    """ "270M" -> 0.27, "30B-A3B" (total-active) -> 30."""
    value = parameters.upper().split("-")[0]
    return float(value[:-1]) / 1000 if value.endswith("M") else float(value.removesuffix("B"))


def test_bundled_catalogue_carries_the_public_pins() -> None:
    entries = {e.name: e for e in bundled_entries()}
    assert {name: entries[name].gguf_sha256 for name in PINS} == PINS
    assert all(e.gguf_url.startswith("https://huggingface.co/") for e in entries.values())
    assert entries["nomic-embed-text:v1.5-q4_k_m"].size_bytes == 84_106_624
    assert len({e.gguf_sha256 for e in entries.values()}) == len(entries)  # no pin pasted twice


def test_vision_entries_carry_their_projector_pins() -> None:
    entries = {e.name: e for e in bundled_entries()}
    found = {
        e.name: ((e.mmproj_url or "").rpartition("/")[2], (e.mmproj_sha256 or "")[:16])
        for e in entries.values()
        if e.mmproj_url or e.mmproj_sha256
    }
    assert found == PROJECTOR_PINS
    for name, (file, _sha) in PROJECTOR_PINS.items():  # a projector from the model's own repo
        repo = entries[name].gguf_url.split("/resolve/")[0]
        assert entries[name].mmproj_url == f"{repo}/resolve/main/{file}", name
    assert entries["gemma3:1b"].projector is None  # text only
    projector = entries["gemma3:4b"].projector
    assert projector is not None and projector.gguf_sha256 == entries["gemma3:4b"].mmproj_sha256
    assert projector.gguf_url == entries["gemma3:4b"].mmproj_url and projector.projector is None


def test_the_bundled_catalogue_covers_what_people_install() -> None:
    """At least 30 variants: chat from under 1B to 30B and more, embeddings and rerankers, each with
    its quantization, context length and license; one default tag per family."""
    entries = bundled_entries()
    assert len(entries) >= 30
    assert {e.purpose for e in entries} == {"chat", "embedding", "rerank"}
    sizes = [billions(e.parameters) for e in entries if e.purpose == "chat" and e.parameters]
    assert min(sizes) < 1 and max(sizes) >= 30
    assert sum(e.purpose == "rerank" for e in entries) >= 1
    for e in entries:
        assert e.quantization and e.context_length and e.license and e.description, e.name
        assert e.description.isascii(), e.name
    families: dict[str, int] = {}
    for e in entries:
        families[e.ref.family] = families.get(e.ref.family, 0) + e.default
    assert all(count == 1 for count in families.values()), families
    assert Catalogue.load().resolve("qwen3.6").name == "qwen3.6:27b"  # the product's own example


@pytest.mark.parametrize(
    ("name", "resolved"),
    [
        ("qwen3", "qwen3:4b"),
        ("gemma3", "gemma3:1b"),
        ("nomic-embed-text", "nomic-embed-text:v1.5"),
        ("QWEN3:0.6B", "qwen3:0.6b"),
        ("embeddinggemma", "embeddinggemma:300m"),
    ],
)
def test_tags_resolve_like_ollama(name: str, resolved: str) -> None:
    assert Catalogue.load().resolve(name).name == resolved


def test_unknown_names_are_clear_errors() -> None:
    catalogue = Catalogue.load()
    with pytest.raises(ModelNotFound, match=r"'qwen3:99b' is not in the catalogue; available: qwen3:0.6b"):
        catalogue.resolve("qwen3:99b")
    with pytest.raises(ModelNotFound, match="pendra models catalogue"):
        catalogue.resolve("nosuchmodel")
    with pytest.raises(InvalidModelName):
        catalogue.resolve("../etc")


def test_search_and_filter() -> None:
    catalogue = Catalogue.load()
    embedders = {e.name for e in catalogue.search(purpose="embedding")}
    assert {"nomic-embed-text:v1.5", "nomic-embed-text:v1.5-q4_k_m", "embeddinggemma:300m"} <= embedders
    assert all(e.purpose == "embedding" for e in catalogue.search(purpose="embedding"))
    assert {e.purpose for e in catalogue.search(purpose="rerank")} == {"rerank"}
    assert [e.name for e in catalogue.search("qwen3 q8_0 instruct 2507")] == ["qwen3:4b-instruct-2507-q8_0"]


def test_extra_catalogues_merge_over_the_bundled_one(write_catalogue: Callable[..., Path]) -> None:
    first = write_catalogue([gemma_entry("https://mirror.test/g.gguf", default=True)], activate=False)
    second = write_catalogue(
        [
            gemma_entry("https://other.test/g.gguf"),
            {**gemma_entry("https://x.test/q.gguf"), "name": "qwen3:4b", "description": "override"},
        ],
        suffix=".json",
        activate=False,
    )
    catalogue = Catalogue.load([str(first), str(second)])
    assert catalogue.resolve("gemma3:270m").gguf_url == "https://other.test/g.gguf"
    assert catalogue.resolve("qwen3:4b").description == "override"
    assert catalogue.resolve("qwen3:4b").source == str(second)
    assert catalogue.resolve("gemma3").name == "gemma3:1b"  # a later default wins...
    assert Catalogue.load([str(first)]).resolve("gemma3").name == "gemma3:270m"  # ...or this one


def test_catalogue_from_settings_and_url(
    write_catalogue: Callable[..., Path], file_server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = write_catalogue([gemma_entry("https://a.test/g.gguf")], activate=False)
    remote = file_server.root / "remote.yaml"
    remote.write_text(json.dumps({"models": [gemma_entry("https://b.test/g.gguf", name="gemma3:270m-b")]}))
    monkeypatch.setenv("PENDRA_CATALOGUE", f"{local}:{file_server.url('remote.yaml')}")
    settings = load_settings()
    catalogue = Catalogue.load(settings.catalogue_locations)
    assert catalogue.resolve("gemma3:270m").gguf_url == "https://a.test/g.gguf"
    assert catalogue.resolve("gemma3:270m-b").gguf_url == "https://b.test/g.gguf"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gguf_sha256": None}, r"entry #1 \(gemma3:270m\): gguf_sha256: .*64 hexadecimal"),
        ({"gguf_sha256": "abc123"}, r"entry #1 \(gemma3:270m\): gguf_sha256"),
        ({"gguf_sha256": "z" * 64}, "gguf_sha256"),
        ({"gguf_url": "ftp://x.test/a.gguf"}, "gguf_url: .*scheme must be one of"),
        ({"gguf_url": "https:///nohost"}, "gguf_url: .*no host"),
        ({"name": "../../etc/passwd"}, r"entry #1 \(\.\./\.\./etc/passwd\): name: .*invalid model name"),
        ({"name": "gemma3"}, "needs a tag"),
        ({"purpose": "painting"}, "purpose"),
        ({"size_bytes": -5}, "size_bytes"),
        ({"mmproj_url": "https://a.test/mmproj.gguf"}, "mmproj_url and mmproj_sha256 go together"),
        ({"mmproj_sha256": "ab" * 32}, "mmproj_url and mmproj_sha256 go together"),
        ({"mmproj_size_bytes": 10}, "mmproj_size_bytes needs mmproj_url"),
        (
            {"mmproj_url": "https://a.test/p.gguf", "mmproj_sha256": "AB" * 32},
            "mmproj_sha256: .*64 hexadecimal",
        ),
        ({"mmproj_url": "ftp://a.test/p.gguf", "mmproj_sha256": "ab" * 32}, "mmproj_url: .*scheme must be"),
        ({"mmproj_url": "https:///p.gguf", "mmproj_sha256": "ab" * 32}, "mmproj_url: .*no host"),
    ],
)
def test_malformed_entries_name_the_file_and_entry(
    write_catalogue: Callable[..., Path], change: dict[str, Any], message: str
) -> None:
    path = write_catalogue([gemma_entry("https://a.test/g.gguf", **change)], activate=False)
    with pytest.raises(CatalogueError, match=message) as info:
        Catalogue.load([str(path)])
    assert str(path) in str(info.value)


def test_an_entry_with_a_projector(write_catalogue: Callable[..., Path]) -> None:
    pinned = {"mmproj_url": "https://a.test/p.gguf", "mmproj_sha256": "ab" * 32, "mmproj_size_bytes": 9}
    path = write_catalogue([gemma_entry("https://a.test/g.gguf", **pinned)], activate=False)
    entry = Catalogue.load([str(path)]).resolve("gemma3:270m")
    assert (entry.mmproj_url, entry.mmproj_sha256, entry.mmproj_size_bytes) == tuple(pinned.values())
    assert entry.total_size_bytes == (entry.size_bytes or 0) + 9
    assert entry.facts()["mmproj_sha256"] == "ab" * 32  # recorded in the sidecar with the rest


def test_missing_fields_and_bad_documents(tmp_path: Path, write_catalogue: Callable[..., Path]) -> None:
    entry = gemma_entry("https://a.test/g.gguf")
    del entry["size_bytes"]
    path = write_catalogue([entry], activate=False)
    with pytest.raises(CatalogueError, match="size_bytes: field required"):
        Catalogue.load([str(path)])
    dup = write_catalogue([gemma_entry("https://a.test/g.gguf")] * 2, activate=False)
    with pytest.raises(CatalogueError, match=r"entry #2 \(gemma3:270m\): duplicate name"):
        Catalogue.load([str(dup)])
    for name, text, message in [
        ("a.yaml", "models: [unclosed", "cannot parse"),
        ("b.json", "{}", "expected a top-level 'models' list"),
        ("c.txt", "models: []", "unknown format"),
        ("d.yaml", "models:\n  - just a string\n", "entry #1: expected a mapping"),
    ]:
        bad = tmp_path / name
        bad.write_text(text)
        with pytest.raises(CatalogueError, match=message):
            Catalogue.load([str(bad)])
    with pytest.raises(CatalogueError, match="cannot read"):
        Catalogue.load([str(tmp_path / "missing.yaml")])
