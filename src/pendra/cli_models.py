"""`pendra models ...`: list, install, uninstall, import, show, search the catalogue, print the store.

Commands act on the local store through `pendra_shared`, the same install code the fetcher runs.
With `PENDRA_API_URL` set, `list`, `install`, `uninstall` and `cancel` act through that API instead,
on the server's store.
"""

from __future__ import annotations

import threading
from pathlib import Path

import typer
from pendra_shared.catalogue import Catalogue, CatalogueEntry
from pendra_shared.config import Settings, load_settings
from pendra_shared.errors import ConfigError
from pendra_shared.gguf_info import PURPOSES
from pendra_shared.hf import parse_hf_ref
from pendra_shared.hf import resolve as resolve_hf
from pendra_shared.install import Installer
from pendra_shared.install import Progress as InstallProgress
from pendra_shared.store import ModelStore
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from pendra.console import err, human_size, out, print_json
from pendra.remote import RemoteAPI, RemoteError

models_app = typer.Typer(help="Manage the GGUF models in the store.", invoke_without_command=True)

JSON_OPTION = typer.Option(False, "--json", help="Print JSON for scripts.")


def _store(settings: Settings) -> ModelStore:
    return ModelStore.from_settings(settings)


def _resolve(settings: Settings, name: str) -> CatalogueEntry:
    """A catalogue name, or an `hf.co/` reference resolved to its file and pin on the Hub (unless
    PENDRA_ALLOW_HF=false)."""
    ref = parse_hf_ref(name)
    if ref is None:
        return _catalogue(settings).resolve(name)
    if settings.allow_hf is False:
        raise ConfigError(f"{name}: hf.co installs are off (PENDRA_ALLOW_HF=false)")
    entry = resolve_hf(ref, settings.hf_endpoint)
    err.print(f"{name}: {entry.gguf_url} (sha256 {entry.gguf_sha256} from the Hub)", markup=False)
    if entry.mmproj_url:
        err.print(f"vision projector: {entry.mmproj_url} (sha256 {entry.mmproj_sha256})", markup=False)
    return entry


def _catalogue(settings: Settings) -> Catalogue:
    return Catalogue.load(settings.catalogue_locations)


@models_app.callback()
def models_root(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Manage the GGUF models in the store (with no subcommand: list them)."""
    if ctx.invoked_subcommand is None:
        list_models(as_json)


@models_app.command("list")
def list_models(as_json: bool = JSON_OPTION) -> None:
    """List the models in the store: name, purpose, size, quantization, status."""
    settings = load_settings()
    if settings.api_url:
        _list_remote(settings, as_json)
        return
    store = _store(settings)
    scan = store.scan()
    if as_json:
        print_json(
            {
                "models_dir": str(store.root),
                "models": [m.as_dict() for m in scan.models],
                "problems": scan.problems,
            }
        )
        return
    if not scan.models:
        out.print(
            f"No models in {store.root}. Install one with `pendra models install NAME` "
            "(see `pendra models catalogue`).",
            markup=False,
        )
    else:
        table = Table(box=None, pad_edge=False)
        for column in ("NAME", "PURPOSE", "SIZE", "QUANT", "STATUS"):
            table.add_column(column)
        for m in scan.models:
            status = m.status if m.valid else f"invalid: {m.error}"
            quant = m.facts.quantization if m.facts else None
            purpose = _purpose(m.purpose, m.projector is not None)
            table.add_row(m.name, purpose, human_size(m.size_bytes), quant or "-", status)
        out.print(table)
    for model in scan.models:
        for problem in model.problems:
            err.print(f"warning: {model.file_name}: {problem}", markup=False)
    for problem in scan.problems:
        err.print(f"warning: {problem}", markup=False)


def _purpose(purpose: str | None, vision: bool) -> str:
    """The PURPOSE column: `chat+vision` for a model with a vision projector."""
    return f"{purpose or '-'}+vision" if vision else purpose or "-"


def _list_remote(settings: Settings, as_json: bool) -> None:
    remote = RemoteAPI(settings)
    try:
        listing = remote.request("GET", "/api/models")
    finally:
        remote.close()
    if as_json:
        print_json(listing)
        return
    if not listing["data"]:
        out.print(f"No models on {remote.base_url}.", markup=False)
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "PURPOSE", "SIZE", "QUANT", "STATUS"):
        table.add_column(column)
    for m in listing["data"]:
        status = m["status"]
        if status == "installing":
            job = m["job"]
            done, total = job["done_bytes"], job["total_bytes"]
            status = f"installing {done * 100 // total}%" if total else "installing"
        elif status == "invalid":
            status = f"invalid: {m.get('error')}"
        quant = (m.get("facts") or {}).get("quantization")
        purpose = _purpose(m.get("purpose"), bool(m.get("projector")))
        table.add_row(m["name"], purpose, human_size(m.get("size_bytes")), quant or "-", status)
    out.print(table)


@models_app.command("dir")
def models_dir() -> None:
    """Print the store directory."""
    out.print(str(load_settings().models_dir), markup=False)


@models_app.command("show")
def show(name: str, as_json: bool = JSON_OPTION) -> None:
    """Show one model: its file, sidecar and the facts in its GGUF header."""
    model = _store(load_settings()).find(name, include_invalid=True)
    data = model.as_dict()
    if as_json:
        print_json(data)
        return
    facts = {("title" if k == "name" else k): v for k, v in (data.pop("facts") or {}).items()}
    problems = data.pop("problems")
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in {**data, **facts}.items():
        if value is not None:
            table.add_row(
                key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
            )
    out.print(table)
    for problem in problems:
        err.print(f"warning: {problem}", markup=False)


@models_app.command("verify")
def verify(name: str) -> None:
    """Re-hash a model's file and compare it with the sha256 its sidecar records."""
    result = _store(load_settings()).verify(name)
    (out if result.matches else err).print(result.message, markup=False)
    if result.matches is not True:
        raise typer.Exit(1)


@models_app.command("catalogue")
def catalogue(
    query: str = typer.Argument("", help="Words to look for in names and descriptions."),
    purpose: str | None = typer.Option(None, help="Only chat, embedding, rerank, image or transcription."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Search the catalogue of installable models."""
    entries = _catalogue(load_settings()).search(query, purpose)
    if as_json:
        print_json([e.facts() for e in entries])
        return
    if not entries:
        out.print("No catalogue entry matches.", markup=False)
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "PURPOSE", "PARAMS", "QUANT", "SIZE", "CONTEXT", "LICENSE"):
        table.add_column(column)
    for e in entries:
        name = f"{e.name} (default)" if e.default else e.name
        table.add_row(
            name,
            e.purpose,
            e.parameters or "-",
            e.quantization or "-",
            human_size(e.size_bytes),
            str(e.context_length or "-"),
            e.license or "-",
        )
    out.print(table)


@models_app.command("install")
def install(
    name: str = typer.Argument(
        ..., help="family[:tag] from the catalogue (qwen3:4b, gemma3), or hf.co/OWNER/REPO[:QUANT]."
    ),
) -> None:
    """Download a catalogue model, verify its SHA-256 and add it to the store."""
    settings = load_settings()
    if settings.api_url:
        _install_remote(settings, name)
        return
    entry = _resolve(settings, name)
    installer = Installer.from_settings(_store(settings), settings)
    cancel = threading.Event()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(entry.name, total=entry.total_size_bytes)

        def on_progress(p: InstallProgress) -> None:
            if p.phase == "waiting":
                bar.update(task, description=f"{entry.name}: waiting for another install")
            elif p.phase == "verifying":
                bar.update(task, description=f"{entry.name}: verifying")
            else:
                bar.update(task, description=entry.name, completed=p.done_bytes, total=p.total_bytes)
            if p.message.startswith("retrying"):
                err.print(f"{entry.name}: {p.message}", markup=False)

        try:
            result = installer.install(entry, on_progress, cancel)
        except KeyboardInterrupt:
            cancel.set()
            err.print(f"interrupted; run `pendra models install {name}` again to resume", markup=False)
            raise typer.Exit(130) from None
    model = result.model
    if result.already_installed:
        out.print(f"{entry.name} is already installed and verified ({model.file_name})", markup=False)
    else:
        resumed = f", resumed at {human_size(result.resumed_from)}" if result.resumed_from else ""
        vision = f" with its vision projector {model.projector.name}" if model.projector else ""
        out.print(
            f"installed {entry.name}{vision}: {human_size(result.size_bytes)}, sha256 verified{resumed}, "
            f"at {model.path}",
            markup=False,
        )


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


def _install_remote(settings: Settings, name: str) -> None:
    """Queue the install on the server and follow its job until it ends. Ctrl-C stops watching;
    the install goes on there."""
    remote = RemoteAPI(settings)
    try:
        job = remote.request("POST", "/api/models/install", json={"model": name})
        model = job["model"]
        final = job
        try:
            with _progress_bar() as bar:
                task = bar.add_task(model, total=job["total_bytes"])
                for event, data in remote.events(job["id"]):
                    final = data
                    phase = data.get("phase")
                    described = model if phase == "downloading" else f"{model}: {phase or event}"
                    bar.update(
                        task,
                        description=described,
                        completed=data.get("done_bytes", 0),
                        total=data.get("total_bytes"),
                    )
        except KeyboardInterrupt:
            err.print(
                f"stopped watching; {model} goes on installing on {remote.base_url}. "
                f"`pendra models install {model}` follows it again, `pendra models cancel {model}` stops it",
                markup=False,
            )
            raise typer.Exit(130) from None
    finally:
        remote.close()
    if final.get("state") == "done" and final.get("message") == "already installed":
        out.print(f"{model} is already installed and verified on {remote.base_url}", markup=False)
    elif final.get("state") == "done":
        out.print(
            f"installed {model} on {remote.base_url}: {human_size(final['done_bytes'])}, sha256 verified",
            markup=False,
        )
    elif final.get("state") == "cancelled":
        raise RemoteError(f"the install of {model} was cancelled")
    else:
        raise RemoteError(f"the install of {model} failed: {final.get('error') or final.get('state')}")


@models_app.command("uninstall")
def uninstall(name: str) -> None:
    """Remove a model's GGUF file, its sidecar and its vision projector from the store."""
    settings = load_settings()
    if settings.api_url:
        remote = RemoteAPI(settings)
        try:
            gone = remote.request("DELETE", f"/api/models/{name}")
        finally:
            remote.close()
        out.print(f"uninstalled {gone['id']} from {remote.base_url} (removed {gone['file']})", markup=False)
        return
    model = _store(settings).uninstall(name)
    removed = model.file_name
    if model.projector is not None and not model.projector.exists():
        removed += f" and {model.projector.name}"
    out.print(f"uninstalled {model.name} (removed {removed})", markup=False)


@models_app.command("cancel")
def cancel(name: str) -> None:
    """Cancel a running install on the server at PENDRA_API_URL."""
    settings = load_settings()
    if not settings.api_url:
        raise RemoteError(
            "nothing to cancel here: a local install stops with Ctrl-C; "
            "set PENDRA_API_URL to cancel an install on a server"
        )
    remote = RemoteAPI(settings)
    try:
        jobs = remote.request("GET", "/api/jobs")["data"]
        running = [
            j
            for j in jobs
            if j["state"] not in ("done", "failed", "cancelled")
            and name in (j["model"], j["model"].split(":")[0])
        ]
        if not running:
            raise RemoteError(f"no install of {name} is running on {remote.base_url}")
        for job in running:
            remote.request("POST", f"/api/jobs/{job['id']}/cancel")
            out.print(f"cancelled the install of {job['model']}", markup=False)
    finally:
        remote.close()


@models_app.command("import")
def import_(
    path: Path = typer.Argument(..., help="A local .gguf file."),
    name: str | None = typer.Option(None, "--name", help="Model name (default: the file's stem)."),
    move: bool = typer.Option(False, "--move", help="Move the file instead of copying it."),
    purpose: str | None = typer.Option(
        None, help="chat, embedding, rerank, image or transcription (default: read from the GGUF)."
    ),
    mmproj: Path | None = typer.Option(
        None, "--mmproj", help="The model's vision projector (a llama.cpp mmproj .gguf), imported with it."
    ),
) -> None:
    """Copy (or move) a local GGUF into the store, with its sha256 and a sidecar."""
    if purpose is not None and purpose not in PURPOSES:
        raise typer.BadParameter(f"must be one of {', '.join(PURPOSES)}", param_hint="--purpose")
    store = _store(load_settings())
    model = store.import_file(path, name=name, move=move, purpose=purpose, projector=mmproj)
    verb = "moved" if move else "copied"
    sha = model.sidecar.sha256 if model.sidecar else "?"
    out.print(f"imported {model.name} ({verb} to {model.path}), sha256 {sha}", markup=False)
    record = model.sidecar.projector if model.sidecar else None
    if record is not None:
        out.print(f"with its vision projector {record.file}, sha256 {record.sha256}", markup=False)
