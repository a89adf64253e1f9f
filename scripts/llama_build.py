#!/usr/bin/env python3
"""Install Pendra's environment with llama.cpp built for this host's accelerator.

    python3 scripts/llama_build.py sync [--gpu cuda|metal|vulkan|cpu] [-- UV SYNC ARGS...]
    python3 scripts/llama_build.py detect [--json]
    python3 scripts/llama_build.py args [--gpu ...]     # the uv arguments alone
    python3 scripts/llama_build.py settings [--gpu ...] # every build setting, KEY=VALUE a line (pip -C)

How llama.cpp is built is the project's decision: the CPU side (every CPU variant as a module,
chosen at run time) is fixed in `[tool.uv.config-settings-package]` of the root pyproject.toml;
this script adds the GPU backend the host calls for (see `pendra_shared/hostinfo.py`), prints the
choice, and runs `uv sync` with it. uv keys its wheel cache on these settings, so switching back
and forth rebuilds nothing twice, and a changed choice rebuilds llama-cpp-python by itself.
`PENDRA_GPU` (or `--gpu`) overrides the detection. Standard library only: it runs before the
virtual environment exists.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "llama-cpp-python"


def _hostinfo() -> ModuleType:
    # By path: importing the pendra_shared package would need its dependencies installed.
    spec = importlib.util.spec_from_file_location(
        "pendra_hostinfo", ROOT / "shared/pendra_shared/hostinfo.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


hostinfo = _hostinfo()


def uv_args(cmake: dict[str, str]) -> list[str]:
    return [
        arg
        for key, value in cmake.items()
        for arg in ("--config-settings-package", f"{PACKAGE}:cmake.define.{key}={value}")
    ]


def wanted_settings(cmake: dict[str, str]) -> dict[str, str]:
    """The config settings llama-cpp-python is to be built with: pyproject.toml's plus the GPU's."""
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    static = pyproject["tool"]["uv"]["config-settings-package"][PACKAGE]
    return {**static, **{f"cmake.define.{key}": value for key, value in cmake.items()}}


def built_settings() -> dict[str, str] | None:
    """The config settings of the llama-cpp-python in the project environment (uv records them)."""
    venv = Path(os.environ.get("UV_PROJECT_ENVIRONMENT") or ROOT / ".venv")
    for record in venv.glob("lib*/python*/site-packages/llama_cpp_python-*.dist-info/uv_build.json"):
        settings: dict[str, str] = json.loads(record.read_text()).get("config_settings", {})
        return settings
    return None


GPU_KEYS = {"GGML_CUDA": "cuda", "GGML_VULKAN": "vulkan", "GGML_METAL": "metal"}


def _gpu_keys(settings: dict[str, str] | None) -> dict[str, str]:
    """The settings a GPU backend added to a recorded build (those not in pyproject.toml)."""
    static = wanted_settings({})
    return {
        key.removeprefix("cmake.define."): value
        for key, value in (settings or {}).items()
        if key not in static and key.startswith("cmake.define.")
    }


def _kept_gpu(installed: dict[str, str] | None, choice: object, *, explicit: bool) -> str | None:
    """The GPU backend of the installed build, when it is to be kept: detection found none now
    and PENDRA_GPU / --gpu did not ask for the CPU."""
    if explicit or getattr(choice, "backend", None) != "cpu":
        return None
    keys = _gpu_keys(installed)
    return next((backend for key, backend in GPU_KEYS.items() if keys.get(key) == "ON"), None)


def _uv() -> list[str]:
    found = shutil.which("uv")
    if found:
        return [found]
    try:
        import uv  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "uv"], check=True)
    return [sys.executable, "-m", "uv"]


def _describe(choice: object) -> str:
    settings = " ".join(f"{k}={v}" for k, v in choice.cmake.items()) or "CPU variants only"
    return f"llama.cpp backend: {choice.backend} ({choice.reason}); build settings: {settings}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("command", choices=("sync", "detect", "args", "settings"))
    parser.add_argument("--gpu", choices=hostinfo.BACKENDS, help="override the detection (as PENDRA_GPU)")
    parser.add_argument("--json", action="store_true", help="detect: print the facts and choice as JSON")
    parser.epilog = "Arguments after -- go to uv sync (default: --locked --all-packages)."
    argv = sys.argv[1:] if argv is None else argv
    ns = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    uv_sync_args = argv[argv.index("--") + 1 :] if "--" in argv else ["--locked", "--all-packages"]

    environ = dict(os.environ)
    if ns.gpu:
        environ["PENDRA_GPU"] = ns.gpu
    facts = hostinfo.gather(environ)
    try:
        choice = hostinfo.choose_backend(facts)
    except hostinfo.HostError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    installed = built_settings()
    kept = _kept_gpu(installed, choice, explicit=bool(facts.requested))
    if kept:
        # A GPU build in place and nothing asked for another: detection that now finds no GPU
        # (nvcc off the PATH, nvidia-smi failing for a moment) must not swap it for the CPU's.
        choice = hostinfo.Choice(kept, "the installed build's; PENDRA_GPU=cpu drops it", _gpu_keys(installed))

    if ns.command == "detect":
        if ns.json:
            data = {"facts": asdict(facts), "choice": asdict(choice)}
            data["facts"]["cpu_flags"] = sorted(facts.cpu_flags)
            print(json.dumps(data, indent=2))
        else:
            print(_describe(choice))
        return 0
    if ns.command == "args":
        print(" ".join(uv_args(choice.cmake)))
        return 0
    if ns.command == "settings":
        print("\n".join(f"{key}={value}" for key, value in wanted_settings(choice.cmake).items()))
        return 0

    if choice.warning:
        print(f"warning: {choice.warning}", file=sys.stderr)
    if installed != wanted_settings(choice.cmake):
        print(f"{_describe(choice)}: building llama-cpp-python (minutes, once)", file=sys.stderr)
    try:
        uv = _uv()
    except subprocess.CalledProcessError:
        print(
            "error: uv is missing and pip could not install it: install uv (pip install uv)", file=sys.stderr
        )
        return 2
    command = [*uv, "sync", *uv_sync_args, *uv_args(choice.cmake)]
    return subprocess.run(command, cwd=ROOT, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
