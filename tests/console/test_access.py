"""The console on a server with API keys: the pages load without one and ask for it; the key is
kept for the tab and sent with every request (event streams included); what the pages show needs
it like the rest of `/api`."""

from __future__ import annotations

import http.client
import json
import re
import signal
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
from playwright.sync_api import expect

from tests.console.conftest import API_KEY, Console
from tests.support.browser import PageLog, axe_violations, describe_violations, screenshot
from tests.support.stack import EmbeddedStack

# The browser reports each refused request (401) in its console; those are expected here.
REFUSED = "status of 401"


def test_sign_in_asks_once_and_keeps_the_key_for_the_tab(browser: Any, keyed_console: Console) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    log = PageLog()
    log.attach(page)
    page.goto(keyed_console.url + "/console/models")
    signin = page.locator("#signin")
    expect(signin).to_be_visible()
    expect(page.locator("#page")).to_be_hidden()
    expect(page.get_by_label("API key")).to_be_focused()
    violations = axe_violations(page)
    assert not violations, describe_violations(violations)
    screenshot(page, "sign-in")

    page.get_by_label("API key").fill("not-the-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_have_text("That key was not accepted.")
    expect(page.locator("#page")).to_be_hidden()

    page.get_by_label("API key").fill(API_KEY)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#catalogue .family").first).to_be_visible()
    expect(signin).to_be_hidden()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()

    # Every call carries the key: an install's progress (painted only from the fetch-based event
    # stream) arrives, and its Cancel works.
    slow = page.locator('#catalogue li.variant[data-model="gemma3:270m-slow"]')
    slow.get_by_role("button", name="Install").click()
    expect(slow.locator(".job-text")).to_contain_text(re.compile(r"Downloading · \d+% · "))
    slow.get_by_role("button", name="Cancel").click()
    expect(slow).to_contain_text("Install cancelled.")
    # Kept for the tab: a reload stays signed in, the overview and playground load their data.
    page.reload()
    expect(page.locator("#catalogue .family").first).to_be_visible()
    page.goto(keyed_console.url + "/console/")
    expect(page.locator("#overview")).to_contain_text("Memory budget")
    expect(page.locator("#live-now")).to_contain_text("since the inference service started")
    page.goto(keyed_console.url + "/console/playground")
    expect(page.locator("#chat-none")).to_be_visible()  # no chat model here: said, not broken
    # ... and only for the tab: another tab asks again.
    other = context.new_page()
    other.goto(keyed_console.url + "/console/models")
    expect(other.locator("#signin")).to_be_visible()
    # Signing out forgets it.
    page.get_by_role("button", name="Sign out").click()
    expect(page.locator("#signin")).to_be_visible()
    # A kept key the server no longer takes (its keys changed) is dropped with a word, not a
    # broken page.
    page.evaluate("sessionStorage.setItem('pendra.apiKey', 'a-key-from-before')")
    page.goto(keyed_console.url + "/console/models")
    expect(page.locator("#signin-error")).to_have_text("The saved key was refused; sign in again.")
    expect(page.locator("#page")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('pendra.apiKey')") is None
    log.assert_clean(allow=(REFUSED,))
    context.close()


def test_pages_are_open_but_their_data_needs_the_key(keyed_console: Console) -> None:
    url = keyed_console.url
    for path in ("/console/", "/console/models", "/console/playground"):
        response = httpx.get(url + path)
        assert response.status_code == 200, path
        assert "gemma" not in response.text  # a shell: no model, job or setting in it
    for path in (
        "/api/console/overview",
        "/api/console/installed",
        "/api/console/catalogue",
        "/api/console/stats",
    ):
        response = httpx.get(url + path)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "invalid_api_key"
        authorised = httpx.get(url + path, headers={"Authorization": f"Bearer {API_KEY}"})
        assert authorised.status_code == 200, (path, authorised.text)
    # The open prefix opens only the console's own routes: dot segments reach nothing else.
    parsed = urlparse(url)
    for raw in ("/console/../api/models", "/console/%2e%2e/api/models", "/console/static/../../api/jobs"):
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
        connection.request("GET", raw)
        response = connection.getresponse()
        body = response.read()
        assert response.status in (401, 404), (raw, response.status, body[:200])
        connection.close()


def test_the_job_event_stream_follows_every_job(keyed_console: Console) -> None:
    """One connection for every job (a browser keeps only a few per server): the jobs not yet
    ended first, then each change, ending events named after the end state."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = keyed_console.url
    events: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream("GET", url + "/api/jobs/events", headers=headers, timeout=60) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        started = httpx.post(url + "/api/models/install", json={"model": "broken:1b"}, headers=headers)
        assert started.status_code == 202
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                job = json.loads(line.removeprefix("data: "))
                events.append((str(name), job))
                if job["model"] == "broken:1b" and name == "failed":
                    break
    mine = [(name, job) for name, job in events if job["model"] == "broken:1b"]
    assert mine[-1][0] == "failed" and mine[-1][1]["error_code"] == "checksum_mismatch"
    assert all(name == "progress" for name, _ in mine[:-1])


def test_an_open_console_does_not_hold_up_a_shutdown(tmp_path: Path) -> None:
    """The job stream of an open Models page never ends by itself; on SIGTERM it ends at once (the
    page follows again when the server is back) instead of holding the drain to its timeout."""
    stack = EmbeddedStack(tmp_path, extra_env={"PENDRA_SHUTDOWN_TIMEOUT_S": "60"}).start()
    assert stack.server is not None
    try:
        with httpx.stream("GET", stack.api_url + "/api/jobs/events", timeout=30) as stream:
            assert stream.status_code == 200
            started = time.monotonic()
            stack.server.proc.send_signal(signal.SIGTERM)
            assert list(stream.iter_lines()) == []  # ended cleanly, no error event
            stack.server.proc.wait(30)
            assert time.monotonic() - started < 15
        assert stack.server.proc.returncode == 0
    finally:
        stack.stop()
