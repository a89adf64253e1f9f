"""`pendra doctor`: the llama.cpp build in use, what it runs on, GPUs it leaves idle, and the
models directory's free space. The build is exercised in a child process (the same self-check
`pendra serve` runs before it listens, which also chooses the CPU variant), so a build this host
cannot run is reported, not fatal."""

from __future__ import annotations

import typer
from pendra_shared.config import load_settings

from pendra.console import out, print_json


def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    recheck: bool = typer.Option(
        False, "--recheck", help="Forget the remembered CPU variant and self-check the candidates again."
    ),
) -> None:
    """Check the llama.cpp build against this host: backends, CPU variant, devices, unused GPUs, disk."""
    from pendra_inference.backends import BackendError
    from pendra_inference.cpu_choice import adopt, decide
    from pendra_inference.doctor import model_lines, planned_models, summarize, summary_lines

    settings = load_settings()
    try:
        decision = decide(settings, check=True, fresh=recheck)
        check, verdict, error = decision.check, decision.verdict, None
    except BackendError as exc:
        check, verdict, error = None, None, str(exc)
    summary = summarize(settings, check, error, verdict=verdict)
    if verdict is not None and error is None:
        # The variant lives here: this process may load llama.cpp to size the models.
        adopt(verdict)
        summary["models"] = planned_models(settings)
    if as_json:
        print_json(summary)
    else:
        for line in [*summary_lines(summary), *model_lines(summary.get("models", []))]:
            out.print(line, markup=False)
    if error:
        raise typer.Exit(1)
