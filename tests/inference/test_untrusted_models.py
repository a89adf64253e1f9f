"""Untrusted GGUF files never crash the server (checklist B1, B12, B14; findings F13, F14).

A llama GGUF that passes Pendra's structural validator but makes llama.cpp abort while loading
(`llama.expert_used_count` = 1 with no experts: GGML_ASSERT in load_hparams, SIGABRT) is probed
in a child process and refused with the signal named; truncated files get a 400 `model_invalid`;
a loaded model truncated or rewritten in place is retired before llama.cpp touches its pages.
The end-to-end tests run `pendra serve` as its own process, so a crash would show as its death.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import httpx
import pytest
from pendra_inference.engine import EngineConfig
from pendra_inference.gguf_writer import PROBE, write_llama_gguf
from pendra_inference.probe import ProbeResult, probe
from pendra_inference.registry import ModelRegistry
from pendra_shared.api_errors import InvalidRequest
from pendra_shared.config import load_settings
from pendra_shared.gguf_info import read_gguf_facts
from pendra_shared.store import ModelStore

from tests.support.ggufs import install_like, write_gguf
from tests.support.server import ServerProcess, start_server

HELLO = [{"role": "user", "content": "Hi"}]
CONFIG = EngineConfig(n_ctx=256, n_batch=256, n_ubatch=256, n_threads=2, n_gpu_layers=0, embedding=False)


def write_tiny(path: Path, seed: int = 0) -> Path:
    """A real, loadable llama of random weights (a few hundred KB)."""
    return write_llama_gguf(path, PROBE, name="tiny", seed=seed)


def write_crashing(path: Path) -> Path:
    """The tiny llama plus `llama.expert_used_count = 1` and no expert count: structurally a fine
    GGUF, but llama.cpp's load_hparams asserts n_expert_used <= n_expert and aborts."""
    original = gguf.GGUFWriter.add_name

    def add_name(self: gguf.GGUFWriter, name: str) -> None:
        original(self, name)
        self.add_expert_used_count(1)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf.GGUFWriter, "add_name", add_name)
        return write_tiny(path)


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ggufs")
    return {
        "tiny": write_tiny(root / "tiny.gguf"),
        "crash": write_crashing(root / "crash.gguf"),
        "mismatched": write_gguf(root / "mismatched.gguf"),  # llama metadata, tensors of nothing
    }


# -- B14: the file, and the probe ----------------------------------------------------------------


def test_the_crashing_file_passes_the_validator_and_kills_llama_cpp_in_process(
    ggufs: dict[str, Path],
) -> None:
    assert read_gguf_facts(ggufs["crash"]).architecture == "llama"
    code = (
        "import sys; from pendra_inference.backends import activate; activate(); "
        "from llama_cpp import Llama; Llama(sys.argv[1], n_ctx=256, verbose=False); print('loaded')"
    )
    child = subprocess.run(
        [sys.executable, "-c", code, str(ggufs["crash"])],
        capture_output=True,
        timeout=120,
        env={**os.environ, "GGML_NO_BACKTRACE": "1"},
    )
    assert child.returncode == -signal.SIGABRT, child.stderr[-2000:]


def test_the_probe_names_the_signal_the_load_error_or_the_timeout(
    ggufs: dict[str, Path], tmp_path: Path
) -> None:
    crashed = probe(ggufs["crash"], CONFIG, timeout_s=120)
    assert crashed.reason is not None and crashed.lasting
    assert crashed.reason.startswith("llama.cpp crashed loading it: SIGABRT (")
    assert "GGML_ASSERT" in crashed.reason

    refused = probe(ggufs["mismatched"], CONFIG, timeout_s=120)
    assert refused.reason is not None and refused.reason.startswith("llama.cpp could not load it: ")
    assert "error loading model" in refused.reason and refused.lasting

    assert probe(ggufs["tiny"], CONFIG, timeout_s=120).ok

    hung = probe(
        ggufs["tiny"], CONFIG, timeout_s=1, command=[sys.executable, "-c", "import time; time.sleep(60)"]
    )
    assert hung.reason is not None and "longer than 1 s" in hung.reason and not hung.lasting

    killed = probe(
        ggufs["tiny"],
        CONFIG,
        timeout_s=30,
        command=[sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"],
    )
    assert killed.reason == "the load probe was killed by SIGKILL (out of memory?)" and not killed.lasting


# -- the registry: who is probed, and what is remembered ----------------------------------------


class Spy:
    """The real probe, counting calls per file."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, path: Path, config: EngineConfig, **kwargs: Any) -> ProbeResult:
        self.calls.append(os.path.basename(os.path.realpath(path)))
        return probe(path, config, **kwargs)


def make_registry(store: ModelStore, spy: Spy, **settings: Any) -> ModelRegistry:
    return ModelRegistry(load_settings(models_dir=store.root, n_ctx=256, **settings), store, prober=spy)


def test_only_untrusted_files_are_probed_once_per_file_identity(
    tmp_path: Path, ggufs: dict[str, Path]
) -> None:
    store = ModelStore(tmp_path / "models")
    store.ensure()
    install_like(store, ggufs["tiny"], "pinned:1")
    store.import_file(ggufs["tiny"], name="imported:1")
    shutil.copyfile(ggufs["tiny"], store.root / "dropped.gguf")
    shutil.copyfile(ggufs["crash"], store.root / "crash.gguf")
    spy = Spy()

    async def scenario() -> None:
        reg = make_registry(store, spy)
        try:
            for name in ("pinned:1", "imported:1", "dropped"):
                async with reg.use(name, "chat", keep_alive=0):
                    pass
            assert spy.calls == ["imported-1.gguf", "dropped.gguf"]  # the pinned install is trusted
            async with reg.use("dropped", "chat", keep_alive=0):  # unloaded and loaded again
                pass
            assert spy.calls == ["imported-1.gguf", "dropped.gguf"]  # same file: not probed again

            with pytest.raises(InvalidRequest) as refused:
                async with reg.use("crash", "chat"):
                    pass
            assert refused.value.status == 400 and refused.value.code == "model_invalid"
            assert "llama.cpp crashed loading it: SIGABRT" in refused.value.message
            with pytest.raises(InvalidRequest, match="SIGABRT"):
                async with reg.use("crash", "chat"):
                    pass
            assert spy.calls.count("crash.gguf") == 1  # remembered
            assert "crash" not in [m.name for m in await reg.valid_models()]

            # A same-size change to the pinned file makes it untrusted: probed before loading.
            pinned = store.root / "pinned-1.gguf"
            os.utime(pinned, ns=(pinned.stat().st_atime_ns, pinned.stat().st_mtime_ns + 1))
            await reg.refresh()
            async with reg.use("pinned:1", "chat", keep_alive=0):
                pass
            assert spy.calls[-1] == "pinned-1.gguf"

            # The crashing file replaced by a good one: judged again, and served.
            os.replace(shutil.copyfile(ggufs["tiny"], tmp_path / "fixed.gguf"), store.root / "crash.gguf")
            async with reg.use("crash", "chat", keep_alive=0):
                pass
            assert spy.calls.count("crash.gguf") == 2
        finally:
            await reg.close()

    asyncio.run(scenario())
    listed = {m.file_name: m for m in ModelStore(store.root).scan().models}
    assert listed["crash.gguf"].valid  # the verdict went with the file it was about


def test_a_probe_that_runs_out_of_memory_is_a_503_and_not_held_against_the_file(
    tmp_path: Path, ggufs: dict[str, Path]
) -> None:
    """A GPU or host out of memory says nothing about the file: the request gets 503 with
    Retry-After, nothing is recorded, and the next request probes again and loads."""
    from pendra_inference.probe import CHILD_FAILED
    from pendra_shared.api_errors import Unavailable

    store = ModelStore(tmp_path / "models")
    store.ensure()
    shutil.copyfile(ggufs["tiny"], store.root / "dropped.gguf")
    calls: list[int] = []
    out_of_memory = (
        "import sys; print('ggml_backend_cuda_buffer_type_alloc_buffer: allocating 900 MiB on device 0: "
        f"cudaMalloc failed: out of memory'); print('failed to load model'); sys.exit({CHILD_FAILED})"
    )

    def prober(path: Path, config: EngineConfig, **kwargs: Any) -> ProbeResult:
        calls.append(1)
        if len(calls) == 1:
            return probe(path, config, command=[sys.executable, "-c", out_of_memory], **kwargs)
        return probe(path, config, **kwargs)

    async def scenario() -> None:
        reg = ModelRegistry(load_settings(models_dir=store.root, n_ctx=256), store, prober=prober)
        try:
            with pytest.raises(Unavailable) as busy:
                async with reg.use("dropped", "chat"):
                    pass
            assert busy.value.status == 503 and "out of memory" in busy.value.message
            assert "dropped" in [m.name for m in await reg.valid_models()]
            async with reg.use("dropped", "chat", keep_alive=0):
                pass
            assert len(calls) == 2
        finally:
            await reg.close()

    asyncio.run(scenario())
    assert not (store.root / ".probe").exists() or not list((store.root / ".probe").iterdir())


def test_with_the_probe_off_untrusted_files_load_directly(tmp_path: Path, ggufs: dict[str, Path]) -> None:
    store = ModelStore(tmp_path / "models")
    store.ensure()
    shutil.copyfile(ggufs["tiny"], store.root / "dropped.gguf")
    spy = Spy()

    async def scenario() -> None:
        reg = make_registry(store, spy, untrusted_probe=False)
        try:
            async with reg.use("dropped", "chat", keep_alive=0):
                pass
        finally:
            await reg.close()

    asyncio.run(scenario())
    assert spy.calls == []


# -- end to end: `pendra serve` in its own process ----------------------------------------------


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, ggufs: dict[str, Path]
) -> Iterator[tuple[ServerProcess, Path]]:
    root = tmp_path_factory.mktemp("untrusted") / "models"
    store = ModelStore(root)
    store.ensure()
    store.import_file(ggufs["tiny"], name="good:1")
    for name in ("victim", "rewritten", "streaming"):
        shutil.copyfile(write_tiny(root.parent / f"{name}-src.gguf", seed=1), root / f"{name}.gguf")
    shutil.copyfile(ggufs["crash"], root / "crash.gguf")
    whole = ggufs["tiny"].read_bytes()
    (root / "empty.gguf").write_bytes(b"")
    (root / "four.gguf").write_bytes(b"GGUF")
    (root / "header.gguf").write_bytes(whole[:4096])
    (root / "short.gguf").write_bytes(whole[:-1])
    env = {
        "PENDRA_MODELS_DIR": str(root),
        "PENDRA_N_CTX": "256",
        "PENDRA_KEEP_ALIVE": "-1",
        "HOME": str(root.parent),
    }
    server = start_server(env, root.parent / "serve.log")
    yield server, root
    server.stop()


def chat(server: ServerProcess, model: str) -> httpx.Response:
    body = {"model": model, "messages": HELLO, "max_tokens": 2, "temperature": 0}
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)


def assert_invalid(response: httpx.Response, *words: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "model_invalid",
        "model",
    )
    for word in words:
        assert word in error["message"], error["message"]
    return str(error["message"])


def wait_for(predicate: Callable[[], bool], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_a_file_that_crashes_llama_cpp_is_refused_and_the_server_keeps_serving(
    served: tuple[ServerProcess, Path],
) -> None:
    server, root = served
    message = assert_invalid(chat(server, "crash"), "llama.cpp crashed loading it: SIGABRT")
    assert server.proc.poll() is None, server.log()
    assert chat(server, "good:1").status_code == 200
    assert server.proc.poll() is None

    assert "crash" not in {m["id"] for m in httpx.get(f"{server.base_url}/v1/models").json()["data"]}
    assert_invalid(httpx.get(f"{server.base_url}/v1/models/crash"), "SIGABRT")
    managed = {m["name"]: m for m in httpx.get(f"{server.base_url}/api/models").json()["data"]}
    assert managed["crash"]["status"] == "invalid" and "SIGABRT" in managed["crash"]["error"]
    assert "SIGABRT" in (ModelStore(root).find("crash", include_invalid=True).error or "")

    assert_invalid(chat(server, "crash"), "SIGABRT")  # remembered, not probed again
    assert server.log().count("probing crash in a child process") == 1
    assert message in server.log() or "SIGABRT" in server.log()


@pytest.mark.parametrize("name", ["empty", "four", "header", "short"])
def test_truncated_files_get_a_clear_invalid_model_error(
    served: tuple[ServerProcess, Path], name: str
) -> None:
    server, _root = served
    assert_invalid(chat(server, name), "invalid GGUF")
    assert server.proc.poll() is None
    assert chat(server, "good:1").status_code == 200


def test_a_loaded_model_truncated_in_place_is_retired_not_a_crash(served: tuple[ServerProcess, Path]) -> None:
    server, root = served
    assert chat(server, "victim").status_code == 200  # loaded, its file mapped
    victim = root / "victim.gguf"
    os.truncate(victim, victim.stat().st_size // 2)  # in place: what `cp` over it does first
    assert_invalid(chat(server, "victim"), "truncated")  # at once, before the watcher has run
    assert server.proc.poll() is None, server.log()
    wait_for(lambda: "unloaded victim" in server.log())
    assert chat(server, "good:1").status_code == 200
    assert server.proc.poll() is None


def test_truncating_an_untrusted_model_while_it_decodes_is_no_crash(
    served: tuple[ServerProcess, Path],
) -> None:
    """The window detection cannot close: the file shrinks while a decode reads the weights. An
    untrusted file is loaded without mmap (its weights in the process's own memory), so the
    running stream goes on and the process lives; a mapped file would die of SIGBUS here."""
    server, root = served
    body = {
        "model": "streaming",
        "messages": HELLO,
        "max_tokens": 140,
        "logit_bias": {"2": -100},  # no end of sequence: it decodes all 140
        "stream": True,
    }
    after = 0
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        next(events)
        os.truncate(root / "streaming.gguf", 0)
        for event in events:
            after += 1
            last = event
    assert after > 10 and last == "data: [DONE]"
    assert server.proc.poll() is None, server.log()
    assert_invalid(chat(server, "streaming"), "invalid GGUF")
    assert chat(server, "good:1").status_code == 200


def test_a_loaded_model_rewritten_in_place_is_unloaded_and_judged_again(
    served: tuple[ServerProcess, Path],
) -> None:
    server, root = served
    assert chat(server, "rewritten").status_code == 200
    target = root / "rewritten.gguf"
    fresh = write_tiny(root.parent / "fresh.gguf", seed=7).read_bytes()
    assert len(fresh) == target.stat().st_size
    with target.open("r+b") as fh:  # same inode, same size, other bytes
        fh.write(fresh)
    wait_for(lambda: "rewritten changed" in server.log())  # noticed with no request at all
    wait_for(lambda: "unloaded rewritten" in server.log())
    assert chat(server, "rewritten").status_code == 200  # the new bytes, probed, then loaded
    assert server.log().count("probing rewritten in a child process") == 2
    assert chat(server, "good:1").status_code == 200
    assert server.proc.poll() is None


def test_pendras_own_writes_replace_files_atomically(
    tmp_path: Path, ggufs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Imports (and installs, the same pattern in install.py) write a temporary name in the store
    and rename it over the final one: a loaded model is never rewritten in place."""
    store = ModelStore(tmp_path / "models")
    renames: list[tuple[str, str, int]] = []
    real_replace = os.replace

    def spy(src: Any, dst: Any) -> None:
        src_path, dst_path = Path(src), Path(dst)
        assert src_path.parent == dst_path.parent  # same file system, so the rename is atomic
        renames.append((src_path.name, dst_path.name, src_path.stat().st_size))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    model = store.import_file(ggufs["tiny"], name="atomic:1")
    final = [r for r in renames if r[1] == model.file_name]
    assert len(final) == 1 and final[0][0].startswith(".") and final[0][2] == model.size_bytes
    assert [r[1] for r in renames] == [model.file_name, model.file_name + ".meta.json"]
    sidecar = json.loads((store.root / (model.file_name + ".meta.json")).read_text())
    assert sidecar["verified_file"]["inode"] == model.path.stat().st_ino
