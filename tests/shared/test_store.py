from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from pendra_shared.errors import InvalidModelName, ModelNotFound, StoreError
from pendra_shared.sidecar import sidecar_path, write_sidecar
from pendra_shared.store import STAMP_SETTLE_NS, ModelStore

from tests.support.ggufs import write_gguf


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    root = tmp_path / "models"
    root.mkdir()
    return ModelStore(root)


def names(store: ModelStore) -> dict[str, str]:
    return {m.name: m.status for m in store.scan().models}


def test_empty_or_missing_store_lists_nothing(tmp_path: Path) -> None:
    assert ModelStore(tmp_path / "does-not-exist").scan().models == []


def test_hand_dropped_real_model(store: ModelStore, gemma_path: Path) -> None:
    os.link(gemma_path, store.root / "Gemma-3-270M.gguf")
    (model,) = store.scan().models
    assert (model.name, model.status, model.purpose, model.origin) == (
        "gemma-3-270m",
        "ready",
        "chat",
        "hand-dropped",
    )
    assert model.facts is not None and model.facts.quantization == "Q4_K_M"
    assert store.find("gemma-3-270m").file_name == "Gemma-3-270M.gguf"
    assert store.find("Gemma-3-270M.gguf").name == "gemma-3-270m"


def test_purpose_is_read_from_metadata_not_the_file_name(store: ModelStore) -> None:
    write_gguf(store.root / "chat-model.gguf", arch="bert")
    write_gguf(store.root / "embedding-model.gguf", arch="llama")
    purposes = {m.name: m.purpose for m in store.scan().models}
    assert purposes == {"chat-model": "embedding", "embedding-model": "chat"}


def test_invalid_files_are_listed_with_reason_and_never_offered(store: ModelStore) -> None:
    (store.root / "junk.gguf").write_bytes(b"<html>not a model</html>")
    good = write_gguf(store.root / "good.gguf")
    (store.root / "half.gguf").write_bytes(good.read_bytes()[:-100])
    scan = store.scan()
    by_name = {m.name: m for m in scan.models}
    assert by_name["junk"].status == "invalid" and "not a GGUF file" in (by_name["junk"].error or "")
    assert by_name["half"].status == "invalid" and "truncated" in (by_name["half"].error or "")
    assert [m.name for m in scan.valid] == ["good"]
    with pytest.raises(ModelNotFound):
        store.find("junk")
    assert store.find("junk", include_invalid=True).status == "invalid"


def test_partial_downloads_and_other_files_are_not_models(store: ModelStore) -> None:
    (store.root / ".partial").mkdir()
    write_gguf(store.root / ".partial" / "abc.part")
    write_gguf(store.root / ".hidden.gguf")
    (store.root / "README.txt").write_text("hi")
    (store.root / "dir.gguf").mkdir()
    assert store.scan().models == []


def test_symlink_out_of_the_store_is_refused_and_uninstall_keeps_the_target(
    store: ModelStore, tmp_path: Path
) -> None:
    outside = write_gguf(tmp_path / "outside.gguf")
    (store.root / "escape.gguf").symlink_to(outside)
    write_gguf(store.root / "inner.gguf")
    (store.root / "alias.gguf").symlink_to(store.root / "inner.gguf")
    by_name = {m.name: m for m in store.scan().models}
    assert by_name["escape"].status == "invalid"
    assert "outside the store" in (by_name["escape"].error or "")
    assert by_name["escape"].facts is None  # never read
    assert by_name["alias"].status == "ready"
    store.uninstall("escape")
    assert outside.exists() and not (store.root / "escape.gguf").exists()


def test_corrupt_stale_and_orphaned_sidecars_are_reported_and_ignored(store: ModelStore) -> None:
    corrupt = write_gguf(store.root / "corrupt.gguf")
    sidecar_path(corrupt).write_text("{not json")
    stale = write_gguf(store.root / "stale.gguf")
    sidecar_path(stale).write_text(
        json.dumps(
            {
                "format_version": 1,
                "name": "renamed:v1",
                "purpose": "embedding",
                "sha256": "0" * 64,
                "source_url": "https://example.test/x.gguf",
                "size_bytes": 1,
                "installed_at": "2026-01-01T00:00:00Z",
            }
        )
    )
    evil = write_gguf(store.root / "evil.gguf")
    sidecar_path(evil).write_text(
        json.dumps(
            {
                "format_version": 1,
                "name": "../../etc/passwd",
                "purpose": "chat",
                "sha256": "0" * 64,
                "source_url": "x",
                "size_bytes": evil.stat().st_size,
                "installed_at": "2026-01-01T00:00:00Z",
            }
        )
    )
    (store.root / "gone.gguf.meta.json").write_text("{}")
    scan = store.scan()
    by_name = {m.name: m for m in scan.models}
    assert set(by_name) == {"corrupt", "stale", "evil"}  # names from the files, not the sidecars
    assert all(m.valid and m.sidecar is None for m in scan.models)
    assert "corrupt" in by_name["corrupt"].problems[0]
    assert "stale" in by_name["stale"].problems[0]
    assert by_name["stale"].purpose == "chat"  # from the metadata, not the stale sidecar
    assert "invalid model name" in by_name["evil"].problems[0]
    assert scan.problems == ["orphaned sidecar gone.gguf.meta.json (no GGUF beside it); ignored"]


def test_duplicate_names_keep_the_curated_file(store: ModelStore, tmp_path: Path) -> None:
    source = write_gguf(tmp_path / "src.gguf")
    store.import_file(source, name="dup")
    write_gguf(store.root / "DUP.gguf", name="other")  # hand-dropped, same derived name
    scan = store.scan()
    ready = [m for m in scan.models if m.valid]
    assert [(m.name, m.file_name) for m in ready] == [("dup", "dup.gguf")]
    (loser,) = [m for m in scan.models if not m.valid]
    assert loser.file_name == "DUP.gguf" and "already used by dup.gguf" in (loser.error or "")


def test_uninstall_removes_the_gguf_and_sidecar_and_nothing_else(store: ModelStore, tmp_path: Path) -> None:
    store.import_file(write_gguf(tmp_path / "a.gguf"), name="keep:v1")
    store.import_file(write_gguf(tmp_path / "b.gguf"), name="drop:v1")
    (store.root / "notes.txt").write_text("mine")
    before = sorted(p.name for p in store.root.iterdir())
    removed = store.uninstall("drop:v1")
    after = sorted(p.name for p in store.root.iterdir())
    assert removed.file_name == "drop-v1.gguf"
    assert set(before) - set(after) == {"drop-v1.gguf", "drop-v1.gguf.meta.json"}
    assert names(store) == {"keep:v1": "ready"}
    with pytest.raises(ModelNotFound, match="not in the store"):
        store.uninstall("drop:v1")


def test_a_scan_tells_whether_the_store_changed_since(store: ModelStore, tmp_path: Path) -> None:
    """What the inference registry asks before answering a listing from its last scan: a model
    placed, renamed or removed since (by the fetcher, another process) makes it scan again, and
    so does a directory changed within the file system's timestamp step."""
    store.import_file(write_gguf(tmp_path / "a.gguf"), name="first:v1")
    just_changed = store.scan()
    assert just_changed.stamp is None and not store.unchanged_since(just_changed)
    time.sleep(STAMP_SETTLE_NS / 1e9 + 0.1)
    settled = store.scan()
    assert settled.stamp is not None and store.unchanged_since(settled)
    write_gguf(store.partial_dir / "second.gguf")  # a download's bytes: no new model yet
    assert store.unchanged_since(settled)
    os.replace(store.partial_dir / "second.gguf", store.root / "second.gguf")  # placed, as installs do
    assert not store.unchanged_since(settled)
    assert [m.name for m in store.scan().valid] == ["first:v1", "second"]


@pytest.mark.parametrize("name", ["../models", "../../etc/passwd", "/etc/passwd", "x/../../y", "\x00"])
def test_traversal_names_never_touch_anything(store: ModelStore, tmp_path: Path, name: str) -> None:
    victim = tmp_path / "victim.gguf"
    write_gguf(victim)
    with pytest.raises((ModelNotFound, InvalidModelName)):
        store.uninstall(name)
    with pytest.raises((ModelNotFound, InvalidModelName)):
        store.find(name)
    with pytest.raises((InvalidModelName, StoreError)):
        store.import_file(victim, name=name)
    assert victim.exists()
    assert list(store.root.iterdir()) == [store.root / ".partial"] or list(store.root.iterdir()) == []


def test_child_refuses_anything_but_a_plain_name(store: ModelStore) -> None:
    for bad in ("../x.gguf", "a/b.gguf", "..", "", "a\x00.gguf", "a\\b.gguf"):
        with pytest.raises(StoreError):
            store.child(bad)


def test_import_copies_with_sha256_and_sidecar(store: ModelStore, gemma_path: Path) -> None:
    model = store.import_file(gemma_path, name="gemma3:270m-local")
    assert model.file_name == "gemma3-270m-local.gguf" and gemma_path.exists()
    assert model.sidecar is not None
    assert model.sidecar.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert model.sidecar.source_url == gemma_path.resolve().as_uri()
    assert model.sidecar.purpose == "chat"
    with pytest.raises(StoreError, match="already exists"):
        store.import_file(gemma_path, name="gemma3:270m-local")


# What Qwen-style templates write: tool calls in <tool_call> tags, reasoning after <think>.
THINKING_TEMPLATE = (
    "{% if tools %}<tools>{{ tools | tojson }}</tools><tool_call>{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}"
    "<|im_start|>assistant\n<think>\n"
)


def test_capabilities_come_from_the_chat_template_a_sidecar_may_replace(
    store: ModelStore, tmp_path: Path
) -> None:
    write_gguf(store.root / "plain.gguf")
    write_gguf(store.root / "thinker.gguf", chat_template=THINKING_TEMPLATE)
    write_gguf(store.root / "encoder.gguf", arch="bert")
    (store.root / "junk.gguf").write_bytes(b"not a model")
    found = {m.name: m.capabilities for m in store.scan().models}
    assert found == {
        "plain": ["completion"],
        "thinker": ["completion", "tools", "thinking"],
        "encoder": ["embedding"],
        "junk": [],
    }
    assert "chat_template" not in store.find("thinker").as_dict()["facts"]  # listings stay small
    # A sidecar's options: its own template, or a family named outright.
    model = store.import_file(write_gguf(tmp_path / "other.gguf"), name="other:1")
    assert model.sidecar is not None
    write_sidecar(
        model.path, model.sidecar.model_copy(update={"options": {"chat_template": THINKING_TEMPLATE}})
    )
    assert store.find("other:1").capabilities == ["completion", "tools", "thinking"]
    write_sidecar(model.path, model.sidecar.model_copy(update={"options": {"chat_format": "harmony"}}))
    assert store.find("other:1").capabilities == ["completion", "thinking"]


def test_import_move_and_default_name(store: ModelStore, tmp_path: Path) -> None:
    source = write_gguf(tmp_path / "Tiny-Embedder.gguf", arch="bert")
    model = store.import_file(source, move=True)
    assert not source.exists()
    assert (model.name, model.purpose) == ("tiny-embedder", "embedding")


def test_import_refuses_a_file_that_is_not_a_gguf(store: ModelStore, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    with pytest.raises(StoreError, match="not a usable GGUF"):
        store.import_file(bad)
    assert shutil.disk_usage(store.root) is not None
    assert not any(p.suffix == ".gguf" for p in store.root.iterdir())


# -- vision projectors ---------------------------------------------------------------------------


def import_vision(store: ModelStore, tmp_path: Path, name: str = "seer:1b") -> Path:
    """A model imported with its projector; returns the projector's path in the store."""
    model = write_gguf(tmp_path / f"{name.replace(':', '-')}.gguf")
    projector = write_gguf(tmp_path / f"mmproj-{name.replace(':', '-')}.gguf", arch="clip")
    imported = store.import_file(model, name=name, projector=projector)
    assert imported.projector is not None
    return imported.projector


def test_a_hand_dropped_projector_is_no_model_and_is_reported(store: ModelStore) -> None:
    write_gguf(store.root / "mmproj-model-f16.gguf", arch="clip")
    write_gguf(store.root / "newer-mmproj.gguf", general_type="mmproj", arch="clip")
    write_gguf(store.root / "plain.gguf")
    scan = store.scan()
    assert [m.name for m in scan.models] == ["plain"]
    assert scan.projectors == ("mmproj-model-f16.gguf", "newer-mmproj.gguf")
    assert len(scan.problems) == 2
    assert scan.problems[0].startswith("mmproj-model-f16.gguf is a vision projector that no model names")
    with pytest.raises(ModelNotFound):
        store.find("mmproj-model-f16")


def test_import_with_a_projector_pairs_them_and_uninstall_removes_both(
    store: ModelStore, tmp_path: Path
) -> None:
    projector = import_vision(store, tmp_path)
    store.import_file(write_gguf(tmp_path / "other.gguf"), name="other:1")
    assert projector == store.root / "seer-1b.mmproj.gguf"
    scan = store.scan()
    assert scan.problems == [] and [m.name for m in scan.models] == ["other:1", "seer:1b"]
    model = store.find("seer:1b")
    assert model.sidecar is not None and model.sidecar.projector is not None
    record = model.sidecar.projector
    assert (record.file, record.size_bytes) == ("seer-1b.mmproj.gguf", projector.stat().st_size)
    assert record.sha256 == hashlib.sha256(projector.read_bytes()).hexdigest()
    assert record.source_url == (tmp_path / "mmproj-seer-1b.gguf").resolve().as_uri()
    assert model.capabilities == ["completion", "vision"]
    assert (model.as_dict()["projector"], model.as_dict()["projector_problem"]) == (
        "seer-1b.mmproj.gguf",
        None,
    )
    assert store.find("other:1").projector is None and store.find("other:1").capabilities == ["completion"]

    before = {p.name for p in store.root.iterdir()}
    store.uninstall("seer:1b")
    gone = before - {p.name for p in store.root.iterdir()}
    assert gone == {"seer-1b.gguf", "seer-1b.gguf.meta.json", "seer-1b.mmproj.gguf"}
    assert store.scan().problems == []


def test_import_refuses_a_projector_that_is_not_one(store: ModelStore, tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "m.gguf")
    with pytest.raises(StoreError, match="not a usable vision projector.*architecture is 'llama'"):
        store.import_file(model, name="m:1", projector=write_gguf(tmp_path / "not-mmproj.gguf"))
    assert not any(p.suffix == ".gguf" for p in store.root.iterdir())


def test_a_missing_or_changed_projector_leaves_a_valid_text_model(store: ModelStore, tmp_path: Path) -> None:
    projector = import_vision(store, tmp_path)
    kept = projector.read_bytes()
    projector.unlink()
    model = store.find("seer:1b")
    assert model.valid and model.error is None and model.projector is None
    assert model.projector_problem is not None and "seer-1b.mmproj.gguf is missing" in model.projector_problem
    assert model.projector_problem in model.problems and model.capabilities == ["completion"]
    assert model.as_dict()["projector"] is None

    # The same bytes back under a new inode: changed since verified, until `verify` checks it.
    projector.write_bytes(kept)
    model = store.find("seer:1b")
    assert model.projector is None and "changed since it was verified" in (model.projector_problem or "")
    result = store.verify("seer:1b")
    assert result.matches is True and "projector seer-1b.mmproj.gguf: sha256 matches" in result.message
    assert store.find("seer:1b").projector == projector

    projector.write_bytes(kept[:-1] + b"\x01")  # other bytes
    result = store.verify("seer:1b")
    assert result.matches is False and "projector seer-1b.mmproj.gguf: sha256 mismatch" in result.message
    assert store.find("seer:1b").projector is None


def test_a_sidecar_naming_what_is_no_projector_harms_nothing(store: ModelStore, tmp_path: Path) -> None:
    """A hand-edited sidecar names another model, a file outside the store, a link out of it:
    each is a problem, never a projector, and uninstall removes none of them."""
    projector = import_vision(store, tmp_path)
    model = store.find("seer:1b")
    assert model.sidecar is not None and model.sidecar.projector is not None
    write_gguf(store.root / "bystander.gguf")
    outside = write_gguf(tmp_path / "outside-mmproj.gguf", arch="clip")
    (store.root / "escape.mmproj.gguf").symlink_to(outside)
    for file, problem in [
        ("bystander.gguf", "not a vision projector (it is a model)"),
        ("../outside-mmproj.gguf", "not a file name in the store"),
        ("escape.mmproj.gguf", "symbolic link out of the store"),
        ("notes.txt", "not a .gguf file"),
    ]:
        record = model.sidecar.projector.model_copy(update={"file": file})
        write_sidecar(model.path, model.sidecar.model_copy(update={"projector": record}))
        found = store.find("seer:1b")
        assert found.valid and found.projector is None and problem in (found.projector_problem or ""), file
    (store.root / "notes.txt").write_text("mine")
    store.uninstall("seer:1b")
    assert (
        outside.exists() and (store.root / "notes.txt").exists() and (store.root / "bystander.gguf").exists()
    )
    assert projector.exists()  # now named by no model: reported, not removed with another's uninstall
    assert any("seer-1b.mmproj.gguf is a vision projector" in p for p in store.scan().problems)


def test_a_projector_two_models_name_stays_until_the_last_goes(store: ModelStore, tmp_path: Path) -> None:
    projector = import_vision(store, tmp_path)
    record = store.find("seer:1b").sidecar.projector  # type: ignore[union-attr]
    twin = store.import_file(write_gguf(tmp_path / "twin.gguf", name="twin"), name="twin:1b")
    assert twin.sidecar is not None
    write_sidecar(twin.path, twin.sidecar.model_copy(update={"projector": record}))
    assert store.find("twin:1b").projector == projector
    store.uninstall("seer:1b")
    assert projector.exists() and store.find("twin:1b").projector == projector
    store.uninstall("twin:1b")
    assert not projector.exists()
