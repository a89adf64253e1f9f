"""The build and host summary behind `pendra doctor` and the start-up log of every server.

It joins four sources: what the llama.cpp build is and runs on (the self-check child's
`BackendReport`), which CPU variant serves and why (`cpu_choice`'s verdict), what accelerators the
host has (`pendra_shared.hostinfo`), and the models directory's free space. A GPU the host has but
the build does not drive is named with the exact command that rebuilds for it. `preflight()` is
what `pendra serve` and the inference service run before they listen: the verdict and its
self-check, the summary in the log (with one line naming any CPU variant that died), a warning for
an unused GPU, and a `BackendError` (one clear line) when the build cannot run here.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from pendra_shared import hostinfo
from pendra_shared.config import Settings

from pendra_inference.backends import BackendError
from pendra_inference.cpu_choice import Verdict, adopt, decide
from pendra_inference.selfcheck import SelfCheck

logger = logging.getLogger(__name__)


def unused_gpus(facts: hostinfo.HostFacts, report: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Accelerators of this host that the llama.cpp build leaves idle, each with the fix."""
    in_use = {d["backend"] for d in (report or {}).get("devices", []) if d["type"] in ("gpu", "igpu")}
    compiled = set((report or {}).get("modules", []))
    failed: dict[str, str] = (report or {}).get("failed_modules", {})
    out = []
    for backend, gpu in facts.accelerators:
        if backend in in_use:
            continue
        if report is None:
            why = "the self-check failed, so whether this build drives it is unknown"
            fix = "see the error above"
        elif backend in failed:
            why = f"the build's {backend} backend did not load: {failed[backend]}"
            fix = "install the GPU driver on this host (in a container: pass the GPU through)"
        elif backend in compiled:
            why = f"the build's {backend} backend found no device"
            fix = "check the driver and that the GPU is visible to this process"
        else:
            why = f"this llama.cpp build has no {backend} backend"
            fix = hostinfo.rebuild_command(backend)
        out.append({"backend": backend, "name": gpu.name, "why": why, "fix": fix})
    return out


def _disk(path: Path) -> dict[str, Any]:
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return {"path": str(path), "free_bytes": usage.free, "total_bytes": usage.total}


def summarize(
    settings: Settings,
    check: SelfCheck | None,
    error: str | None,
    facts: hostinfo.HostFacts | None = None,
    verdict: Verdict | None = None,
) -> dict[str, Any]:
    facts = facts or hostinfo.gather()
    report = check.report if check else None
    accelerators = [
        {
            "backend": backend,
            "name": gpu.name,
            "memory_total_bytes": gpu.memory_total_mib * 2**20 if gpu.memory_total_mib else None,
            "compute_cap": gpu.compute_cap,
            "driver": gpu.driver,
        }
        for backend, gpu in facts.accelerators
    ]
    return {
        "ok": error is None,
        "error": error,
        "build": report,
        "cpu_choice": verdict.as_dict() if verdict else None,
        "selfcheck": (
            {
                "tokens": check.tokens,
                "prompt_tokens": check.prompt_tokens,
                "threads": check.threads,
                "seconds": round(check.seconds, 3),
                "gpu_layers": check.gpu_layers,
                "weights_in": check.weights_in,
            }
            if check
            else None
        ),
        "host": {
            "system": facts.system,
            "machine": facts.machine,
            "cpu": facts.cpu_model,
            "accelerators": accelerators,
        },
        "unused_gpus": unused_gpus(facts, report),
        "models_dir": _disk(settings.models_dir),
    }


HOW_CHOSEN = {
    "checked": " (self-checked now)",
    "remembered": " (remembered from an earlier self-check)",
    "pinned": " (PENDRA_CPU_VARIANT)",
}


def _gib(n: int | None) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "?"


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The summary as the short lines the start-up log and `pendra doctor` print."""
    lines = []
    build = summary["build"]
    if build:
        linked = "loaded at run time" if build["dynamic"] else "linked in"
        lines.append(
            f"llama.cpp: llama-cpp-python {build['llama_cpp_python']}, ggml {build['ggml_version']} "
            f"({build['ggml_commit'] or 'unknown commit'}), backends {linked}"
        )
        compiled = ["cpu", *build["modules"]] if build["dynamic"] else build["backends"]
        lines.append(f"compiled in: {', '.join(compiled)}")
        choice = summary.get("cpu_choice") or {}
        if build["cpu_variants"]:
            how = HOW_CHOSEN.get(choice.get("source", ""), "")
            lines.append(
                f"CPU variants: {', '.join(build['cpu_variants'])}; loaded: {build['cpu_variant']}{how}"
            )
        if choice.get("fallback"):
            lines.append(f"CPU variant: {choice['fallback']}")
        features = [k for k, v in build["cpu_features"].items() if v == "1"]
        extra = ", ".join(build["extra_buffer_types"]) or "none"
        used = " ".join(features) or "baseline only"
        lines.append(f"CPU features used: {used}; extra buffer types: {extra}")
        for device in build["devices"]:
            kind = " ".join(dict.fromkeys((device["backend"], device["type"])))  # "cuda gpu", "cpu"
            lines.append(
                f"device {device['name']} ({kind}): {device['description']}, "
                f"{_gib(device['memory_free'])} free of {_gib(device['memory_total'])}"
            )
        lines.append(f"models run on: {build['backend']}")
    check = summary["selfcheck"]
    if check:
        weights = ", ".join(f"{name} {mib:.1f} MiB" for name, mib in check["weights_in"].items())
        lines.append(
            f"self-check: decoded {check['tokens']} tokens in {check['seconds'] * 1000:.0f} ms "
            f"(prompts of {check['prompt_tokens']} tokens, {check['threads']} threads; weights in "
            f"{weights or 'unknown buffers'})"
        )
    host = summary["host"]
    lines.append(f"host: {host['system']} {host['machine']}, CPU {host['cpu'] or 'unknown'}")
    for acc in host["accelerators"]:
        lines.append(f"accelerator: {acc['name']} ({acc['backend']}), {_gib(acc['memory_total_bytes'])}")
    if not host["accelerators"]:
        lines.append("accelerators: none found")
    for gpu in summary["unused_gpus"]:
        lines.append(f"UNUSED GPU {gpu['name']}: {gpu['why']}; fix: {gpu['fix']}")
    disk = summary["models_dir"]
    lines.append(
        f"models directory: {disk['path']}, {_gib(disk['free_bytes'])} free of {_gib(disk['total_bytes'])}"
    )
    if summary["error"]:
        lines.append(f"ERROR: {summary['error']}")
    return lines


def planned_models(settings: Settings) -> list[dict[str, Any]]:
    """What each installed chat model will hold once loaded, as the registry reckons it (its
    budget and eviction use the same figure): weights, KV cache, recurrent states, checkpoints.
    Loads llama.cpp's backends in this process: call only once the CPU variant is adopted."""
    from pendra_shared.store import ModelStore

    from pendra_inference.model_memory import memory_shape
    from pendra_inference.registry import ModelRegistry

    store = ModelStore(settings.models_dir)
    registry = ModelRegistry(settings, store)
    out = []
    for model in store.scan().valid:
        if model.purpose != "chat":
            continue
        config, total = registry.engine_config(model)
        shape = memory_shape(model.path, **store.gguf_limits)
        cells = config.n_ctx * config.parallel
        out.append(
            {
                "name": model.name,
                "memory_kind": shape.kind,
                "memory_bytes": total,
                "weights_bytes": model.size_bytes,
                "kv_cells": cells,
                "kv_bytes": shape.kv_bytes(cells),
                "sequences": config.sequences,
                "state_bytes": shape.state_bytes * config.sequences,
                "checkpoint_bytes": config.checkpoint_bytes,
                "projector": model.projector.name if model.projector else None,
                "projector_bytes": model.projector.stat().st_size if model.projector else 0,
                "projector_problem": model.projector_problem,
            }
        )
    return out


def model_lines(models: list[dict[str, Any]]) -> list[str]:
    lines = []
    for m in models:
        parts = [
            f"weights {_size(m['weights_bytes'])}",
            f"KV cache {_size(m['kv_bytes'])} ({m['kv_cells']} cells)",
        ]
        if m["sequences"]:
            parts.append(f"recurrent states {_size(m['state_bytes'])} ({m['sequences']} sequences)")
        if m["checkpoint_bytes"]:
            parts.append(f"checkpoints up to {_size(m['checkpoint_bytes'])}")
        if m.get("projector"):
            parts.append(f"vision projector {_size(m['projector_bytes'])} ({m['projector']})")
        total = _size(m["memory_bytes"])
        lines.append(f"model {m['name']} ({m['memory_kind']}): about {total} loaded: {', '.join(parts)}")
        if m.get("projector_problem"):
            lines.append(f"  warning: {m['name']} reads no images: {m['projector_problem']}")
    return lines


def preflight(settings: Settings) -> dict[str, Any] | None:
    """Before a server listens: choose the CPU variant by the self-check (remembered, or found
    now), prove the build runs here and log what it runs on. Raises a BackendError (a
    PendraError: one line, exit 1) when it cannot run."""
    if not settings.selfcheck:
        logger.info("llama.cpp self-check skipped (PENDRA_SELFCHECK=false)")
        return None
    decision = decide(settings, check=True)
    adopt(decision.verdict)
    summary = summarize(settings, decision.check, None, verdict=decision.verdict)
    for line in summary_lines(summary):
        loud = line.startswith(("UNUSED GPU", "CPU variant:"))
        (logger.warning if loud else logger.info)("%s", line)
    return summary


__all__ = [
    "BackendError",
    "model_lines",
    "planned_models",
    "preflight",
    "summarize",
    "summary_lines",
    "unused_gpus",
]
