"""`pendra doctor`, the start-up self-check and `/health`: what the build is, what it runs on, the
GPUs it leaves idle, and a clear refusal (not a crash) where the build cannot run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest
from pendra_inference.backends import BackendError, activate, build_variants
from pendra_inference.doctor import summary_lines, unused_gpus
from pendra_inference.selfcheck import SelfCheckDied, crash_message, run_selfcheck
from pendra_shared import hostinfo

from tests.conftest import run_cli
from tests.inference.test_backends import needs_x86_linux
from tests.support.faults import SIGILL_CODE
from tests.support.server import ServerProcess, free_port
from tests.test_cli import assert_clean_error

H100 = hostinfo.Gpu("NVIDIA H100 80GB HBM3", 81559, "9.0", "580.159.04")


def test_doctor_reports_the_build_this_host_and_the_disk(store_dir: Path) -> None:
    done = run_cli("doctor", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    report = activate()
    assert summary["ok"] is True and summary["error"] is None
    build = summary["build"]
    assert build["llama_cpp_python"] == report.llama_cpp_python
    assert build["cpu_variant"] == report.cpu_variant
    assert build["cpu_features"] == report.cpu_features
    assert build["backend"] == report.backend
    assert summary["selfcheck"]["tokens"] == 8
    facts = hostinfo.gather()
    assert [a["name"] for a in summary["host"]["accelerators"]] == [g.name for _, g in facts.accelerators]
    assert summary["models_dir"]["path"] == str(store_dir)
    assert 0 < summary["models_dir"]["free_bytes"] <= summary["models_dir"]["total_bytes"]

    text = run_cli("doctor")
    assert text.returncode == 0
    assert f"models run on: {report.backend}" in text.stdout
    assert "self-check: decoded 8 tokens" in text.stdout
    if report.cpu_variant:
        assert f"loaded: {report.cpu_variant}" in text.stdout


def test_a_gpu_the_build_leaves_idle_is_named_with_the_rebuild_command() -> None:
    facts = hostinfo.HostFacts(system="Linux", machine="x86_64", nvidia_gpus=(H100,))
    cpu_device = {"name": "CPU", "type": "cpu", "backend": "cpu"}
    cpu_only = {"modules": [], "failed_modules": {}, "devices": [cpu_device]}
    (idle,) = unused_gpus(facts, cpu_only)
    assert idle["name"] == H100.name
    assert idle["why"] == "this llama.cpp build has no cuda backend"
    assert idle["fix"] == "python3 scripts/llama_build.py sync --gpu cuda"

    no_driver = {
        "modules": ["cuda"],
        "failed_modules": {"cuda": "libcuda.so.1 is missing"},
        "devices": [cpu_device],
    }
    (idle,) = unused_gpus(facts, no_driver)
    assert "did not load: libcuda.so.1 is missing" in idle["why"]

    gpu = {"name": "CUDA0", "type": "gpu", "backend": "cuda"}
    assert unused_gpus(facts, {"modules": ["cuda"], "failed_modules": {}, "devices": [gpu, cpu_device]}) == []


def test_the_summary_shouts_about_an_unused_gpu() -> None:
    summary = {
        "build": None,
        "selfcheck": None,
        "host": {"system": "Linux", "machine": "x86_64", "cpu": "x", "accelerators": []},
        "unused_gpus": [{"name": "NVIDIA L4", "why": "no cuda backend", "fix": "rebuild"}],
        "models_dir": {"path": "/m", "free_bytes": 2**30, "total_bytes": 2**31},
        "error": None,
    }
    assert "UNUSED GPU NVIDIA L4: no cuda backend; fix: rebuild" in summary_lines(summary)


@needs_x86_linux
def test_a_selfcheck_child_killed_by_sigill_is_a_clear_error() -> None:
    """The child really dies of SIGILL (it executes ud2, an illegal instruction on every x86-64
    CPU); the parent turns that into one sentence with the cause and the fix."""
    with pytest.raises(SelfCheckDied) as caught:
        run_selfcheck(command=[sys.executable, "-c", SIGILL_CODE])
    assert caught.value.signal == "SIGILL"
    message = str(caught.value)
    assert message.startswith("llama.cpp died of SIGILL in its start-up self-check")
    assert "CPU instruction that this CPU or its OS does not allow" in message
    assert "python3 scripts/llama_build.py sync" in message
    assert "SIGSEGV" in crash_message("SIGSEGV")


@needs_x86_linux
def test_a_death_in_the_gpu_pass_is_not_blamed_on_the_cpu_variant() -> None:
    """The child says when the CPU's passes have lived; a death after that (a GPU driver, the
    GPU out of memory) is a plain error: no CPU variant is given up for it."""
    with pytest.raises(BackendError) as caught:
        run_selfcheck("haswell", command=[sys.executable, "-c", SIGILL_CODE, "--after-cpu-passes"])
    assert not isinstance(caught.value, SelfCheckDied)
    assert "in its GPU pass, after the CPU's passes lived" in str(caught.value)


def unrunnable_variant() -> str | None:
    """A variant of the build that this CPU scores 0 (ggml's cpuid check), if there is one."""
    return next((v.name for v in build_variants() if v.score <= 0), None)


@needs_x86_linux
def test_serve_refuses_to_start_on_a_variant_this_cpu_cannot_run(store_dir: Path) -> None:
    port = str(free_port())
    unknown = run_cli("serve", "--port", port, env={"PENDRA_CPU_VARIANT": "power9"}, timeout=60)
    assert_clean_error(unknown, "error: llama.cpp cannot run on this host: PENDRA_CPU_VARIANT=power9 is not")
    assert "rebuild" not in unknown.stderr  # a bad setting, not a bad build
    variant = unrunnable_variant()
    if variant is None:
        pytest.skip("this CPU runs every variant of the build")
    refused = run_cli("serve", "--port", port, env={"PENDRA_CPU_VARIANT": variant}, timeout=60)
    assert_clean_error(refused, f"PENDRA_CPU_VARIANT={variant} cannot run on this CPU; unset it")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
    # The inference service's own entry point refuses the same way.
    service = run_cli("serve", "inference", "--port", port, env={"PENDRA_CPU_VARIANT": variant}, timeout=60)
    assert_clean_error(service, f"PENDRA_CPU_VARIANT={variant} cannot run on this CPU")


def test_health_says_what_the_models_run_on(server: ServerProcess) -> None:
    report = activate()
    health = httpx.get(f"{server.base_url}/health").json()
    assert health["status"] == "ok"
    assert health["backend"] == report.backend
    assert health["cpu_variant"] == report.cpu_variant
    wanted = report.gpu_devices or report.devices
    assert [(d["name"], d["type"]) for d in health["devices"]] == [(d.name, d.type) for d in wanted]
    log = server.log()
    assert "self-check: decoded 8 tokens" in log
    assert f"models run on: {report.backend}" in log
