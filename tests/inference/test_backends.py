"""The llama.cpp build as built and as loaded: its own report (ggml's backend registry and
`llama_print_system_info`) is read back and held against the project's build settings and this
CPU, so a change of build flags cannot pass silently. Other CPUs are real too: ggml's ranking and
the self-check run under qemu's x86-64 emulation of older CPUs (Haswell: AVX2, no AVX-512;
Nehalem: SSE4.2, no AVX)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pendra_inference.backends import (
    AMX_VARIANTS,
    FAULT_VARIANTS_ENV,
    BackendError,
    CpuVariant,
    activate,
    build_variants,
    choose_variant,
    ranked,
)
from pendra_inference.cpu_choice import Death, decided, still_to_try
from pendra_shared.hostinfo import cpu_flags

ROOT = Path(__file__).resolve().parents[2]
X86_LINUX = sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")

# What each of ggml's x86 CPU variants is compiled for, as /proc/cpuinfo flags (ggml/src/CMakeLists.txt).
HASWELL = {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"}
SKYLAKEX = HASWELL | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}
VARIANT_FLAGS: dict[str, set[str]] = {
    "x64": set(),
    "sse42": {"sse4_2"},
    "sandybridge": {"sse4_2", "avx"},
    "ivybridge": {"sse4_2", "avx", "f16c"},
    "piledriver": {"sse4_2", "avx", "f16c", "fma"},
    "haswell": HASWELL,
    "alderlake": HASWELL | {"avx_vnni"},
    "skylakex": SKYLAKEX,
    "cannonlake": SKYLAKEX | {"avx512vbmi"},
    "cascadelake": SKYLAKEX | {"avx512_vnni"},
    "icelake": SKYLAKEX | {"avx512vbmi", "avx512_vnni"},
    "cooperlake": SKYLAKEX | {"avx512_vnni", "avx512_bf16"},
    "zen4": SKYLAKEX | {"avx512vbmi", "avx512_vnni", "avx512_bf16"},
    "sapphirerapids": SKYLAKEX | {"avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"},
}
# The same features as ggml's CPU backend reports them.
GGML_NAMES = {
    "avx": "AVX",
    "avx2": "AVX2",
    "f16c": "F16C",
    "fma": "FMA",
    "bmi2": "BMI2",
    "avx512f": "AVX512",
    "avx512vbmi": "AVX512_VBMI",
    "avx512_vnni": "AVX512_VNNI",
    "avx512_bf16": "AVX512_BF16",
    "avx_vnni": "AVX_VNNI",
    "amx_int8": "AMX_INT8",
}
needs_x86_linux = pytest.mark.skipif(not X86_LINUX, reason="ggml's x86 CPU variants: an x86-64 Linux host")


def host_flags() -> set[str]:
    flags = set(cpu_flags())
    assert flags, "no CPU flags in /proc/cpuinfo"
    return flags


def expected_variant(flags: set[str], died: frozenset[str] | set[str] = frozenset()) -> str:
    """The variant this CPU's flags call for, once those in `died` died in the self-check (and
    every AMX variant with any of them)."""
    runnable = [
        name
        for name, needs in VARIANT_FLAGS.items()
        if needs <= flags and name not in died and not (name in AMX_VARIANTS and died & AMX_VARIANTS)
    ]
    return max(runnable, key=lambda name: len(VARIANT_FLAGS[name]))


def died_here() -> set[str]:
    """The variants this process's verdict saw die (none on most hosts)."""
    verdict = decided()
    return {d.variant for d in verdict.died} if verdict else set()


def enabled(features: dict[str, str]) -> set[str]:
    return {name for name, value in features.items() if value == "1"}


def expected_features(variant: str) -> set[str]:
    return {GGML_NAMES[f] for f in VARIANT_FLAGS[variant] if f in GGML_NAMES}


def selfcheck(*prefix: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "pendra_inference.selfcheck"],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(emulated=bool(prefix), **(env or {})),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return data


def child_env(*, emulated: bool, **extra: str) -> dict[str, str]:
    """The environment for a child; under emulation, without the test switch that makes variants
    die on this host (an emulated CPU is another CPU: it executes what it reports)."""
    env = {**os.environ, **extra}
    if emulated:
        env.pop(FAULT_VARIANTS_ENV, None)
    return env


def test_installed_build_is_the_one_the_project_configures() -> None:
    """uv records the config settings each wheel was built with; they must be pyproject's."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = pyproject["tool"]["uv"]["config-settings-package"]["llama-cpp-python"]
    assert wanted["cmake.define.GGML_BACKEND_DL"] == "ON"
    assert wanted["cmake.define.GGML_CPU_ALL_VARIANTS"] == "ON"
    assert wanted["cmake.define.GGML_NATIVE"] == "OFF"
    record = importlib.metadata.distribution("llama_cpp_python").read_text("uv_build.json")
    assert record is not None, "llama-cpp-python was not built by uv from the project's settings"
    built = json.loads(record)["config_settings"]
    for key, value in wanted.items():
        assert built.get(key) == value, (key, built)


@needs_x86_linux
def test_build_holds_every_cpu_variant_and_loads_the_best_that_lives_here() -> None:
    report = activate()
    assert report.dynamic
    assert sorted(report.cpu_variants) == sorted(VARIANT_FLAGS)
    # ggml's own ranking (cpuid) agrees with what the kernel's flags say each variant needs...
    assert ranked(build_variants())[0].name == expected_variant(host_flags())
    # ...and the variant loaded is the best of them that lived through the self-check.
    assert report.cpu_variant == expected_variant(host_flags(), died_here())
    assert report.backends[-1] == "CPU"
    # ggml's own report of what the loaded CPU backend was compiled with.
    assert enabled(report.cpu_features) & set(GGML_NAMES.values()) == expected_features(report.cpu_variant)
    info = report.system_info
    for feature in expected_features(report.cpu_variant):
        assert f"{feature} = 1" in info, info
    if report.cpu_variant not in AMX_VARIANTS:
        assert "AMX_INT8 = 1" not in info and "AMX" not in report.extra_buffer_types
    if report.cpu_features.get("REPACK") == "1":  # what llama.cpp repacks Q4_0 and Q4_K weights into
        assert "CPU_REPACK" in report.extra_buffer_types
    assert [d.type for d in report.devices if d.backend == "cpu"] == ["cpu"]
    assert report.backend == (report.gpu_devices[0].backend if report.gpu_devices else "cpu")


def variants(**scores: int) -> list[CpuVariant]:
    return [CpuVariant(name, Path(f"libggml-cpu-{name}.so"), score) for name, score in scores.items()]


def test_candidates_go_by_score_and_amx_goes_once_an_amx_variant_died() -> None:
    # A Sapphire Rapids VM whose CPU reports AMX but whose hypervisor does not execute it.
    found = ranked(variants(x64=1, haswell=200, zen4=3000, sapphirerapids=5000, skylakex=0))
    assert [v.name for v in found] == ["sapphirerapids", "zen4", "haswell", "x64"]  # skylakex: score 0
    left = still_to_try(found, [Death("sapphirerapids", "SIGILL")])
    assert [v.name for v in left] == ["zen4", "haswell", "x64"]
    left = still_to_try(found, [Death("sapphirerapids", "SIGILL"), Death("zen4", "SIGSEGV")])
    assert [v.name for v in left] == ["haswell", "x64"]
    # A non-AMX variant dying leaves the AMX one in its place.
    assert [v.name for v in still_to_try(found, [Death("zen4", "SIGILL")])] == [
        "sapphirerapids",
        "haswell",
        "x64",
    ]


def test_variant_choice_refuses_what_cannot_run() -> None:
    found = variants(x64=1, haswell=200, zen4=0)
    assert choose_variant(found, "haswell").name == "haswell"
    with pytest.raises(BackendError, match="PENDRA_CPU_VARIANT=zen4 cannot run on this CPU"):
        choose_variant(found, "zen4")
    with pytest.raises(BackendError, match="PENDRA_CPU_VARIANT=power9 is not in this build"):
        choose_variant(found, "power9")
    with pytest.raises(BackendError, match="no CPU variant of this llama.cpp build can run"):
        ranked(variants(zen4=0))
    assert ranked([]) == []  # a build with its CPU backend linked in has no candidates


@needs_x86_linux
@pytest.mark.parametrize("variant", ["x64", "haswell"])
def test_a_chosen_variant_decodes(variant: str) -> None:
    """PENDRA_CPU_VARIANT loads that variant; the x86-64 baseline decodes too. (Where the
    self-check saw that variant die, pinning it dies the same way.)"""
    activate()
    if variant in died_here():
        died = subprocess.run(
            [sys.executable, "-m", "pendra_inference.selfcheck", "--cpu-variant", variant], timeout=300
        )
        assert died.returncode == -signal.SIGILL
        return
    data = selfcheck(env={"PENDRA_CPU_VARIANT": variant})
    report = data["report"]
    assert report["cpu_variant"] == variant
    assert enabled(report["cpu_features"]) & set(GGML_NAMES.values()) == expected_features(variant)
    assert data["tokens"] == 8


QEMU = shutil.which("qemu-x86_64")


@needs_x86_linux
@pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 (Debian's qemu-user; scripts/test.sh installs it)")
@pytest.mark.parametrize(
    ("cpu", "variant", "openblas"),
    [("Haswell-v4", "haswell", "HASWELL"), ("Nehalem", "sse42", "NEHALEM")],
)
def test_the_same_build_runs_on_an_older_cpu(cpu: str, variant: str, openblas: str) -> None:
    """Run on an emulated CPU without AVX-512 or without AVX at all: ggml ranks that CPU's variant
    first, and it loads and decodes the self-check model, where a -march=native build made on a
    newer CPU dies of SIGILL."""
    assert QEMU is not None
    # numpy's OpenBLAS picks its kernels from the CPU's family and model, and qemu-user's Nehalem
    # on some hosts (qemu 7.2 on an AMD EPYC) reads as a core with AVX: it dies of SIGILL at
    # `import numpy` before Pendra runs. The core it emulates, named, is what a real one reports.
    emulated = child_env(emulated=True, OPENBLAS_CORETYPE=openblas)
    rank = (
        "from pendra_inference.backends import build_variants, ranked; "
        "print(ranked(build_variants())[0].name)"
    )
    done = subprocess.run(
        [QEMU, "-cpu", cpu, sys.executable, "-c", rank],
        capture_output=True,
        text=True,
        timeout=300,
        env=emulated,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == variant
    data = selfcheck(QEMU, "-cpu", cpu, env={"PENDRA_CPU_VARIANT": variant, "OPENBLAS_CORETYPE": openblas})
    report = data["report"]
    assert report["cpu_variant"] == variant
    assert enabled(report["cpu_features"]) & set(GGML_NAMES.values()) == expected_features(variant)
    assert "AVX512" not in enabled(report["cpu_features"])
    assert data["tokens"] == 8
