"""A host whose best CPU variant dies: the self-check decides, the next variant serves, the verdict
is remembered per build and CPU, and PENDRA_CPU_VARIANT is never overridden.

Such a host (a Sapphire Rapids VM that reports AMX its hypervisor will not execute) is made here
with PENDRA_TEST_SIGILL_VARIANTS: a process that loads a variant it names executes an illegal
instruction and dies of SIGILL, raised by the CPU, as every process that runs that variant's
kernels does there. (qemu cannot stand in: its TCG drops amx-tile, amx-int8 and every AVX-512 flag
from the CPUID it reports, so no variant can be made to score high and fault under it.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import httpx
import openai
import pytest
from pendra_inference.backends import FAULT_VARIANTS_ENV, BackendError, activate, build_variants, ranked
from pendra_inference.cpu_choice import Death, Verdict, VerdictCache, build_hash, decide, host_key
from pendra_inference.engine import EngineConfig
from pendra_inference.gguf_writer import PROBE, SELFCHECK_MODEL, write_llama_gguf, write_selfcheck_model
from pendra_inference.probe import probe
from pendra_inference.selfcheck import run_selfcheck
from pendra_shared.config import load_settings

from tests.conftest import gemma_entry, run_cli
from tests.support.server import free_port, start_server
from tests.test_cli import assert_clean_error

CANDIDATES = [v.name for v in ranked(build_variants())]
needs_two_variants = pytest.mark.skipif(
    len(CANDIDATES) < 2, reason="a build with at least two CPU variants this CPU can run"
)
pytestmark = [
    needs_two_variants,
    pytest.mark.skipif(sys.platform == "win32", reason="a crash is not a signal on Windows"),
]


@pytest.fixture
def best_dies(monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """This host, as one whose best-scored variant dies: returns (that variant, the next)."""
    monkeypatch.setenv(FAULT_VARIANTS_ENV, CANDIDATES[0])
    return CANDIDATES[0], CANDIDATES[1]


def fallback_line(best: str, second: str) -> str:
    return f"{best} died of SIGILL in its self-check; serving with {second}"


def test_when_the_best_variant_dies_the_next_serves_and_the_verdict_is_remembered(
    best_dies: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    best, second = best_dies
    settings = load_settings(cache_dir=tmp_path / "cache")
    decision = decide(settings, check=True)
    verdict = decision.verdict
    assert (verdict.variant, verdict.source, verdict.died) == (second, "checked", (Death(best, "SIGILL"),))
    assert verdict.fallback == fallback_line(best, second)
    assert decision.check is not None
    assert decision.check.report["cpu_variant"] == second and decision.check.tokens == 8

    assert verdict.cache_file is not None
    record = json.loads(Path(verdict.cache_file).read_text())
    assert record["variant"] == second
    assert record["died"] == [{"variant": best, "signal": "SIGILL"}]
    assert record["key"] == host_key()
    assert set(record["key"]) == {"machine", "model", "flags", "microcode", "build"}

    # A later process that only needs the variant runs no child: with every variant now fatal,
    # it still gets the remembered one.
    monkeypatch.setenv(FAULT_VARIANTS_ENV, ",".join(CANDIDATES))
    again = decide(settings, check=False)
    assert again.check is None
    assert again.verdict == Verdict(second, "remembered", verdict.died, verdict.cache_file)

    # A server's start checks the remembered variant; dead now, the search goes on past it, and
    # with nothing left alive the start fails, naming every variant, and nothing stays remembered.
    with pytest.raises(BackendError) as caught:
        decide(settings, check=True)
    message = str(caught.value)
    assert message.startswith("llama.cpp died in its start-up self-check with every CPU variant")
    assert f"{best} (SIGILL)" in message and f"{CANDIDATES[-1]} (SIGILL)" in message
    assert not Path(verdict.cache_file).exists()


def test_a_remembered_verdict_of_another_build_or_cpu_is_not_used(
    best_dies: tuple[str, str], tmp_path: Path
) -> None:
    best, second = best_dies
    settings = load_settings(cache_dir=tmp_path / "cache")
    key = host_key()
    # What a different build, or the same build after a microcode update, remembered: the last
    # candidate. This build on this CPU finds its own answer.
    for other in ({**key, "build": "0" * 64}, {**key, "microcode": key["microcode"] + "-updated"}):
        VerdictCache(settings.cache_dir, other).write(Verdict(CANDIDATES[-1], "checked"))
    decision = decide(settings, check=False)
    assert (decision.verdict.variant, decision.verdict.source) == (second, "checked")
    assert len(list((settings.cache_dir / "cpu-variant").glob("*.json"))) == 3


def test_a_cache_that_cannot_be_read_or_written_does_not_stop_a_start(
    best_dies: tuple[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    best, second = best_dies
    cache_dir = tmp_path / "cache"
    settings = load_settings(cache_dir=cache_dir)
    broken = VerdictCache(cache_dir, host_key())
    broken.path.parent.mkdir(parents=True)
    broken.path.write_text('{"version": 1, "key": ')  # cut short
    decision = decide(settings, check=False)
    assert decision.verdict.variant == second and decision.verdict.source == "checked"
    assert json.loads(broken.path.read_text())["variant"] == second  # written whole again
    assert "ignoring the remembered CPU variant" in caplog.text

    # A cache directory that is a file (a read-only home does the same): the verdict holds for
    # this start, a warning says why it is not remembered.
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    unwritable = decide(load_settings(cache_dir=blocked), check=False).verdict
    assert (unwritable.variant, unwritable.cache_file) == (second, None)
    assert "cannot remember the CPU variant" in caplog.text


def test_the_build_hash_follows_the_libraries_bytes(tmp_path: Path) -> None:
    from pendra_inference.backends import lib_dir

    copy = tmp_path / "lib"
    shutil.copytree(lib_dir(), copy)
    assert build_hash(copy) == build_hash(lib_dir())  # the same build, reinstalled: same verdict
    module = copy / next(v.path.name for v in build_variants() if v.name == CANDIDATES[0])
    data = bytearray(module.read_bytes())
    data[-1] ^= 0xFF
    module.write_bytes(bytes(data))
    assert build_hash(copy) != build_hash(lib_dir())  # a rebuilt variant: checked again


def test_pendra_cpu_variant_is_never_overridden(best_dies: tuple[str, str], tmp_path: Path) -> None:
    best, second = best_dies
    settings = load_settings(cache_dir=tmp_path / "cache")
    assert decide(settings, check=True).verdict.variant == second  # remembered now
    pinned = CANDIDATES[-1]
    decision = decide(load_settings(cache_dir=tmp_path / "cache", cpu_variant=pinned), check=True)
    assert (decision.verdict.variant, decision.verdict.source) == (pinned, "pinned")
    assert decision.check is not None and decision.check.report["cpu_variant"] == pinned
    with pytest.raises(BackendError, match=f"PENDRA_CPU_VARIANT={best} died of SIGILL") as caught:
        decide(load_settings(cache_dir=tmp_path / "cache", cpu_variant=best), check=True)
    assert "unset PENDRA_CPU_VARIANT" in str(caught.value)


def test_the_readme_commands_work_on_a_host_whose_best_variant_dies(
    best_dies: tuple[str, str],
    store_dir: Path,
    served_gemma: str,
    write_catalogue: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """`pendra models install` then `pendra serve`, no setting by hand: the server starts with the
    next variant, says so in one log line, answers, and `pendra doctor` says the same."""
    best, second = best_dies
    write_catalogue([gemma_entry(served_gemma)])
    installed = run_cli("models", "install", "gemma3:270m")
    assert installed.returncode == 0, installed.stderr

    server = start_server({}, tmp_path / "serve.log", timeout_s=120)
    try:
        assert httpx.get(f"{server.base_url}/health").json()["cpu_variant"] == second
        with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as client:
            answer = client.completions.create(model="gemma3:270m", prompt="The sky is", max_tokens=4)
        assert answer.usage is not None and answer.usage.completion_tokens > 0
    finally:
        server.stop()
    log = server.log()
    said = [line for line in log.splitlines() if best in line and "died" in line]
    assert len(said) == 1 and said[0].endswith(f"CPU variant: {fallback_line(best, second)}"), said
    assert f"loaded: {second} (self-checked now)" in log

    doctor = run_cli("doctor")
    assert doctor.returncode == 0, doctor.stderr
    assert f"CPU variant: {fallback_line(best, second)}" in doctor.stdout
    assert f"loaded: {second} (remembered from an earlier self-check)" in doctor.stdout
    summary = json.loads(run_cli("doctor", "--json").stdout)
    assert summary["build"]["cpu_variant"] == second
    assert summary["cpu_choice"]["died"] == [{"variant": best, "signal": "SIGILL"}]

    # The next start runs the remembered variant's self-check alone.
    again = start_server({}, tmp_path / "again.log", timeout_s=120)
    again.stop()
    assert f"loaded: {second} (remembered from an earlier self-check)" in again.log()
    # `pendra doctor --recheck` forgets the verdict and reaches it again.
    rechecked = run_cli("doctor", "--recheck")
    assert rechecked.returncode == 0, rechecked.stderr
    assert f"loaded: {second} (self-checked now)" in rechecked.stdout
    assert f"CPU variant: {fallback_line(best, second)}" in rechecked.stdout

    # Pinned to the variant that dies, the server refuses to start rather than overriding it.
    refused = run_cli("serve", "--port", str(free_port()), env={"PENDRA_CPU_VARIANT": best}, timeout=120)
    assert_clean_error(refused, f"PENDRA_CPU_VARIANT={best} died of SIGILL in its start-up self-check")


def test_a_process_that_loads_llama_cpp_itself_takes_the_verdict(
    best_dies: tuple[str, str], tmp_path: Path
) -> None:
    """Tests' in-process engines and bench scripts call `activate()` with no preflight: it runs the
    search (self-check children) before loading anything; a later process takes the remembered
    verdict and starts no child at all."""
    best, second = best_dies
    env = {"PENDRA_CACHE_DIR": str(tmp_path / "cache")}
    assert run_python(COUNT_CHILDREN, env).stdout.split()[-2:] == [second, "2"]  # best died, second lived
    assert run_python(COUNT_CHILDREN, env).stdout.split()[-2:] == [second, "0"]


# Loads llama.cpp as an embedded engine does and prints the CPU variant and how many child
# processes that started (subprocess.run is watched, not replaced).
COUNT_CHILDREN = """
import subprocess
started = []
run = subprocess.run
def watched(*args, **kwargs):
    started.append(args)
    return run(*args, **kwargs)
subprocess.run = watched
from pendra_inference.backends import activate
print(activate().cpu_variant, len(started))
"""


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_the_probe_child_loads_the_variant_its_parent_serves_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe of an untrusted file loads its parent's variant, never a choice of its own: made
    fatal for this test, that variant kills the probe child, although an empty cache would have
    led a child choosing by itself to another one."""
    serving = activate().cpu_variant
    assert serving is not None
    monkeypatch.setenv(FAULT_VARIANTS_ENV, serving)
    monkeypatch.setenv("PENDRA_CACHE_DIR", str(tmp_path / "empty-cache"))
    path = write_llama_gguf(tmp_path / "tiny.gguf", PROBE, name="tiny")
    config = EngineConfig(n_ctx=128, n_batch=32, n_ubatch=32, n_threads=2, n_gpu_layers=0, embedding=False)
    result = probe(path, config, timeout_s=120)
    assert result.reason is not None and result.reason.startswith("llama.cpp crashed loading it: SIGILL")


def test_the_selfcheck_model_carries_the_types_and_shapes_serving_meets(tmp_path: Path) -> None:
    """Every matrix type of the catalogue's files, each in dimensions llama.cpp's AMX kernels take
    (rows of whole 32-row tiles; a K-quant row a whole 256-value block), in attention and in
    mixture-of-experts layers."""
    reader = gguf.GGUFReader(write_selfcheck_model(tmp_path / "selfcheck.gguf"))
    # F32 stays F32 (the experts' router): no kernel of a variant's own takes it.
    matrices = [t for t in reader.tensors if len(t.shape) >= 2 and t.tensor_type.name != "F32"]
    kinds = {t.tensor_type.name.lower() for t in matrices}
    assert {"q4_k", "q6_k", "q8_0", "f16", "bf16", "q4_0", "mxfp4"} <= kinds
    assert set(SELFCHECK_MODEL.layer_types) <= kinds
    for tensor in matrices:
        row, rows = int(tensor.shape[0]), int(tensor.shape[1])
        assert rows % 32 == 0, tensor.name
        if tensor.tensor_type.name.endswith("_K"):
            assert row % 256 == 0, tensor.name
    names = {t.name for t in reader.tensors}
    assert "blk.0.ffn_gate_exps.weight" in names and "blk.0.attn_q.weight" in names


def test_the_selfcheck_runs_the_kernels_serving_runs() -> None:
    """The child puts the weights where llama.cpp puts a real model's for that variant (repacked
    Q4_0 and Q4_K blocks on an AVX2 CPU; AMX tiles where the kernel grants them), decodes a prompt
    batch larger than one micro-batch and single tokens, on more than one thread."""
    serving = activate().cpu_variant
    check = run_selfcheck(serving)
    report = check.report
    assert report["cpu_variant"] == serving
    assert check.threads >= 2 and check.prompt_tokens > 64 and check.tokens == 8
    if report["cpu_features"].get("AVX2") == "1":
        assert check.weights_in.get("CPU_REPACK", 0) > 0, check.weights_in
    if "AMX" in report["extra_buffer_types"]:
        assert check.weights_in.get("AMX", 0) > 0, check.weights_in
    assert sum(check.weights_in.values()) > 5  # MiB: the whole model, wherever it went
