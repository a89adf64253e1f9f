"""Which llama.cpp backends this process runs on, loaded for the host it finds itself on.

Pendra builds llama.cpp the way llama.cpp's own releases are built (see `[tool.uv]` in the root
`pyproject.toml`): ggml's backends are modules (`GGML_BACKEND_DL`), and the CPU backend comes in
one variant per x86-64 (or Arm) feature level (`GGML_CPU_ALL_VARIANTS`), from a plain x86-64
baseline to AVX-512 with AMX. llama-cpp-python loads none of them itself, so `activate()` does,
once per process, before the first model loads:

1. every GPU module the build holds (CUDA, Vulkan, Metal, ...) is loaded; one whose driver is
   missing fails to load, and the report says why;
2. the CPU variant is the one `PENDRA_CPU_VARIANT` pins, else the verdict of `cpu_choice`: ggml's
   score (its own cpuid check) only orders the candidates, and the self-check, run in a child
   process, decides which of them lives here (a CPU can report AMX that its hypervisor will not
   execute). No code path loads a variant without that verdict;
3. that variant is loaded and registered.

A build with the backends linked in (no modules) needs none of this; its report is read the
same way. The report `activate()` returns holds what `pendra doctor`, the start-up log and
`/health` show, with the extra buffer types the CPU backend offers (AMX tiles, repacked blocks):
what serving really runs.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import re
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
from pendra_shared.config import Settings, load_settings
from pendra_shared.errors import PendraError

logger = logging.getLogger(__name__)

DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


class BackendError(PendraError):
    """llama.cpp's backends cannot be set up on this host."""


@dataclass(frozen=True)
class CpuVariant:
    name: str  # "haswell", "zen4", ... ("" for a single CPU module)
    path: Path
    score: int  # ggml's score for this CPU; 0 means it cannot run here


@dataclass
class Device:
    name: str
    description: str
    type: str
    backend: str
    memory_total: int
    memory_free: int


@dataclass
class BackendReport:
    """What the llama.cpp in this process was built with and what it runs on."""

    llama_cpp_python: str
    ggml_version: str
    ggml_commit: str
    dynamic: bool  # backends are modules chosen at run time
    modules: list[str]  # GPU backend modules the build holds (cuda, vulkan, ...)
    cpu_variants: list[str]  # CPU variants the build holds
    cpu_variant: str | None  # the one loaded
    cpu_features: dict[str, str]  # what the loaded CPU backend was compiled with
    # The CPU backend's extra buffer types ("AMX", "CPU_REPACK"): where llama.cpp puts the weights
    # whose kernels use them. AMX is offered only when the kernel grants this process tile state.
    extra_buffer_types: list[str]
    backends: list[str]  # registered backends, as llama.cpp names them
    devices: list[Device]
    failed_modules: dict[str, str] = field(default_factory=dict)  # module -> why it did not load
    system_info: str = ""

    @property
    def gpu_devices(self) -> list[Device]:
        return [d for d in self.devices if d.type in ("gpu", "igpu")]

    @property
    def backend(self) -> str:
        """The backend models run on: the first GPU's ("cuda", "vulkan", "metal") or "cpu"."""
        gpus = self.gpu_devices
        return gpus[0].backend.lower() if gpus else "cpu"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["backend"] = self.backend
        return data


# -- the ggml library ------------------------------------------------------------------------

# ggml's names for its backends, as Pendra (and PENDRA_GPU) names them.
BACKEND_NAMES = {"cpu": "cpu", "cuda": "cuda", "vulkan": "vulkan", "mtl": "metal", "metal": "metal"}


def backend_name(ggml_name: str) -> str:
    return BACKEND_NAMES.get(ggml_name.lower(), ggml_name.lower())


def lib_dir() -> Path:
    return Path(llama_cpp.__file__).resolve().parent / "lib"


_LIBRARY_NAME = re.compile(r"^(?:lib)?(.+?)\.(?:so|dylib|dll)(?:\.\d+)*$")


def _stem(path: Path) -> str:
    """`libggml-cpu-haswell.so.0.25.3` -> `ggml-cpu-haswell`, `libggml-cpu-armv8.2_1.so` ->
    `ggml-cpu-armv8.2_1`, `ggml-cuda.dll` -> `ggml-cuda`; "" for anything else."""
    match = _LIBRARY_NAME.match(path.name)
    return match.group(1) if match else ""


def _modules(directory: Path) -> dict[str, Path]:
    """ggml's libraries in `directory` by stem (`ggml`, `ggml-base`, `ggml-cpu-zen4`, `ggml-cuda`),
    one file each (a versioned copy and its unversioned name are the same library)."""
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        if path.is_file() and _stem(path).startswith("ggml"):
            found.setdefault(_stem(path), path)
    return found


def _in_process(stem: str) -> Path | None:
    """The file the dynamic linker already mapped for library `stem` (Linux). Opening another
    name for it (libggml.so beside libggml.so.0) would load a second copy with its own, empty
    backend registry, which llama.cpp would never see."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = Path(line.split(maxsplit=5)[-1]) if line.count(" ") >= 5 else None
        if path is not None and path.is_absolute() and _stem(path) == stem:
            return path
    return None


class _Ggml:
    """ctypes bindings for the few ggml-backend calls llama-cpp-python does not expose."""

    def __init__(self, modules: dict[str, Path]) -> None:
        if "ggml" not in modules or "ggml-base" not in modules:
            raise BackendError(f"no ggml library beside llama-cpp-python ({lib_dir()}): reinstall it")
        self.lib = ctypes.CDLL(str(_in_process("ggml") or modules["ggml"]))
        self.base = ctypes.CDLL(str(_in_process("ggml-base") or modules["ggml-base"]))
        vp, sz, cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
        self._sig(self.lib, "ggml_backend_load", vp, cp)
        self._sig(self.lib, "ggml_backend_reg_count", sz)
        self._sig(self.lib, "ggml_backend_reg_get", vp, sz)
        self._sig(self.lib, "ggml_backend_dev_count", sz)
        self._sig(self.lib, "ggml_backend_dev_get", vp, sz)
        self._sig(self.base, "ggml_backend_reg_name", cp, vp)
        self._sig(self.base, "ggml_backend_reg_get_proc_address", vp, vp, cp)
        self._sig(self.base, "ggml_backend_dev_name", cp, vp)
        self._sig(self.base, "ggml_backend_dev_description", cp, vp)
        self._sig(self.base, "ggml_backend_dev_type", ctypes.c_int, vp)
        self._sig(self.base, "ggml_backend_dev_backend_reg", vp, vp)
        self._sig(self.base, "ggml_backend_dev_memory", None, vp, ctypes.POINTER(sz), ctypes.POINTER(sz))
        self._sig(self.base, "ggml_backend_buft_name", cp, vp)

    @staticmethod
    def _sig(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> None:
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = list(argtypes)

    def text(self, lib: ctypes.CDLL, name: str) -> str:
        fn = getattr(lib, name, None)
        if fn is None:
            return ""
        fn.restype = ctypes.c_char_p
        value = fn()
        return value.decode() if value else ""

    def registered(self) -> list[str]:
        return [
            self.base.ggml_backend_reg_name(self.lib.ggml_backend_reg_get(i)).decode()
            for i in range(self.lib.ggml_backend_reg_count())
        ]

    def devices(self) -> list[Device]:
        out = []
        for i in range(self.lib.ggml_backend_dev_count()):
            dev = self.lib.ggml_backend_dev_get(i)
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            self.base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            reg = self.base.ggml_backend_dev_backend_reg(dev)
            out.append(
                Device(
                    name=self.base.ggml_backend_dev_name(dev).decode(),
                    description=(self.base.ggml_backend_dev_description(dev) or b"").decode(),
                    type=DEVICE_TYPES.get(self.base.ggml_backend_dev_type(dev), "other"),
                    backend=backend_name(self.base.ggml_backend_reg_name(reg).decode()) if reg else "",
                    memory_total=int(total.value),
                    memory_free=int(free.value),
                )
            )
        return out

    def features(self, backend: str) -> dict[str, str]:
        """The compile-time features a registered backend reports (`AVX2: 1`, `ARCHS: 900`)."""

        class Feature(ctypes.Structure):
            _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]

        for i in range(self.lib.ggml_backend_reg_count()):
            reg = self.lib.ggml_backend_reg_get(i)
            if self.base.ggml_backend_reg_name(reg).decode() != backend:
                continue
            address = self.base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features")
            if not address:
                return {}
            getter = ctypes.CFUNCTYPE(ctypes.POINTER(Feature), ctypes.c_void_p)(address)
            items, out, k = getter(reg), {}, 0
            while items[k].name:
                out[items[k].name.decode()] = (items[k].value or b"").decode()
                k += 1
            return out
        return {}

    def extra_buffer_types(self) -> list[str]:
        """The CPU device's extra buffer types, by name ("AMX", "CPU_REPACK")."""
        for i in range(self.lib.ggml_backend_dev_count()):
            dev = self.lib.ggml_backend_dev_get(i)
            if DEVICE_TYPES.get(self.base.ggml_backend_dev_type(dev)) != "cpu":
                continue
            reg = self.base.ggml_backend_dev_backend_reg(dev)
            address = self.base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
            if not address:
                return []
            getter = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
            bufts, out, k = getter(dev), [], 0
            while bufts[k]:
                out.append(self.base.ggml_backend_buft_name(bufts[k]).decode())
                k += 1
            return out
        return []


# -- the CPU variants ------------------------------------------------------------------------

# Variants whose names say they were compiled for AMX tile instructions.
AMX_VARIANTS = frozenset({"sapphirerapids"})
# Test only: a process that loads one of these CPU variants dies of SIGILL (an illegal instruction,
# executed), as every process does on a host whose hypervisor refuses what that variant runs.
FAULT_VARIANTS_ENV = "PENDRA_TEST_SIGILL_VARIANTS"


# Signals that say llama.cpp itself failed, as opposed to a process killed from outside (SIGKILL
# from the OOM killer, SIGTERM from an operator).
FAULT_SIGNALS = frozenset({"SIGILL", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGABRT", "SIGTRAP", "SIGSYS"})


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def usable_cores() -> int:
    """Cores this process may run on (llama-cpp-python's own default is only half of them)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _score(path: Path) -> int:
    """ggml's score of a CPU variant for this CPU; the library is unloaded again, as ggml's own
    loader does, so only the chosen variant stays in the process."""
    import _ctypes

    lib = ctypes.CDLL(str(path))
    try:
        fn = getattr(lib, "ggml_backend_score", None)
        if fn is None:
            return 1  # a module without a score runs anywhere it loads
        fn.restype = ctypes.c_int
        return int(fn())
    finally:
        _ctypes.dlclose(lib._handle)


_variants_lock = threading.Lock()
_variants: list[CpuVariant] | None = None


def build_variants() -> list[CpuVariant]:
    """The CPU variants this build loads at run time, each with ggml's score for this CPU (0:
    cannot run here); [] where the CPU backend is linked in. Read once per process, before any
    backend registers (a registered one would make a module build look linked)."""
    global _variants
    with _variants_lock:
        if _variants is None:
            modules = _modules(lib_dir())
            cpu = {stem: path for stem, path in modules.items() if stem.startswith("ggml-cpu")}
            dynamic = bool(cpu) and _Ggml(modules).lib.ggml_backend_reg_count() == 0
            _variants = [
                CpuVariant(stem.removeprefix("ggml-cpu").lstrip("-") or "cpu", path, _score(path))
                for stem, path in cpu.items()
                if dynamic
            ]
        return list(_variants)


def ranked(variants: list[CpuVariant]) -> list[CpuVariant]:
    """The variants this CPU reports it can run, best score first: the self-check's candidates."""
    runnable = sorted((v for v in variants if v.score > 0), key=lambda v: v.score, reverse=True)
    if variants and not runnable:
        raise BackendError(
            "no CPU variant of this llama.cpp build can run on this CPU "
            f"(it has {', '.join(v.name for v in variants)})"
        )
    return runnable


def choose_variant(variants: list[CpuVariant], wanted: str) -> CpuVariant:
    """The variant named `wanted` (PENDRA_CPU_VARIANT, or the verdict), if it is in the build and
    this CPU reports what it needs."""
    if not variants:
        raise BackendError("this llama.cpp build has no CPU backend module")
    by_name = {v.name: v for v in variants}
    chosen = by_name.get(wanted)
    if chosen is None:
        raise BackendError(
            f"PENDRA_CPU_VARIANT={wanted} is not in this build; it has {', '.join(sorted(by_name))}"
        )
    if chosen.score <= 0:
        raise BackendError(f"PENDRA_CPU_VARIANT={wanted} cannot run on this CPU; unset it")
    return chosen


def _fault_if_asked(variant: str) -> None:
    """Test only (PENDRA_TEST_SIGILL_VARIANTS): die as a process does whose CPU refuses what
    `variant` executes, by executing an illegal instruction (ud2)."""
    named = {v.strip() for v in os.environ.get(FAULT_VARIANTS_ENV, "").split(",") if v.strip()}
    if variant not in named:
        return
    logger.warning("%s names %s: executing an illegal instruction", FAULT_VARIANTS_ENV, variant)
    if platform.machine().lower() in ("x86_64", "amd64") and sys.platform == "linux":
        import mmap

        try:
            page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        except OSError:  # a kernel that refuses writable code pages (W^X): the signal alone
            pass
        else:
            page.write(b"\x0f\x0b")  # ud2
            ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
    os.kill(os.getpid(), signal.SIGILL)


def _load_gpu_modules(ggml: _Ggml, modules: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
    """Load every non-CPU backend module; return their names and why any failed."""
    names, failed = [], {}
    for stem, path in modules.items():
        if stem in ("ggml", "ggml-base") or stem.startswith("ggml-cpu"):
            continue
        name = backend_name(stem.removeprefix("ggml-"))
        names.append(name)
        if not ggml.lib.ggml_backend_load(str(path).encode()):
            failed[name] = _why_module_failed(name, path)
            logger.warning("llama.cpp's %s backend did not load: %s", name, failed[name])
    return names, failed


def _why_module_failed(name: str, path: Path) -> str:
    needs = {"cuda": ("libcuda.so.1", "no NVIDIA driver"), "vulkan": ("libvulkan.so.1", "no Vulkan loader")}
    if name in needs and sys.platform == "linux":
        library, meaning = needs[name]
        try:
            ctypes.CDLL(library)
        except OSError:
            return f"{library} is missing ({meaning} on this host)"
    try:
        ctypes.CDLL(str(path))
    except OSError as exc:
        return str(exc)
    return "it found no usable device"


def _load(cpu_variant: str | None) -> BackendReport:
    modules = _modules(lib_dir())
    variants = build_variants()
    ggml = _Ggml(modules)
    gpu_modules: list[str] = []
    failed: dict[str, str] = {}
    chosen: CpuVariant | None = None
    if variants:
        gpu_modules, failed = _load_gpu_modules(ggml, modules)
        if cpu_variant is None:
            raise BackendError("no CPU variant was chosen for this build")  # activate() chooses
        chosen = choose_variant(variants, cpu_variant)
        if not ggml.lib.ggml_backend_load(str(chosen.path).encode()):
            raise BackendError(f"llama.cpp's CPU backend {chosen.path.name} failed to load")
        _fault_if_asked(chosen.name)
    llama_cpp.llama_backend_init()
    return BackendReport(
        llama_cpp_python=llama_cpp.__version__,
        ggml_version=ggml.text(ggml.base, "ggml_version"),
        ggml_commit=ggml.text(ggml.base, "ggml_commit"),
        dynamic=bool(variants),
        modules=gpu_modules,
        cpu_variants=[v.name for v in variants],
        cpu_variant=chosen.name if chosen else None,
        cpu_features=ggml.features("CPU"),
        extra_buffer_types=ggml.extra_buffer_types(),
        backends=ggml.registered(),
        devices=ggml.devices(),
        failed_modules=failed,
        system_info=llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    )


_lock = threading.Lock()
_outcome: BackendReport | BackendError | None = None


def activate(cpu_variant: str | None = None, settings: Settings | None = None) -> BackendReport:
    """Load the backends for this host, once per process; later calls get the same report (or
    the same error: a half-done load is not retried). The CPU variant is `cpu_variant` when named
    (a self-check child; a probe child, told its parent's), else the settings' PENDRA_CPU_VARIANT,
    else the self-check's verdict (`cpu_choice.variant_for_process`: remembered, or found now by
    running the self-check on the candidates in child processes)."""
    global _outcome
    with _lock:
        if _outcome is None:
            try:
                if cpu_variant is None:
                    from pendra_inference.cpu_choice import variant_for_process

                    cpu_variant = variant_for_process(settings or load_settings())
                _outcome = _load(cpu_variant)
            except BackendError as exc:
                _outcome = exc
        if isinstance(_outcome, BackendError):
            raise _outcome
        return _outcome
