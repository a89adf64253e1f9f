"""The console under test: a real `pendra serve` with the real Gemma model, installing from a
local HTTP catalogue (a fast server, and a slow one for installs a test cancels), and Debian's
Chromium driving its pages."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import GEMMA_SHA256, gemma_entry
from tests.support.httpserver import FileServer, link_or_copy
from tests.support.stack import EmbeddedStack

# Text that must reach the page as text: were it parsed as HTML, an <img> would appear.
HOSTILE = 'Gemma 3 270M <img src=x id=pwned> & "quotes" </li></ul><b>bold</b>'
API_KEY = "console-test-key-0123456789"
NOT_A_MODEL = b"GGUF" + bytes(4092)  # small and quick to fetch; its pin below is not its sha256


@dataclass
class Console:
    stack: EmbeddedStack
    fast: FileServer
    slow: FileServer

    @property
    def url(self) -> str:
        return self.stack.api_url

    @property
    def store(self) -> Path:
        return self.stack.store


def catalogue_entries(fast: FileServer, slow: FileServer) -> list[dict[str, Any]]:
    gemma = fast.url("gemma.gguf")
    return [
        gemma_entry(gemma, description=HOSTILE, default=True, allow_private=True),
        gemma_entry(
            slow.url("gemma.gguf"),
            name="gemma3:270m-slow",
            allow_private=True,
            description="The same, slowly",
        ),
        gemma_entry(
            gemma, name="gemma-embed:270m", purpose="embedding", allow_private=True, description=None
        ),
        {
            "name": "broken:1b",
            "purpose": "chat",
            "gguf_url": fast.url("broken.gguf"),
            "gguf_sha256": hashlib.sha256(b"something else").hexdigest(),
            "size_bytes": len(NOT_A_MODEL),
            "allow_private": True,
            "description": "Its file does not match its pin.",
        },
        {
            "name": "huge:405b",
            "purpose": "chat",
            "gguf_url": fast.url("huge.gguf"),
            "gguf_sha256": GEMMA_SHA256,
            "size_bytes": 900 * 1000**3,
            "parameters": "405B",
            "quantization": "Q8_0",
            "description": "Far bigger than this machine.",
        },
    ]


def start_console(tmp: Path, gemma_path: Path, **env: str) -> Console:
    fast, slow = FileServer(tmp / "fast").start(), FileServer(tmp / "slow").start()
    for server in (fast, slow):
        server.root.mkdir(parents=True, exist_ok=True)
        link_or_copy(gemma_path, server.root / "gemma.gguf")
    (fast.root / "broken.gguf").write_bytes(NOT_A_MODEL)
    fast.faults.throttle_s = 0.0005  # about 3 s for Gemma: long enough to see the progress move
    slow.faults.throttle_s = 0.05  # minutes: an install the test cancels
    catalogue = tmp / "catalogue.yaml"
    catalogue.write_text(yaml.safe_dump({"models": catalogue_entries(fast, slow)}))
    stack = EmbeddedStack(
        tmp / "pendra",
        extra_env={"PENDRA_CATALOGUE": str(catalogue), "PENDRA_INSTALL_CONCURRENCY": "3", **env},
    )
    (tmp / "pendra").mkdir()
    return Console(stack.start(), fast, slow)


def stop_console(console: Console, request: pytest.FixtureRequest) -> None:
    if request.session.testsfailed:
        print(console.stack.logs())
    console.stack.stop()
    console.fast.stop()
    console.slow.stop()


@pytest.fixture(scope="package")
def console(
    tmp_path_factory: pytest.TempPathFactory, gemma_path: Path, request: pytest.FixtureRequest
) -> Iterator[Console]:
    """One `pendra serve` for the console tests, which run in order: install, chat, uninstall."""
    started = start_console(tmp_path_factory.mktemp("console"), gemma_path)
    yield started
    stop_console(started, request)


@pytest.fixture(scope="package")
def keyed_console(
    tmp_path_factory: pytest.TempPathFactory, gemma_path: Path, request: pytest.FixtureRequest
) -> Iterator[Console]:
    """The same with PENDRA_API_KEYS set."""
    started = start_console(tmp_path_factory.mktemp("keyed"), gemma_path, PENDRA_API_KEYS=API_KEY)
    yield started
    stop_console(started, request)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(30_000)
    yield opened
    context.close()
