"""A real browser for the console tests: Debian's Chromium driven by Playwright for Python.

Playwright's own browser download cannot reach its host where these tests run, so the tests pass
the executable of the system's Chromium (`scripts/test.sh` installs Debian's `chromium` like
`redis-server`). `PENDRA_TEST_CHROMIUM` names another one. Every page records what would show in
its devtools console: errors, Content-Security-Policy refusals, uncaught exceptions; tests assert
there were none.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
AXE = REPO / "tests" / "data" / "axe.min.js"
SCREENSHOTS = REPO / "docs" / "images" / "console"


def chromium_path() -> str:
    found = (
        os.environ.get("PENDRA_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    if not found:
        pytest.fail(
            "no Chromium: install Debian's chromium (scripts/test.sh does) or set PENDRA_TEST_CHROMIUM"
        )
    return found


@dataclass
class PageLog:
    """What a page reported while the test drove it."""

    errors: list[str] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        page.on(
            "console", lambda m: m.type in ("error", "warning") and self.errors.append(f"{m.type}: {m.text}")
        )
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def assert_clean(self, allow: tuple[str, ...] = ()) -> None:
        left = [e for e in self.errors if not any(a in e for a in allow)]
        assert not left, "the page reported:\n" + "\n".join(left)


@contextmanager
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(),
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
        )
        try:
            yield browser
        finally:
            browser.close()


def axe_violations(page: Any) -> list[dict[str, Any]]:
    """Run axe-core in the page (through the devtools protocol, which the page's CSP does not
    govern) and return every violation it finds, of any impact (minor ones included: the console
    has none, so any is news)."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.evaluate(AXE.read_text(encoding="utf-8"))
    result = page.evaluate(
        "async () => JSON.stringify((await axe.run(document, {resultTypes: ['violations']})).violations)"
    )
    violations: list[dict[str, Any]] = json.loads(result)
    return violations


def describe_violations(violations: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:5]}"
        for v in violations
    )


def screenshot(page: Any, name: str, full_page: bool = True) -> Path:
    """A screenshot into docs/images/console, the folder the README links to."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page, animations="disabled")
    return path
