"""The console's HTTP routes.

    /                      redirects to /console/
    /console/              Overview, Models, Playground: page shells holding no data, open like
    /console/static/*      static files (the browser loads them before it has an API key)
    /api/console/*         the fragments and figures the shells load, behind the API key like
                           the rest of /api

Templates are Jinja with autoescaping on, so a model name, description or error message is text,
never markup; every console response carries a Content-Security-Policy allowing only its own
scripts, styles and connections.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader
from pendra_shared.api_errors import APIError, InvalidRequest, NotFound
from pendra_shared.jobs import Job

from pendra_api import __version__
from pendra_api.console import views
from pendra_api.console.system import totals
from pendra_api.management import Management

CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",  # the playground's thumbnails of the images a person attaches
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
PAGES = {
    "": ("overview", "Overview"),
    "models": ("models", "Models"),
    "playground": ("playground", "Playground"),
}
MEDIA_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    version: str


@cache
def assets() -> dict[str, Asset]:
    """The files under static/, read once; each URL carries its content hash, so a browser may
    keep it for good and still gets a new one when Pendra is upgraded."""
    found = {}
    for item in resources.files("pendra_api.console").joinpath("static").iterdir():
        suffix = "." + item.name.rpartition(".")[2]
        if item.is_file() and suffix in MEDIA_TYPES:
            body = item.read_bytes()
            found[item.name] = Asset(body, MEDIA_TYPES[suffix], hashlib.sha256(body).hexdigest()[:12])
    return found


def asset_url(name: str) -> str:
    return f"/console/static/{name}?v={assets()[name].version}"


def slug(name: str) -> str:
    """An HTML id for a model name: readable, and unique even where two names differ only in the
    characters an id leaves out."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", name) + "-" + hashlib.sha1(name.encode()).hexdigest()[:6]


# Lenient about missing values (Jinja's default): an inference service of another version that
# leaves a field out of /status gets a blank, not a broken page.
templates = Environment(
    loader=PackageLoader("pendra_api.console", "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters["bytes"] = views.human_bytes
templates.filters["slug"] = slug
templates.globals.update(
    asset=asset_url, failure_words=views.failure_words, capability_words=views.CAPABILITY_WORDS
)


def render(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    html = templates.get_template(template).render(**context)
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


pages = APIRouter(include_in_schema=False)
fragments = APIRouter(prefix="/api/console", include_in_schema=False)


@pages.api_route("/", methods=["GET", "HEAD"])
async def root(request: Request) -> Response:
    """A browser goes to the console; anything else gets Ollama's answer to the probe its
    clients send (`GET /` or `HEAD /`: 200 "Ollama is running")."""
    if "text/html" in request.headers.get("accept", ""):
        return RedirectResponse("/console/", status_code=307)
    return PlainTextResponse("Ollama is running")


@pages.get("/console")
async def console_root() -> RedirectResponse:
    return RedirectResponse("/console/", status_code=307)


@pages.get("/console/static/{name}")
async def static(name: str, v: str = "") -> Response:
    asset = assets().get(name)
    if asset is None:
        raise NotFound(f"no console asset {name!r}")
    caching = "public, max-age=31536000, immutable" if v == asset.version else "no-cache"
    headers = {**SECURITY_HEADERS, "Cache-Control": caching, "ETag": f'"{asset.version}"'}
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@pages.get("/console/")
async def overview_page() -> HTMLResponse:
    return await page("")


@pages.get("/console/{page}")
async def page(page: str) -> HTMLResponse:
    if page not in PAGES:
        return render("base.html", 404, page="missing", title="Not found")
    key, title = PAGES[page]
    return render(f"{key}.html", page=key, title=title)


# -- fragments ------------------------------------------------------------------------------------


def _m(request: Request) -> Management:
    management: Management = request.app.state.management
    return management


async def _jobs(m: Management) -> tuple[list[Job], str | None]:
    """The install jobs, or why there are none (the queue's Redis down): the store still shows."""
    try:
        return await m.queue.jobs(), None
    except APIError as exc:
        return [], exc.message


async def _status(m: Management) -> tuple[dict[str, Any] | None, str | None]:
    """The inference side's status, or why there is none (the page still renders)."""
    if m.system is None:
        return None, "the inference service is not connected"
    try:
        return await m.system.status(), None
    except APIError as exc:
        return None, exc.message


@fragments.get("/overview")
async def overview(request: Request) -> HTMLResponse:
    m = _m(request)
    (status, status_error), scan, (jobs, queue_error) = await asyncio.gather(
        _status(m), asyncio.to_thread(m.store.scan), _jobs(m)
    )
    return render(
        "_overview.html",
        queue_error=queue_error,
        version=__version__,
        status=status,
        status_error=status_error,
        ready=len(scan.valid),
        invalid=len(scan.models) - len(scan.valid),
        installing=sum(not job.final for job in jobs),
        models_dir=str(m.store.root),
    )


@fragments.get("/installed")
async def installed(request: Request) -> HTMLResponse:
    m = _m(request)
    (status, status_error), scan, (jobs, queue_error) = await asyncio.gather(
        _status(m), asyncio.to_thread(m.store.scan), _jobs(m)
    )
    present = {model.name for model in scan.models}
    loaded = {item["name"]: item for item in (status or {}).get("loaded", ())}
    return render(
        "_installed.html",
        models=scan.models,
        problems=scan.problems,
        loaded=loaded,
        status_error=status_error,
        queue_error=queue_error,
        installing=[job for job in jobs if not job.final and job.model not in present],
    )


async def _variants(m: Management, query: str, purpose: str | None) -> list[views.Family]:
    (status, _error), scan, (jobs, _queue_error) = await asyncio.gather(
        _status(m), asyncio.to_thread(m.store.scan), _jobs(m)
    )
    installed = {model.name for model in scan.valid}
    return views.group(m.catalogue.search(query, purpose), installed, jobs, status)


@fragments.get("/catalogue")
async def catalogue(
    request: Request,
    q: str = Query("", max_length=200),
    purpose: str = Query(""),
) -> HTMLResponse:
    if purpose and purpose not in views.PURPOSES:
        raise InvalidRequest(f"purpose must be one of {', '.join(views.PURPOSES)}", param="purpose")
    families = await _variants(_m(request), q, purpose or None)
    count = sum(len(family.variants) for family in families)
    return render("_catalogue.html", families=families, count=count, q=q, purpose=purpose)


@fragments.get("/stats")
async def stats(request: Request) -> JSONResponse:
    """Totals of tokens and requests from the inference service's /metrics, for the overview's
    sparkline (it takes the rates between two reads)."""
    m = _m(request)
    if m.system is None:
        raise NotFound("the inference service is not connected")
    figures = totals(await m.system.metrics_text())
    return JSONResponse({"time": time.time(), **figures}, headers={"Cache-Control": "no-store"})
