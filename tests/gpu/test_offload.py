"""On a host whose GPU this llama.cpp build drives (a CUDA, Vulkan or Metal build with its device
present): a model of a real model's shape (Llama 3.2 1B, F16, random weights) served by the real
inference service with every layer offloaded. Elsewhere these
tests skip, saying so: a GPU cannot be had on a CPU-only machine, and CI has none."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from pendra_inference.backends import BackendReport, activate, lib_dir
from pendra_shared.store import ModelStore

from tests.support.server import ServerProcess, start_server
from tests.support.shapes import write_shaped_gguf

# Read without loading llama.cpp: loading it at collection would choose the CPU variant (and
# remember it) in the real home, outside the tests' own.
GPU_MODULES = [p.name for p in lib_dir().iterdir() if p.name.startswith(("libggml-cuda", "libggml-vulkan"))]
pytestmark = pytest.mark.skipif(
    not GPU_MODULES and sys.platform != "darwin", reason="this llama.cpp build has no GPU backend"
)


@pytest.fixture(scope="module", autouse=True)
def report() -> BackendReport:
    loaded = activate()
    if not loaded.gpu_devices:
        pytest.skip(f"no GPU for this llama.cpp build (it runs on {loaded.backend})")
    return loaded


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("gpu")
    model = write_shaped_gguf(root / "llama-3.2-1b-shape.gguf", "llama-3.2-1b")
    store = ModelStore(root / "models")
    store.import_file(model, name="shape:1b", move=True)
    env = {"PENDRA_MODELS_DIR": str(store.root), "PENDRA_N_CTX": "2048", "PENDRA_KEEP_ALIVE": "-1"}
    # The inference service, as the compose stack runs it on a GPU host.
    proc = start_server(env, root / "serve.log", "inference", timeout_s=180)
    yield proc
    proc.stop()


def test_health_names_the_gpu_backend_and_device(server: ServerProcess, report: BackendReport) -> None:
    health = httpx.get(f"{server.base_url}/health").json()
    assert health["backend"] == report.backend != "cpu"
    assert [d["name"] for d in health["devices"]] == [d.name for d in report.gpu_devices]
    assert all(d["memory_total"] > 0 for d in health["devices"])


def test_chat_decodes_on_the_gpu_with_every_layer_offloaded(
    server: ServerProcess, report: BackendReport
) -> None:
    body = {
        "model": "shape:1b",
        "messages": [{"role": "user", "content": "Count to a hundred."}],
        "max_tokens": 64,
        "temperature": 0,
        "logit_bias": {"2": -100},  # random weights: keep end-of-text away so all 64 are decoded
    }
    reply = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=300)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 64
    if report.backend == "cuda" and shutil.which("nvidia-smi"):
        # The weights live on the GPU: this server holds more than the 2.5 GB of F16 weights there.
        used = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        mib = {int(p): int(m) for p, m in (line.split(",") for line in used.strip().splitlines())}
        assert mib.get(server.proc.pid, 0) > 2400, used


def test_selfcheck_ran_on_the_gpu_before_serving(server: ServerProcess, report: BackendReport) -> None:
    log = server.log()
    assert f"models run on: {report.backend}" in log
    assert "self-check: decoded 8 tokens" in log
    assert "UNUSED GPU" not in log
