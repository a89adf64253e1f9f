"""The console on the compose topology: the api service serves the pages, the install runs on the
fetcher over Redis, the overview asks the inference service over HTTP."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from playwright.sync_api import expect

from tests.support.browser import PageLog, axe_violations, describe_violations
from tests.support.httpserver import FileServer
from tests.topology.conftest import Stack


def test_install_from_the_console_on_the_compose_services(
    browser: Any, make_stack: Callable[..., Stack], file_server: FileServer
) -> None:
    file_server.faults.throttle_s = 0.0005  # a few seconds, so the progress is seen moving
    stack = make_stack("compose")
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    log = PageLog()
    log.attach(page)
    page.goto(stack.api_url + "/")
    expect(page.locator("#overview")).to_contain_text("llama-cpp-python", timeout=30_000)  # from inference
    expect(page.locator("#overview")).to_contain_text("Memory budget")
    expect(page.locator("#live-now")).to_contain_text("since the inference service started", timeout=30_000)

    page.goto(stack.api_url + "/console/models")
    row = page.locator('#catalogue li.variant[data-model="gemma3:270m"]')
    row.get_by_role("button", name="Install").click()
    seen: set[str] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not row.locator(".badge.ok").count():
        seen.update(row.locator(".job-text").all_inner_texts())
        time.sleep(0.05)
    expect(row.locator(".badge.ok")).to_have_text("Installed")
    assert any(re.match(r"Downloading · \d+% · [\d.]+ MB of 253\.1 MB", t) for t in seen), seen
    installed = page.locator('#installed li.row[data-model="gemma3:270m"]')
    expect(installed.locator(".badge.ok")).to_have_text("Ready")
    assert (stack.store / "gemma3-270m.gguf.meta.json").is_file()
    violations = axe_violations(page)
    assert not violations, describe_violations(violations)
    log.assert_clean()
    context.close()
