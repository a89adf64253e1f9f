"""Which llama.cpp backend the install builds, decided from a host's facts: each case is a host
this suite does not run on (an NVIDIA box, a Mac, an AMD card under Vulkan), fed as facts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from pendra_shared.hostinfo import (
    DEFAULT_CUDA_ARCHITECTURES,
    Gpu,
    HostError,
    HostFacts,
    choose_backend,
    parse_nvidia_smi,
    parse_vulkaninfo,
)

ROOT = Path(__file__).resolve().parents[2]
H100 = Gpu("NVIDIA H100 80GB HBM3", 81559, "9.0", "580.159.04")
L4 = Gpu("NVIDIA L4", 23034, "8.9", "580.159.04")
RADEON = Gpu("AMD Radeon RX 7900 XTX (RADV NAVI31)", kind="discrete")
LLVMPIPE = Gpu("llvmpipe (LLVM 19.1.7, 256 bits)", kind="cpu")


def linux(**kw: object) -> HostFacts:
    return HostFacts(system="Linux", machine="x86_64", **kw)  # type: ignore[arg-type]


def test_nvidia_driver_and_toolkit_build_cuda_for_the_gpus_it_sees() -> None:
    choice = choose_backend(linux(nvidia_gpus=(H100, L4), nvcc="/usr/local/cuda/bin/nvcc"))
    assert choice.backend == "cuda"
    assert choice.cmake == {"GGML_CUDA": "ON", "CMAKE_CUDA_ARCHITECTURES": "89;90"}
    assert "H100" in choice.reason and "L4" in choice.reason


def test_nvidia_gpu_without_nvcc_falls_back_to_cpu_with_the_fix() -> None:
    choice = choose_backend(linux(nvidia_gpus=(H100,)))
    assert choice.backend == "cpu"
    assert choice.warning is not None and "nvcc" in choice.warning and "CUDA toolkit" in choice.warning


def test_pendra_gpu_cuda_insists_and_fails_clearly_without_nvcc() -> None:
    with pytest.raises(HostError, match="PENDRA_GPU=cuda.*nvcc"):
        choose_backend(linux(nvidia_gpus=(H100,), requested="cuda"))


def test_pendra_gpu_cuda_without_a_gpu_in_sight_builds_the_default_architectures() -> None:
    # A Docker build: the toolkit is there, the GPU is not.
    choice = choose_backend(linux(nvcc="/usr/local/cuda/bin/nvcc", requested="cuda"))
    assert choice.cmake["CMAKE_CUDA_ARCHITECTURES"] == DEFAULT_CUDA_ARCHITECTURES


def test_apple_silicon_builds_metal() -> None:
    choice = choose_backend(HostFacts(system="Darwin", machine="arm64"))
    assert choice.backend == "metal"
    assert choose_backend(HostFacts(system="Darwin", machine="x86_64")).backend == "cpu"


def test_metal_requested_off_a_mac_is_refused() -> None:
    with pytest.raises(HostError, match="Apple silicon"):
        choose_backend(linux(requested="metal"))


def test_vulkan_needs_a_loader_a_gpu_device_and_the_build_tools() -> None:
    ready = linux(vulkan_loader=True, vulkan_gpus=(RADEON,), vulkan_sdk=True)
    assert choose_backend(ready).backend == "vulkan"
    assert choose_backend(ready).cmake == {"GGML_VULKAN": "ON"}
    # A software rasterizer is not a GPU.
    assert (
        choose_backend(linux(vulkan_loader=True, vulkan_gpus=(LLVMPIPE,), vulkan_sdk=True)).backend == "cpu"
    )
    # No loader: the device list is not trusted.
    assert choose_backend(linux(vulkan_gpus=(RADEON,), vulkan_sdk=True)).backend == "cpu"
    missing_tools = choose_backend(linux(vulkan_loader=True, vulkan_gpus=(RADEON,)))
    assert missing_tools.backend == "cpu"
    assert missing_tools.warning is not None and "glslc" in missing_tools.warning


def test_vulkan_headers_too_old_for_this_llama_cpp_are_caught_before_a_long_build() -> None:
    # Debian 12's headers (1.3.239) fail to compile this llama.cpp's Vulkan backend after minutes
    # of building (no VK_EXT_layer_settings); Ubuntu 24.04's (1.3.275) build it.
    old = linux(vulkan_loader=True, vulkan_gpus=(RADEON,), vulkan_sdk=True, vulkan_headers=239)
    choice = choose_backend(old)
    assert choice.backend == "cpu"
    assert choice.warning is not None and "1.3.239" in choice.warning and "1.3.272 or newer" in choice.warning
    with pytest.raises(HostError, match="PENDRA_GPU=vulkan: the Vulkan headers here are 1.3.239"):
        choose_backend(HostFacts(**{**old.__dict__, "requested": "vulkan"}))
    new = HostFacts(**{**old.__dict__, "vulkan_headers": 275})
    assert choose_backend(new).backend == "vulkan"


def test_cuda_wins_over_vulkan_on_an_nvidia_host() -> None:
    facts = linux(
        nvidia_gpus=(H100,), nvcc="/usr/bin/nvcc", vulkan_loader=True, vulkan_gpus=(RADEON,), vulkan_sdk=True
    )
    assert choose_backend(facts).backend == "cuda"
    assert choose_backend(HostFacts(**{**facts.__dict__, "requested": "vulkan"})).backend == "vulkan"


def test_pendra_gpu_cpu_overrides_any_gpu_and_bad_values_are_refused() -> None:
    facts = linux(nvidia_gpus=(H100,), nvcc="/usr/bin/nvcc", requested="CPU")
    assert choose_backend(facts).backend == "cpu"
    with pytest.raises(HostError, match="cuda, metal, vulkan, cpu"):
        choose_backend(linux(requested="rocm"))


def test_no_gpu_builds_the_cpu_variants() -> None:
    choice = choose_backend(linux())
    assert (choice.backend, choice.cmake, choice.warning) == ("cpu", {}, None)


def test_nvidia_smi_and_vulkaninfo_output_parse() -> None:
    smi = "NVIDIA H100 80GB HBM3, 81559, 9.0, 580.159.04\nNVIDIA L4, 23034, 8.9, 580.159.04\n"
    assert parse_nvidia_smi(smi) == (H100, L4)
    assert parse_nvidia_smi("") == ()
    summary = """
Devices:
========
GPU0:
\tapiVersion         = 1.3.278
\tdeviceType         = PHYSICAL_DEVICE_TYPE_DISCRETE_GPU
\tdeviceName         = AMD Radeon RX 7900 XTX (RADV NAVI31)
GPU1:
\tdeviceType         = PHYSICAL_DEVICE_TYPE_CPU
\tdeviceName         = llvmpipe (LLVM 19.1.7, 256 bits)
"""
    assert parse_vulkaninfo(summary) == (RADEON, LLVMPIPE)


def _script() -> object:
    spec = importlib.util.spec_from_file_location("llama_build", ROOT / "scripts" / "llama_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_script_turns_the_choice_into_uv_config_settings() -> None:
    script = _script()
    args = script.uv_args({"GGML_CUDA": "ON", "CMAKE_CUDA_ARCHITECTURES": "89;90"})  # type: ignore[attr-defined]
    assert args == [
        "--config-settings-package",
        "llama-cpp-python:cmake.define.GGML_CUDA=ON",
        "--config-settings-package",
        "llama-cpp-python:cmake.define.CMAKE_CUDA_ARCHITECTURES=89;90",
    ]


def test_install_script_prints_its_choice_and_refuses_bad_overrides() -> None:
    script = str(ROOT / "scripts" / "llama_build.py")
    # This machine has no GPU: the CPU build, and why.
    done = subprocess.run([sys.executable, script, "detect", "--gpu", "cpu"], capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stdout.startswith("llama.cpp backend: cpu (PENDRA_GPU=cpu)")
    bad = subprocess.run(
        [sys.executable, script, "detect"], capture_output=True, text=True, env={"PENDRA_GPU": "tpu"}
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: PENDRA_GPU='tpu': use one of cuda, metal, vulkan, cpu"
    assert "Traceback" not in bad.stderr


def test_gpu_settings_never_repeat_a_project_setting() -> None:
    """uv merges command-line config settings with pyproject.toml's by turning a repeated key into
    a list (["OFF", "ON"]), which CMake would misread; so the GPU's settings add keys only."""
    script = _script()
    static = script.wanted_settings({})  # type: ignore[attr-defined]
    assert static["cmake.define.GGML_BACKEND_DL"] == "ON"
    hosts = [
        linux(nvidia_gpus=(H100,), nvcc="/usr/bin/nvcc"),
        linux(vulkan_loader=True, vulkan_gpus=(RADEON,), vulkan_sdk=True),
        HostFacts(system="Darwin", machine="arm64"),
    ]
    for facts in hosts:
        choice = choose_backend(facts)
        added = {f"cmake.define.{key}" for key in choice.cmake}
        assert added and not added & set(static), choice
        assert script.wanted_settings(choice.cmake) == {  # type: ignore[attr-defined]
            **static,
            **{f"cmake.define.{k}": v for k, v in choice.cmake.items()},
        }


def test_install_script_takes_uv_arguments_after_a_double_dash(capsys: pytest.CaptureFixture[str]) -> None:
    """As the Dockerfiles call it: `sync --gpu cuda -- --frozen --no-dev ...`."""
    script = _script()
    assert script.main(["args", "--gpu", "cpu", "--", "--frozen", "--no-dev"]) == 0  # type: ignore[attr-defined]
    assert script.main(["settings", "--gpu", "cpu", "--", "--frozen"]) == 0  # type: ignore[attr-defined]
    assert "cmake.define.GGML_BACKEND_DL=ON" in capsys.readouterr().out


def test_an_installed_gpu_build_is_kept_when_detection_finds_no_gpu_for_a_moment() -> None:
    script = _script()
    static = script.wanted_settings({})  # type: ignore[attr-defined]
    cuda = {**static, "cmake.define.GGML_CUDA": "ON", "cmake.define.CMAKE_CUDA_ARCHITECTURES": "90"}
    cpu_choice = choose_backend(linux())
    assert script._kept_gpu(cuda, cpu_choice, explicit=False) == "cuda"  # type: ignore[attr-defined]
    assert script._kept_gpu(cuda, cpu_choice, explicit=True) is None  # type: ignore[attr-defined]
    assert script._kept_gpu(static, cpu_choice, explicit=False) is None  # type: ignore[attr-defined]
    assert script._gpu_keys(cuda) == {"GGML_CUDA": "ON", "CMAKE_CUDA_ARCHITECTURES": "90"}  # type: ignore[attr-defined]
