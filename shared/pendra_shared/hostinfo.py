"""What accelerators this host has, and which llama.cpp backend to build for it.

Standard library only: `scripts/llama_build.py` imports this file before any virtual environment
exists, and `pendra doctor` uses it to say whether a GPU goes unused. Facts are gathered once
(`gather()`) and the choice is a pure function of them (`choose_backend()`), so tests feed it
the facts of hosts they are not running on.

The order, unless `PENDRA_GPU` names one: CUDA where an NVIDIA driver answers (`nvidia-smi`
lists a GPU), Metal on Apple silicon, Vulkan where a Vulkan loader and a GPU device are present,
else the CPU. A backend that needs a compiler the host lacks (nvcc for CUDA, glslc and the
Vulkan headers, 1.3.272 or newer, for Vulkan) falls back to the CPU with the reason, unless
`PENDRA_GPU` insists.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ("cuda", "metal", "vulkan", "cpu")
CUDA_HOME_NVCC = Path("/usr/local/cuda/bin/nvcc")
# Turing (T4) to Hopper (H100/H200): what an image built without a GPU in sight is compiled for.
DEFAULT_CUDA_ARCHITECTURES = "75;80;86;89;90"
# The llama.cpp that llama-cpp-python vendors uses VK_EXT_layer_settings, in the public Vulkan
# headers from 1.3.272 (Debian 12's 1.3.239 fails to compile it; Ubuntu 24.04's 1.3.275 works).
MIN_VULKAN_HEADER = 272


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_total_mib: int | None = None
    compute_cap: str | None = None  # "9.0" (CUDA)
    driver: str | None = None
    kind: str = "discrete"  # discrete, integrated, virtual, cpu (Vulkan's device types)


@dataclass(frozen=True)
class HostFacts:
    system: str  # platform.system(): Linux, Darwin, Windows
    machine: str  # platform.machine(): x86_64, arm64, aarch64
    nvidia_gpus: tuple[Gpu, ...] = ()
    nvcc: str | None = None
    vulkan_loader: bool = False
    vulkan_gpus: tuple[Gpu, ...] = ()
    vulkan_sdk: bool = False  # glslc, the Vulkan and SPIRV headers, needed to build the backend
    vulkan_headers: int | None = None  # VK_HEADER_VERSION of those headers (1.3.<n>)
    cpu_model: str = ""
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    requested: str | None = None  # PENDRA_GPU

    @property
    def apple_silicon(self) -> bool:
        return self.system == "Darwin" and self.machine in ("arm64", "aarch64")

    @property
    def accelerators(self) -> list[tuple[str, Gpu]]:
        """GPUs this host has, with the backend that would drive each."""
        found = [("cuda", g) for g in self.nvidia_gpus]
        if self.apple_silicon:
            found.append(("metal", Gpu(name="Apple silicon GPU", kind="integrated")))
        nvidia = {g.name for g in self.nvidia_gpus}
        found += [("vulkan", g) for g in self.vulkan_gpus if g.kind != "cpu" and g.name not in nvidia]
        return found


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str
    cmake: dict[str, str]  # the llama-cpp-python config settings this backend adds
    warning: str | None = None


class HostError(Exception):
    """The requested backend cannot be built on this host."""


def choose_backend(facts: HostFacts) -> Choice:
    """The llama.cpp backend to build for a host, and why."""
    requested = (facts.requested or "").strip().lower() or None
    if requested is not None and requested not in BACKENDS:
        raise HostError(f"PENDRA_GPU={facts.requested!r}: use one of {', '.join(BACKENDS)}")
    if requested == "cpu":
        return Choice("cpu", "PENDRA_GPU=cpu", {})
    if requested == "cuda" or (requested is None and facts.nvidia_gpus):
        return _cuda(facts, requested is not None)
    if requested == "metal" or (requested is None and facts.apple_silicon):
        if not facts.apple_silicon:
            raise HostError("PENDRA_GPU=metal: Metal needs macOS on Apple silicon")
        return Choice("metal", "Apple silicon", {"GGML_METAL": "ON"})
    vulkan_gpus = [g for g in facts.vulkan_gpus if g.kind != "cpu"]
    if requested == "vulkan" or (requested is None and facts.vulkan_loader and vulkan_gpus):
        return _vulkan(facts, vulkan_gpus, requested is not None)
    return Choice("cpu", "no GPU found (no nvidia-smi GPU, not Apple silicon, no Vulkan GPU)", {})


def _cannot_build(backend: str, reason: str, message: str, insisted: bool) -> Choice:
    """A detected GPU whose build tools are missing: the CPU build, with the fix; an error when
    PENDRA_GPU asked for that backend by name."""
    if insisted:
        raise HostError(f"PENDRA_GPU={backend}: {message}")
    return Choice("cpu", reason, {}, warning=f"{message}; building for the CPU meanwhile")


def _cuda(facts: HostFacts, insisted: bool) -> Choice:
    gpus = ", ".join(g.name for g in facts.nvidia_gpus) or "no GPU visible at build time"
    if facts.nvcc is None:
        message = (
            "building for CUDA needs the CUDA compiler (nvcc), which this host lacks: install the CUDA "
            f"toolkit (e.g. apt-get install nvidia-cuda-toolkit) and run again (GPUs: {gpus})"
        )
        return _cannot_build("cuda", "CUDA toolkit missing", message, insisted)
    caps = sorted({g.compute_cap.replace(".", "") for g in facts.nvidia_gpus if g.compute_cap})
    archs = ";".join(caps) if caps else DEFAULT_CUDA_ARCHITECTURES
    reason = f"NVIDIA GPU: {gpus}" if facts.nvidia_gpus else "PENDRA_GPU=cuda"
    return Choice("cuda", reason, {"GGML_CUDA": "ON", "CMAKE_CUDA_ARCHITECTURES": archs})


def _vulkan(facts: HostFacts, gpus: list[Gpu], insisted: bool) -> Choice:
    names = ", ".join(g.name for g in gpus) or "no Vulkan GPU visible at build time"
    if not facts.vulkan_sdk:
        message = (
            "building for Vulkan needs glslc, the Vulkan headers and SPIRV-Headers, which this host "
            f"lacks: install them (e.g. apt-get install glslc libvulkan-dev spirv-headers) and run "
            f"again (GPUs: {names})"
        )
        return _cannot_build("vulkan", "Vulkan build tools missing", message, insisted)
    if facts.vulkan_headers is not None and facts.vulkan_headers < MIN_VULKAN_HEADER:
        message = (
            f"the Vulkan headers here are 1.3.{facts.vulkan_headers}, and llama.cpp needs 1.3."
            f"{MIN_VULKAN_HEADER} or newer: install a newer Vulkan SDK (e.g. Ubuntu 24.04's "
            f"libvulkan-dev) and run again (GPUs: {names})"
        )
        return _cannot_build("vulkan", "Vulkan headers too old", message, insisted)
    reason = f"Vulkan GPU: {names}" if gpus else "PENDRA_GPU=vulkan"
    return Choice("vulkan", reason, {"GGML_VULKAN": "ON"})


# -- gathering the facts ---------------------------------------------------------------------


def _run(*argv: str, timeout: float = 10) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def nvidia_gpus() -> tuple[Gpu, ...]:
    if shutil.which("nvidia-smi") is None:
        return ()
    query = ["nvidia-smi", "--format=csv,noheader,nounits"]
    output = _run(*query, "--query-gpu=name,memory.total,compute_cap,driver_version")
    if output is None:  # drivers before 510 know no compute_cap
        older = _run(*query, "--query-gpu=name,memory.total,driver_version")
        output = "\n".join(
            f"{n}, {m}, , {d}" for n, m, d in (line.split(", ") for line in (older or "").splitlines())
        )
    return parse_nvidia_smi(output)


def parse_nvidia_smi(output: str) -> tuple[Gpu, ...]:
    gpus = []
    for line in output.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or not parts[0]:
            continue
        memory = int(parts[1]) if parts[1].isdigit() else None
        gpus.append(Gpu(parts[0], memory, parts[2] or None, parts[3] or None))
    return tuple(gpus)


def vulkan_gpus(render_nodes: bool = True) -> tuple[Gpu, ...]:
    """Vulkan devices from `vulkaninfo --summary`; without vulkaninfo, a render node
    (/dev/dri/renderD*) stands for a GPU the loader can reach (unless `render_nodes` is off: on
    an NVIDIA host the node is that GPU's)."""
    output = _run("vulkaninfo", "--summary") if shutil.which("vulkaninfo") else None
    if output is not None:
        return parse_vulkaninfo(output)
    if not render_nodes:
        return ()
    nodes = sorted(Path("/dev/dri").glob("renderD*")) if Path("/dev/dri").is_dir() else []
    return tuple(Gpu(f"GPU at {n}", kind="discrete") for n in nodes)


def parse_vulkaninfo(output: str) -> tuple[Gpu, ...]:
    gpus, name, kind = [], None, None
    for raw in output.splitlines():
        line = raw.strip()
        if line.startswith("deviceType"):
            value = line.split("=", 1)[-1].strip().upper()
            kind = (
                "cpu"
                if "CPU" in value
                else "integrated"
                if "INTEGRATED" in value
                else "virtual"
                if "VIRTUAL" in value
                else "discrete"
            )
        elif line.startswith("deviceName"):
            name = line.split("=", 1)[-1].strip()
        if name and kind:
            gpus.append(Gpu(name, kind=kind))
            name, kind = None, None
    return tuple(gpus)


def _include_roots() -> list[Path]:
    roots = [Path(os.environ["VULKAN_SDK"], "include")] if os.environ.get("VULKAN_SDK") else []
    return [*roots, Path("/usr/local/include"), Path("/usr/include")]


def _vulkan_sdk() -> bool:
    """glslc, the Vulkan headers and SPIRV-Headers: what llama.cpp's Vulkan backend builds with."""
    roots = _include_roots()
    vulkan = any((r / "vulkan" / "vulkan.h").is_file() for r in roots)
    spirv = any((r / "spirv" / "unified1" / "spirv.hpp").is_file() for r in roots)
    return vulkan and spirv and shutil.which("glslc") is not None


def vulkan_header_version() -> int | None:
    """VK_HEADER_VERSION of the Vulkan headers a build would find first."""
    headers = [r / "vulkan" / "vulkan_core.h" for r in _include_roots()]
    found = next((h for h in headers if h.is_file()), None)
    if found is None:
        return None
    text = found.read_text(errors="replace")
    match = re.search(r"^#define VK_HEADER_VERSION (\d+)", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as the kernel reports them (/proc/cpuinfo's `flags`)."""
    return _cpu()[1]


def cpu_identity() -> dict[str, str]:
    """What tells this CPU from another, as far as which instructions run: its model name, its
    flags and its microcode revision (Linux; elsewhere the processor's name)."""
    model, flags = _cpu()
    microcode = ""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "microcode":
            microcode = value.strip()
            break
    return {
        "machine": platform.machine(),
        "model": model or platform.processor(),
        "flags": " ".join(sorted(flags)),
        "microcode": microcode,
    }


def rebuild_command(backend: str | None = None) -> str:
    """The command that rebuilds llama.cpp for this host (for `backend`, when named)."""
    return "python3 scripts/llama_build.py sync" + (f" --gpu {backend}" if backend else "")


def _cpu() -> tuple[str, frozenset[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor(), frozenset()
    model, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    return model, flags


def gather(environ: dict[str, str] | None = None) -> HostFacts:
    env = os.environ if environ is None else environ
    nvcc = next(
        (c for c in (shutil.which("nvcc"), str(CUDA_HOME_NVCC)) if c and _run(c, "--version") is not None),
        None,
    )
    loader = (
        ctypes.util.find_library("vulkan") is not None
        or Path("/usr/lib/x86_64-linux-gnu/libvulkan.so.1").exists()
    )
    model, flags = _cpu()
    nvidia = nvidia_gpus()
    return HostFacts(
        system=platform.system(),
        machine=platform.machine(),
        nvidia_gpus=nvidia,
        nvcc=nvcc,
        vulkan_loader=loader,
        vulkan_gpus=vulkan_gpus(render_nodes=not nvidia) if loader else (),
        vulkan_sdk=_vulkan_sdk(),
        vulkan_headers=vulkan_header_version(),
        cpu_model=model,
        cpu_flags=flags,
        requested=env.get("PENDRA_GPU") or None,
    )
