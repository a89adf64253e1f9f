"""`pendra`: the top-level command, global flags and error handling.

Every command reports a Pendra error as one readable line on stderr and exits non-zero; `--debug`
shows the traceback too. Subcommands live in their own modules (`cli_models` for the store).
"""

from __future__ import annotations

import logging
import sys

import typer
from pendra_shared.config import describe_settings, load_settings
from pendra_shared.errors import PendraError

from pendra import __version__
from pendra.cli_doctor import doctor
from pendra.cli_models import models_app
from pendra.cli_serve import serve
from pendra.console import err, out, print_json

app = typer.Typer(
    name="pendra",
    help="Pendra: a self-hosted inference worker for GGUF models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(models_app, name="models")
app.command("serve")(serve)
app.command("doctor")(doctor)

_debug = False


def _version(value: bool) -> None:
    if value:
        out.print(f"pendra {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Pendra: serve local GGUF models behind an OpenAI-compatible API."""
    global _debug
    _debug = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


@app.command("config")
def config_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Print the resolved settings and where each came from."""
    settings = load_settings()
    reports = describe_settings(settings)
    if as_json:
        print_json({r.name: {"value": r.value, "source": r.source} for r in reports})
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("setting", "value", "source"):
        table.add_column(column)
    for r in reports:
        table.add_row(r.name, str(r.value) if r.value != "" else "(empty)", r.source)
    out.print(table)


def main() -> None:
    """Console-script entry point. Click reports usage errors itself; Pendra errors and anything
    unexpected become one line on stderr (the traceback only with --debug)."""
    try:
        app()
    except PendraError as exc:
        if _debug:
            raise
        err.print(f"error: {exc}", markup=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        sys.exit(130)
    except Exception as exc:  # the last line of defence: no traceback without --debug
        if _debug:
            raise
        err.print(
            f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for details)", markup=False
        )
        sys.exit(2)
