"""`hf.co/OWNER/REPO[:QUANT]` references: parsing, and resolving against a loopback stand-in for the
Hugging Face Hub that answers the tree API as huggingface_hub's `list_repo_tree` reads it (a JSON
list of files and folders, LFS files carrying `lfs.oid`, pages chained by a `Link` header) and
serves files under `/<owner>/<repo>/resolve/<revision>/<path>`, so installs run for real."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pendra_shared.errors import (
    ChecksumMismatch,
    InvalidModelName,
    ModelNotFound,
    SourceRefused,
    TransientDownloadError,
)
from pendra_shared.hf import HFRef, parse_hf_ref, resolve
from pendra_shared.install import DownloadLimits, Installer
from pendra_shared.sources import Sources
from pendra_shared.store import ModelStore

from tests.conftest import GEMMA_SHA256, GEMMA_SIZE
from tests.support.ggufs import write_gguf
from tests.support.hfhub import TREE, FakeHub
from tests.support.httpserver import link_or_copy


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[FakeHub]:
    root = tmp_path / "hub"
    root.mkdir()
    server = FakeHub(root)
    yield server
    server.stop()


def sha_of(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def sha_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lfs(path: str, sha: str | None = None, size: int = 1000) -> dict[str, Any]:
    """A Git LFS file as the tree API lists it: `oid` is the git blob id, `lfs.oid` the SHA-256."""
    lfs_info = {"oid": sha or sha_of(path), "size": size, "pointerSize": 134}
    return {"type": "file", "oid": "1" * 40, "size": size, "path": path, "lfs": lfs_info}


def plain(path: str, size: int = 100) -> dict[str, Any]:
    return {"type": "file", "oid": "2" * 40, "size": size, "path": path}


def folder(path: str) -> dict[str, Any]:
    return {"type": "directory", "oid": "3" * 40, "size": 0, "path": path}


def ref(quant: str | None = None, repo: str = "Model-GGUF", revision: str = "main") -> HFRef:
    return HFRef("owner", repo, quant, revision)


# -- parsing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
            ("bartowski", "Llama-3.2-1B-Instruct-GGUF", "Q4_K_M"),
        ),
        ("huggingface.co/unsloth/Qwen3-8B-GGUF:UD-Q4_K_XL", ("unsloth", "Qwen3-8B-GGUF", "UD-Q4_K_XL")),
        ("HF.co/a/b", ("a", "b", None)),
        ("hf.co/a/b:latest", ("a", "b", None)),
        ("hf.co/a/b:q8_0", ("a", "b", "q8_0")),
        ("hf.co/a/b:IQ2_XXS", ("a", "b", "IQ2_XXS")),
        ("hf.co/a/b:BF16", ("a", "b", "BF16")),
        ("hf.co/my_org/model.v2_x:F16", ("my_org", "model.v2_x", "F16")),
        ("hf.co/a/" + "x" * 96, ("a", "x" * 96, None)),
    ],
)
def test_parses_hugging_face_references(text: str, expected: tuple[str, str, str | None]) -> None:
    parsed = parse_hf_ref(text)
    assert parsed is not None
    assert (parsed.owner, parsed.repo, parsed.quant, parsed.revision) == (*expected, "main")


@pytest.mark.parametrize("text", ["gemma3:270m", "gemma3", "hf.co", "hf.com/a/b", "example.com/a/b", ""])
def test_other_names_are_not_hugging_face_references(text: str) -> None:
    assert parse_hf_ref(text) is None


@pytest.mark.parametrize(
    "text",
    [
        "hf.co/",
        "hf.co/a",
        "hf.co/a/",
        "hf.co/a/b/c",
        "hf.co/a/b:",
        "hf.co/a..b/c",
        "hf.co/a/b..c",
        "hf.co/a/b--c",
        "hf.co/-a/b",
        "hf.co/a/b.",
        "hf.co/a/.b",
        "hf.co/a/b.git",
        "hf.co/a/b c",
        "hf.co/ä/b",
        "hf.co/a/" + "x" * 97,
        "hf.co/a/b:Q4 K",
        "hf.co/a/b:../x",
        "hf.co/a/b:Q4_K_M/../x",
        "hf.co/a/b:4bit",
        "hf.co/a/b:Q4__K",
        "hf.co/a/b:" + "Q" * 33,
    ],
)
def test_malformed_references_are_refused(text: str) -> None:
    with pytest.raises(InvalidModelName, match="invalid Hugging Face reference"):
        parse_hf_ref(text)


# -- choosing the file -------------------------------------------------------------------------------

REPO_FILES = [
    plain(".gitattributes"),
    plain("README.md"),
    lfs("Model-Q4_K_M.gguf"),
    lfs("Model-Q4_K_M_XL.gguf"),
    lfs("Model-Q4_K_M-imat.gguf"),
    lfs("Model-q8_0.gguf"),
    lfs("Model-UD-Q4_K_XL.gguf"),
    lfs("mmproj-Model-F16.gguf"),
    folder("IQ2_XXS"),
    lfs("IQ2_XXS/Model-IQ2_XXS-00001-of-00002.gguf"),
    lfs("IQ2_XXS/Model-IQ2_XXS-00002-of-00002.gguf"),
    folder("deep"),
    lfs("deep/Model-Q4_K_M.gguf"),
]


@pytest.mark.parametrize(
    ("quant", "chosen"),
    [
        ("Q4_K_M", "Model-Q4_K_M.gguf"),  # not _XL (no token), not -imat or deep/ (longer, deeper)
        (None, "Model-Q4_K_M.gguf"),
        ("q4_k_m", "Model-Q4_K_M.gguf"),
        ("Q8_0", "Model-q8_0.gguf"),
        ("Q4_K_M_XL", "Model-Q4_K_M_XL.gguf"),
        ("q4_k_xl", "Model-UD-Q4_K_XL.gguf"),
        ("UD-Q4_K_XL", "Model-UD-Q4_K_XL.gguf"),
    ],
)
def test_chooses_the_gguf_by_quant(hub: FakeHub, quant: str | None, chosen: str) -> None:
    hub.tree(*REPO_FILES)
    entry = resolve(ref(quant), hub.endpoint)
    assert entry.gguf_url == f"{hub.endpoint}/owner/Model-GGUF/resolve/main/{chosen}"
    assert entry.gguf_sha256 == sha_of(chosen)
    assert entry.name == f"model:{(quant or 'Q4_K_M').lower()}"
    assert entry.quantization == (quant or "Q4_K_M").upper()


@pytest.mark.parametrize("quant", ["Q4_K", "Q4", "K_M", "F16", "Q5_K_M"])
def test_no_match_lists_the_quants_there_are(hub: FakeHub, quant: str) -> None:
    hub.tree(*REPO_FILES)
    with pytest.raises(ModelNotFound) as info:
        resolve(ref(quant), hub.endpoint)
    message = str(info.value)
    assert f"no {quant} GGUF" in message
    assert "it has: IQ2_XXS, Q4_K_M, Q4_K_M_XL, Q8_0, UD-Q4_K_XL" in message  # mmproj's F16 is not


def test_split_ggufs_are_refused(hub: FakeHub) -> None:
    hub.tree(*REPO_FILES)
    with pytest.raises(ModelNotFound, match="IQ2_XXS is split into 2 files .*single-file GGUFs only"):
        resolve(ref("IQ2_XXS"), hub.endpoint)


def test_without_a_quant_the_only_gguf_is_taken(hub: FakeHub) -> None:
    hub.tree(plain("README.md"), lfs("mmproj-f16.gguf"), lfs("sub/Model.Q8_0.gguf"))
    entry = resolve(ref(), hub.endpoint)
    assert entry.gguf_url.endswith("/resolve/main/sub/Model.Q8_0.gguf")
    assert (entry.name, entry.quantization) == ("model:q8_0", "Q8_0")

    hub.tree(lfs("weights.gguf"))
    entry = resolve(ref(), hub.endpoint)
    assert (entry.name, entry.quantization) == ("model:latest", None)


def test_without_a_quant_several_ggufs_and_no_q4_k_m_is_an_error(hub: FakeHub) -> None:
    hub.tree(lfs("Model-Q8_0.gguf"), lfs("Model-BF16.gguf"), lfs("notes.gguf"))
    with pytest.raises(ModelNotFound, match=r"no Q4_K_M GGUF .*it has: BF16, Q8_0, notes\.gguf$"):
        resolve(ref(), hub.endpoint)
    hub.tree(plain("README.md"))
    with pytest.raises(ModelNotFound, match="it has no GGUF files"):
        resolve(ref(), hub.endpoint)


@pytest.mark.parametrize(
    ("projectors", "chosen"),
    [
        (["mmproj-F32.gguf", "mmproj-Q8_0.gguf", "mmproj-BF16.gguf", "mmproj-F16.gguf"], "mmproj-F16.gguf"),
        (
            ["mmproj-Model-f32.gguf", "mmproj-Model-bf16.gguf", "mmproj-Model-q8_0.gguf"],
            "mmproj-Model-bf16.gguf",
        ),
        (["mmproj-model-f32.gguf", "mmproj-model-Q8_0.gguf"], "mmproj-model-Q8_0.gguf"),
        (["mmproj.gguf", "mmproj-model-f32.gguf"], "mmproj-model-f32.gguf"),
        (["mmproj-q4_k_m.gguf", "sub/mmproj.gguf", "mmproj.gguf"], "mmproj.gguf"),  # any: the shortest
        (["MMPROJ-F16.GGUF", "mmproj-BF16.gguf"], "MMPROJ-F16.GGUF"),
    ],
)
def test_the_projector_is_chosen_by_precision(hub: FakeHub, projectors: list[str], chosen: str) -> None:
    hub.tree(lfs("Model-Q4_K_M.gguf"), *(lfs(p) for p in projectors))
    entry = resolve(ref(), hub.endpoint)
    assert entry.gguf_url.endswith("/Model-Q4_K_M.gguf")
    assert entry.mmproj_url == f"{hub.endpoint}/owner/Model-GGUF/resolve/main/{chosen}"
    assert (entry.mmproj_sha256, entry.mmproj_size_bytes) == (sha_of(chosen), 1000)


def test_projectors_without_a_pin_or_in_parts_are_never_chosen(hub: FakeHub) -> None:
    hub.tree(
        lfs("Model-Q4_K_M.gguf"),
        plain("mmproj-F16.gguf"),
        lfs("mmproj-BF16-00001-of-00002.gguf"),
        lfs("mmproj-F32.gguf", sha="AB" * 32),
        lfs("mmproj-Q8_0.gguf"),
    )
    assert resolve(ref(), hub.endpoint).mmproj_url.endswith("/mmproj-Q8_0.gguf")  # type: ignore[union-attr]
    hub.tree(lfs("Model-Q4_K_M.gguf"), plain("mmproj-F16.gguf"))
    entry = resolve(ref(), hub.endpoint)
    assert (entry.mmproj_url, entry.mmproj_sha256, entry.mmproj_size_bytes) == (None, None, None)


# -- the API -----------------------------------------------------------------------------------------


def test_pages_are_followed_through_the_link_header(hub: FakeHub) -> None:
    hub.pages[TREE] = [[plain("README.md"), folder("sub")], [lfs("sub/x.gguf")], [lfs("Model-Q4_K_M.gguf")]]
    entry = resolve(ref(), hub.endpoint)
    assert entry.gguf_url.endswith("/Model-Q4_K_M.gguf")
    assert hub.api_requests == [
        f"{TREE}?recursive=true",
        f"{TREE}?recursive=true&page=1",
        f"{TREE}?recursive=true&page=2",
    ]


def test_an_endless_chain_of_pages_is_cut_off(hub: FakeHub) -> None:
    hub.pages[TREE] = [[plain(f"f{i}.txt")] for i in range(101)] + [[lfs("Model-Q4_K_M.gguf")]]
    with pytest.raises(SourceRefused, match="runs past 100 pages"):
        resolve(ref(), hub.endpoint)
    assert len(hub.api_requests) == 100


def test_a_next_page_elsewhere_is_not_followed(hub: FakeHub) -> None:
    hub.pages[TREE] = [[plain("README.md")], [lfs("Model-Q4_K_M.gguf")]]
    hub.next_base = "http://localhost:1"
    with pytest.raises(SourceRefused, match="next page is not on"):
        resolve(ref(), hub.endpoint)
    assert len(hub.api_requests) == 1


def test_the_entry_is_pinned_to_the_lfs_oid(hub: FakeHub) -> None:
    path = "Q4 files/Model #1+x-Q4_K_M.gguf"
    hub.tree(lfs(path, sha="ab" * 32, size=123_456), path="/api/models/owner/Model-GGUF/tree/refs%2Fpr%2F1")
    entry = resolve(ref(revision="refs/pr/1"), hub.endpoint + "/")
    assert entry.gguf_sha256 == "ab" * 32 and entry.size_bytes == 123_456
    assert entry.gguf_url == (
        f"{hub.endpoint}/owner/Model-GGUF/resolve/refs%2Fpr%2F1/Q4%20files/Model%20%231%2Bx-Q4_K_M.gguf"
    )
    assert (entry.name, entry.quantization) == ("model:q4_k_m", "Q4_K_M")
    assert entry.purpose_from_header  # the verified file's header says what it is for
    assert entry.source == "hf.co/owner/Model-GGUF" and entry.allow_private is False
    assert entry.description is not None and "owner/Model-GGUF" in entry.description


@pytest.mark.parametrize(
    ("repo", "family"),
    [("Llama-3.2-1B-Instruct-GGUF", "llama-3.2-1b-instruct"), ("phi_4.gguf", "phi_4"), ("GGUF", "gguf")],
)
def test_the_family_is_the_repo_name_without_gguf(hub: FakeHub, repo: str, family: str) -> None:
    hub.tree(lfs("m-Q4_K_M.gguf"), path=f"/api/models/owner/{repo}/tree/main")
    assert resolve(ref(repo=repo), hub.endpoint).name == f"{family}:q4_k_m"


@pytest.mark.parametrize(
    "item",
    [
        plain("Model-Q4_K_M.gguf"),  # stored in git, not LFS: no SHA-256 from the Hub
        lfs("Model-Q4_K_M.gguf", sha="AB" * 32),
        lfs("Model-Q4_K_M.gguf", sha="ab" * 20),  # a git SHA-1, not a SHA-256
        lfs("Model-Q4_K_M.gguf", sha="zz" * 32),
        lfs("Model-Q4_K_M.gguf", size=0),
        {**lfs("Model-Q4_K_M.gguf"), "lfs": "yes"},
    ],
)
def test_a_file_without_a_usable_pin_is_refused(hub: FakeHub, item: dict[str, Any]) -> None:
    hub.tree(item)
    with pytest.raises(SourceRefused, match="nothing pins its bytes"):
        resolve(ref(), hub.endpoint)


def test_a_missing_repo_or_revision_is_not_found(hub: FakeHub) -> None:
    with pytest.raises(ModelNotFound, match="no such Hugging Face repo"):
        resolve(ref(), hub.endpoint)
    hub.replies[TREE] = (404, {"X-Error-Code": "RevisionNotFound"}, b"{}")
    with pytest.raises(ModelNotFound, match="has no revision 'main'"):
        resolve(ref(), hub.endpoint)


@pytest.mark.parametrize("status", [401, 403])
def test_a_gated_or_private_repo_is_refused(hub: FakeHub, status: int) -> None:
    hub.replies[TREE] = (status, {}, b'{"error": "Access restricted"}')
    with pytest.raises(SourceRefused, match=f"gated or private \\(HTTP {status}"):
        resolve(ref(), hub.endpoint)


def test_server_and_network_trouble_is_transient(hub: FakeHub) -> None:
    hub.replies[TREE] = (503, {}, b"busy")
    with pytest.raises(TransientDownloadError, match="HTTP 503"):
        resolve(ref(), hub.endpoint)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(TransientDownloadError, match="cannot reach the Hugging Face API"):
        resolve(ref(), closed, timeout_s=5)


@pytest.mark.parametrize("body", [b"not json", b'{"files": []}'])
def test_an_answer_of_another_shape_is_refused(hub: FakeHub, body: bytes) -> None:
    hub.replies[TREE] = (200, {}, body)
    with pytest.raises(SourceRefused, match="unexpected answer"):
        resolve(ref(), hub.endpoint)


# -- installing what was resolved --------------------------------------------------------------------


def installer(store: ModelStore) -> Installer:
    # The hub is on loopback, which installs reach only when allowed.
    limits = DownloadLimits(allow_private_sources=True)
    return Installer(store, Sources(timeout_s=10), retries=0, backoff_s=0.01, limits=limits)


def test_bytes_that_do_not_match_the_oid_are_not_installed(hub: FakeHub, store_dir: Path) -> None:
    served = hub.files.root / "owner/Model-GGUF/resolve/main/Model-Q8_0.gguf"
    served.parent.mkdir(parents=True)
    write_gguf(served)
    hub.tree(lfs("Model-Q8_0.gguf", sha="ab" * 32, size=served.stat().st_size))
    store = ModelStore(store_dir)
    with pytest.raises(ChecksumMismatch, match="ab" * 32):
        installer(store).install(resolve(ref("Q8_0"), hub.endpoint))
    assert store.scan().models == []
    assert [p.name for p in store.root.iterdir() if p.is_file()] == []
    assert [p.name for p in store.partial_dir.iterdir() if p.suffix != ".lock"] == []


def test_installs_the_real_gemma_through_a_resolved_entry(
    hub: FakeHub, store_dir: Path, gemma_path: Path
) -> None:
    name = "gemma-3-270m-it-Q4_K_M.gguf"
    served = hub.files.root / "unsloth/gemma-3-270m-it-GGUF/resolve/main" / name
    served.parent.mkdir(parents=True)
    link_or_copy(gemma_path, served)
    projector = write_gguf(served.parent / "mmproj-gemma-3-270m-it-F16.gguf", arch="clip")
    hub.tree(
        plain("README.md"),
        lfs("gemma-3-270m-it-Q8_0.gguf"),
        lfs(name, sha=GEMMA_SHA256, size=GEMMA_SIZE),
        lfs(projector.name, sha=sha_file(projector), size=projector.stat().st_size),
        path="/api/models/unsloth/gemma-3-270m-it-GGUF/tree/main",
    )
    reference = parse_hf_ref("hf.co/unsloth/gemma-3-270m-it-GGUF")
    assert reference is not None
    entry = resolve(reference, hub.endpoint)
    store = ModelStore(store_dir)
    result = installer(store).install(entry)
    assert result.model.name == "gemma-3-270m-it:q4_k_m"
    assert result.downloaded_bytes == GEMMA_SIZE + projector.stat().st_size
    assert result.model.path == store.root / "gemma-3-270m-it-q4_k_m.gguf"
    with result.model.path.open("rb") as fh:
        assert hashlib.file_digest(fh, "sha256").hexdigest() == GEMMA_SHA256
    sidecar = json.loads(result.model.path.with_name(result.model.path.name + ".meta.json").read_text())
    assert (sidecar["sha256"], sidecar["source_url"]) == (GEMMA_SHA256, entry.gguf_url)
    assert sidecar["projector"]["source_url"] == entry.mmproj_url
    (model,) = store.scan().models
    assert (model.name, model.status) == ("gemma-3-270m-it:q4_k_m", "ready")
    assert model.projector == store.root / "gemma-3-270m-it-q4_k_m.mmproj.gguf"
    assert model.projector.read_bytes() == projector.read_bytes()


@pytest.mark.parametrize(("arch", "pooling", "purpose"), [("bert", None, "embedding"), ("bert", 4, "rerank")])
def test_an_hf_install_records_the_purpose_its_header_gives(
    hub: FakeHub, store_dir: Path, arch: str, pooling: int | None, purpose: str
) -> None:
    served = hub.files.root / "owner/Model-GGUF/resolve/main/Model-Q4_K_M.gguf"
    served.parent.mkdir(parents=True)
    write_gguf(served, arch=arch, **({"pooling_type": pooling} if pooling else {}))  # type: ignore[arg-type]
    sha = hashlib.sha256(served.read_bytes()).hexdigest()
    hub.tree(lfs("Model-Q4_K_M.gguf", sha=sha, size=served.stat().st_size))
    store = ModelStore(store_dir)
    result = installer(store).install(resolve(ref(), hub.endpoint))
    sidecar = json.loads(result.model.path.with_name(result.model.path.name + ".meta.json").read_text())
    assert sidecar["purpose"] == purpose and result.model.purpose == purpose


def test_a_redirect_off_the_endpoint_is_refused_before_it_is_followed(hub: FakeHub) -> None:
    hub.replies[TREE] = (302, {"Location": "http://127.0.0.2:9/elsewhere"}, b"")
    with pytest.raises(SourceRefused, match="redirected to 127.0.0.2"):
        resolve(ref(), hub.endpoint)  # a connection there would fail with TransientDownloadError
