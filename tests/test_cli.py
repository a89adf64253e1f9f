"""The real `pendra` command in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pendra_shared.catalogue import bundled_entries

from tests.conftest import GEMMA_SHA256, gemma_entry, run_cli
from tests.support.ggufs import write_gguf
from tests.support.httpserver import FileServer


def assert_clean_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert message in result.stderr, result.stderr


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == "pendra 0.1.0"


def test_models_dir_follows_env_then_config(isolated_env: Path, tmp_path: Path) -> None:
    assert run_cli("models", "dir").stdout.strip() == str(isolated_env / ".pendra" / "models")
    config = isolated_env / ".pendra" / "config.toml"
    config.parent.mkdir()
    config.write_text(f'models_dir = "{tmp_path / "cfg"}"\n')
    assert run_cli("models", "dir").stdout.strip() == str(tmp_path / "cfg")
    env_dir = str(tmp_path / "env")
    assert run_cli("models", "dir", env={"PENDRA_MODELS_DIR": env_dir}).stdout.strip() == env_dir
    shown = run_cli("config", "--json", env={"PENDRA_MODELS_DIR": env_dir})
    data = json.loads(shown.stdout)
    assert data["models_dir"] == {"value": env_dir, "source": "env PENDRA_MODELS_DIR"}
    assert data["download_retries"]["source"] == "default"


def test_install_list_show_uninstall(
    store_dir: Path, served_gemma: str, write_catalogue: Callable[..., Path]
) -> None:
    write_catalogue([gemma_entry(served_gemma)])
    empty = run_cli("models")
    assert empty.returncode == 0 and "No models in" in empty.stdout

    installed = run_cli("models", "install", "gemma3:270m")
    assert installed.returncode == 0, installed.stderr
    assert "installed gemma3:270m: 253.1 MB, sha256 verified" in installed.stdout
    again = run_cli("models", "install", "gemma3:270m")
    assert "already installed and verified" in again.stdout

    listing = run_cli("models")
    row = next(line for line in listing.stdout.splitlines() if line.startswith("gemma3:270m"))
    assert row.split() == ["gemma3:270m", "chat", "253.1", "MB", "Q4_K_M", "ready"]
    as_json = json.loads(run_cli("models", "list", "--json").stdout)
    (model,) = as_json["models"]
    assert model["sha256"] == GEMMA_SHA256 and model["facts"]["architecture"] == "gemma3"

    shown = json.loads(run_cli("models", "show", "gemma3", "--json").stdout)
    assert shown["file"] == "gemma3-270m.gguf" and shown["purpose"] == "chat"
    assert "has_chat_template  False" in run_cli("models", "show", "gemma3:270m").stdout

    removed = run_cli("models", "uninstall", "gemma3:270m")
    assert removed.returncode == 0 and "removed gemma3-270m.gguf" in removed.stdout
    assert sorted(p.name for p in store_dir.iterdir()) == [".partial"]
    assert_clean_error(run_cli("models", "show", "gemma3:270m"), "not in the store")


def test_catalogue_search(write_catalogue: Callable[..., Path]) -> None:
    result = run_cli("models", "catalogue", "--purpose", "embedding")
    names = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert sorted(names) == sorted(e.name for e in bundled_entries() if e.purpose == "embedding")
    assert {"embeddinggemma:300m", "nomic-embed-text:v1.5", "nomic-embed-text:v1.5-q4_k_m"} <= set(names)
    rerankers = run_cli("models", "catalogue", "--purpose", "rerank").stdout
    assert "bge-reranker-v2-m3:568m" in rerankers and "RERANK" not in rerankers.upper().split("PURPOSE")[0]
    data = json.loads(run_cli("models", "catalogue", "qwen3", "--json").stdout)
    assert {"qwen3:0.6b", "qwen3:1.7b", "qwen3.6:27b"} <= {e["name"] for e in data}
    assert all(len(e["gguf_sha256"]) == 64 for e in data)


def test_import_and_hand_dropped_files(store_dir: Path, tmp_path: Path) -> None:
    source = write_gguf(tmp_path / "My Embedder.gguf", arch="bert")
    imported = run_cli("models", "import", str(source), "--name", "embedder:v1")
    assert imported.returncode == 0 and "imported embedder:v1" in imported.stdout
    (store_dir / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    write_gguf(store_dir / "Dropped.gguf")
    listing = run_cli("models")
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert "embedding" in rows["embedder:v1"] and "ready" in rows["embedder:v1"]
    assert "ready" in rows["dropped"] and "invalid: invalid GGUF" in rows["broken"]
    assert_clean_error(run_cli("models", "import", str(tmp_path / "nope.gguf")), "is not a file")


def test_import_with_mmproj_list_and_uninstall(store_dir: Path, tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "seer.gguf")
    projector = write_gguf(tmp_path / "mmproj-seer-f16.gguf", arch="clip")
    imported = run_cli("models", "import", str(model), "--name", "seer:1b", "--mmproj", str(projector))
    assert imported.returncode == 0, imported.stderr
    assert "with its vision projector seer-1b.mmproj.gguf" in imported.stdout
    rows = {line.split()[0]: line.split() for line in run_cli("models").stdout.splitlines()[1:]}
    assert rows["seer:1b"][1] == "chat+vision" and rows["seer:1b"][-1] == "ready"
    (listed,) = json.loads(run_cli("models", "list", "--json").stdout)["models"]
    assert (listed["projector"], listed["projector_problem"]) == ("seer-1b.mmproj.gguf", None)
    shown = [line.split() for line in run_cli("models", "show", "seer:1b").stdout.splitlines()]
    assert ["projector", "seer-1b.mmproj.gguf"] in shown

    write_gguf(store_dir / "stray-mmproj.gguf", arch="clip")  # dropped by hand: no model, a warning
    listing = run_cli("models")
    assert "stray" not in listing.stdout
    assert "warning: stray-mmproj.gguf is a vision projector that no model names" in listing.stderr

    removed = run_cli("models", "uninstall", "seer:1b")
    assert "removed seer-1b.gguf and seer-1b.mmproj.gguf" in removed.stdout
    assert sorted(p.name for p in store_dir.iterdir()) == [".partial", "stray-mmproj.gguf"]
    refused = run_cli("models", "import", str(model), "--name", "x:1", "--mmproj", str(model))
    assert_clean_error(refused, "is not a usable vision projector")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("models", "install", "nosuchmodel"), "'nosuchmodel' is not in the catalogue"),
        (("models", "install", "../../etc/passwd"), "invalid model name"),
        (("models", "uninstall", "ghost:v1"), "'ghost:v1' is not in the store"),
        (("models", "show", "../x"), "not in the store"),
    ],
)
def test_errors_are_one_line_without_traceback(store_dir: Path, args: tuple[str, ...], message: str) -> None:
    result = run_cli(*args)
    assert_clean_error(result, message)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1


def test_bad_catalogue_and_config_are_clear(tmp_path: Path, isolated_env: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: x:y\n    purpose: chat\n")
    assert_clean_error(
        run_cli("models", "install", "x:y", env={"PENDRA_CATALOGUE": str(bad)}),
        f"catalogue {bad}: entry #1 (x:y): ",
    )
    config = isolated_env / ".pendra" / "config.toml"
    config.parent.mkdir()
    config.write_text("models_dir = = 1")
    assert_clean_error(run_cli("models", "dir"), "is not valid TOML")


def test_debug_shows_the_traceback(store_dir: Path) -> None:
    result = run_cli("--debug", "models", "uninstall", "ghost:v1")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_two_processes_installing_the_same_model(
    store_dir: Path, served_gemma: str, file_server: FileServer, write_catalogue: Callable[..., Path]
) -> None:
    write_catalogue([gemma_entry(served_gemma)])
    file_server.faults.throttle_s = 0.0003
    cmd = [sys.executable, "-m", "pendra", "models", "install", "gemma3:270m"]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    lines = sorted(out.strip().splitlines()[-1] for out, _ in outputs)
    assert lines[0].startswith("gemma3:270m is already installed and verified")
    assert lines[1].startswith("installed gemma3:270m")
    assert [r.status for r in file_server.requests] == [200]
    assert sorted(p.name for p in store_dir.iterdir() if p.is_file()) == [
        "gemma3-270m.gguf",
        "gemma3-270m.gguf.meta.json",
    ]
