"""`pendra doctor`: the llama.cpp build in use, what it runs on, GPUs it leaves idle, and the
models directory's free space. The build is exercised in a child process (the same self-check
`pendra serve` runs before it listens), so a build this host cannot run is reported, not fatal."""

from __future__ import annotations

import typer
from pendra_shared.config import load_settings

from pendra.console import out, print_json


def doctor(as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """Check the llama.cpp build against this host: backends, devices, unused GPUs, disk."""
    from pendra_inference.backends import BackendError
    from pendra_inference.doctor import summarize, summary_lines
    from pendra_inference.selfcheck import run_selfcheck

    settings = load_settings()
    try:
        check, error = run_selfcheck(settings), None
    except BackendError as exc:
        check, error = None, str(exc)
    summary = summarize(settings, check, error)
    if as_json:
        print_json(summary)
    else:
        for line in summary_lines(summary):
            out.print(line, markup=False)
    if error:
        raise typer.Exit(1)
