"""The console's pages over plain HTTP: where they are, what protects them (a Content-Security-Policy
that allows only the console's own files, which hold no inline script or style), how its assets
are cached, what it does with hostile text, and that it ships inside the Python package."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import zipfile
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import httpx
import pytest

from tests.console.conftest import HOSTILE, Console

REPO = Path(__file__).resolve().parents[2]
CONSOLE = REPO / "services" / "api" / "pendra_api" / "console"
REAL_HOME = Path.home()  # read at import, before the tests' isolated HOME: uv's cache lives there
PAGES = ("/console/", "/console/models", "/console/playground")
FRAGMENTS = ("/api/console/overview", "/api/console/installed", "/api/console/catalogue")


class Elements(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def elements(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = Elements()
    parser.feed(html)
    return parser.tags


def csp(response: httpx.Response) -> dict[str, str]:
    policy = response.headers["content-security-policy"]
    return {
        part.split()[0]: part.partition(" ")[2] for part in (p.strip() for p in policy.split(";")) if part
    }


def test_the_root_and_bare_console_redirect_to_the_overview(console: Console) -> None:
    browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    for path in ("/", "/console"):
        response = httpx.get(console.url + path, headers=browser)
        assert response.status_code == 307
        assert response.headers["location"] == "/console/"
    assert httpx.get(console.url + "/", headers=browser, follow_redirects=True).url.path == "/console/"
    # Ollama's clients probe / and get Ollama's answer; the console is not in their way.
    probe = httpx.get(console.url + "/")
    assert (probe.status_code, probe.text) == (200, "Ollama is running")
    assert httpx.head(console.url + "/").status_code == 200


def test_every_response_allows_only_the_consoles_own_assets(console: Console) -> None:
    for path in PAGES + FRAGMENTS:
        response = httpx.get(console.url + path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        policy = csp(response)
        assert policy["default-src"] == "'none'"
        for directive in ("script-src", "style-src", "connect-src"):
            assert policy[directive] == "'self'", (path, directive)
        # and images the page makes itself (the playground's thumbnails of a picked file)
        assert policy["img-src"] == "'self' blob:", path
        assert policy["frame-ancestors"] == "'none'"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        # Nothing a CSP without 'unsafe-inline' would refuse: no inline script, handler or style.
        for tag, attrs in elements(response.text):
            assert tag != "style", path
            assert "style" not in attrs, (path, tag)
            assert not any(name.startswith("on") for name in attrs), (path, tag, attrs)
            if tag == "script":
                assert (attrs.get("src") or "").startswith("/console/static/"), path
            for name in ("hx-on", "hx-vals", "hx-vars"):
                assert name not in attrs and not any(a.startswith("hx-on") for a in attrs), (path, tag)
        assert not re.search(r"<script(?![^>]*\bsrc=)", response.text), path


def test_assets_are_versioned_and_cached_for_good(console: Console) -> None:
    page = httpx.get(console.url + "/console/models").text
    urls = [
        attrs.get("src") or attrs.get("href")
        for tag, attrs in elements(page)
        if tag in ("script", "link")
        and (attrs.get("src") or attrs.get("href") or "").startswith("/console/static/")
    ]
    assert len(urls) == 4  # favicon, stylesheet, htmx, console.js
    for url in urls:
        assert url is not None
        name, _, version = url.removeprefix("/console/static/").partition("?v=")
        response = httpx.get(console.url + url)
        assert response.status_code == 200
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
        body = (CONSOLE / "static" / name).read_bytes()
        assert response.content == body
        assert version == hashlib.sha256(body).hexdigest()[:12]
        stale = httpx.get(f"{console.url}/console/static/{name}?v=000000000000")
        assert stale.headers["cache-control"] == "no-cache"
    assert (
        httpx.get(console.url + "/console/static/console.js")
        .headers["content-type"]
        .startswith("text/javascript")
    )
    missing = httpx.get(console.url + "/console/static/nothing.js")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"
    nowhere = httpx.get(console.url + "/console/nowhere")
    assert nowhere.status_code == 404
    assert "There is no such console page" in nowhere.text


def test_hostile_catalogue_text_is_escaped(console: Console) -> None:
    html = httpx.get(console.url + "/api/console/catalogue", params={"q": "gemma3"}).text
    assert "<img" not in html and "<b>bold" not in html
    escaped = HOSTILE.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&#34;")
    assert escaped in html
    # What a person types into the search comes back as text too.
    typed = httpx.get(console.url + "/api/console/catalogue", params={"q": "<script>alert(1)</script>"}).text
    assert "<script>" not in typed and "&lt;script&gt;alert(1)&lt;/script&gt;" in typed


def test_bad_fragment_parameters_get_an_openai_style_error(console: Console) -> None:
    response = httpx.get(console.url + "/api/console/catalogue", params={"purpose": "images"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "purpose" and "chat" in error["message"]
    too_long = httpx.get(console.url + "/api/console/catalogue", params={"q": "x" * 500})
    assert too_long.status_code == 400


def test_the_vendored_htmx_is_the_recorded_release() -> None:
    record = (CONSOLE / "VENDORED.md").read_text()
    pinned = re.search(r"`static/htmx\.min\.js` \| htmx \| ([\d.]+) .*\| `([0-9a-f]{64})` \|", record)
    assert pinned is not None
    body = (CONSOLE / "static" / "htmx.min.js").read_bytes()
    assert hashlib.sha256(body).hexdigest() == pinned.group(2)
    assert f'version:"{pinned.group(1)}"'.encode() in body


def test_the_console_ships_inside_the_api_package(tmp_path: Path) -> None:
    """The pages are package data: a wheel of pendra-api (what its image installs) holds them."""
    installed = resources.files("pendra_api.console")
    for name in ("templates/base.html", "static/console.js", "static/htmx.min.js", "static/console.css"):
        assert installed.joinpath(name).is_file(), name
    uv = shutil.which("uv")
    if uv is None:
        pytest.fail("uv is needed to build the wheel (scripts/test.sh installs it)")
    subprocess.run(
        [uv, "build", "--wheel", "--package", "pendra-api", "--out-dir", str(tmp_path), "--offline", "-q"],
        cwd=REPO,
        check=True,
        env={
            **{k: v for k, v in os.environ.items() if k.startswith("UV_") or k == "PATH"},
            "HOME": str(REAL_HOME),
        },
    )
    (wheel,) = tmp_path.glob("pendra_api-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"pendra_api/console/{p.relative_to(CONSOLE).as_posix()}"
        for p in CONSOLE.rglob("*")
        if p.is_file() and p.suffix in (".html", ".js", ".css", ".svg")
    }
    assert expected <= names, sorted(expected - names)
