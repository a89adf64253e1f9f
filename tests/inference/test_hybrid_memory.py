"""The memory of a hybrid model is counted: a `qwen35` file with Qwen3.6-27B's real Gated DeltaNet
widths (48 value heads, 16 key heads of 128: a 3 MiB state per layer and sequence) in four layers
loads through a real `pendra serve` within the figure the registry reports, and the process grows
by no more than that figure. llama.cpp allocates a recurrent state for every sequence id of the
context, so before the scheduler sized its sequences by memory this file took 2.5 GB (256 ids)
while the figure said 41 MiB."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from pendra_inference.gguf_hybrid import QWEN36_27B_DELTANET
from pendra_inference.model_memory import HYBRID, memory_shape
from pendra_shared.store import ModelStore

from tests.support.hybrids import write_hybrid
from tests.support.server import start_server

NAME = "deltanet:real-widths"


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_real_deltanet_widths_load_within_the_reported_memory(tmp_path: Path) -> None:
    path = write_hybrid(tmp_path / "deltanet.gguf", "qwen35", QWEN36_27B_DELTANET)
    ModelStore(tmp_path / "models").import_file(path, name=NAME, purpose="chat")
    shape = memory_shape(path)
    assert shape.kind == HYBRID
    assert shape.state_bytes == QWEN36_27B_DELTANET.state_bytes("qwen35")  # 3 layers of 3.1 MiB
    env = {
        "PENDRA_MODELS_DIR": str(tmp_path / "models"),
        "PENDRA_N_CTX": "1024",
        "PENDRA_PARALLEL": "4",
        "PENDRA_KEEP_ALIVE": "-1",
        "PENDRA_CHECKPOINT_BUDGET_BYTES": "0",  # what the process holds is then all counted up front
        "HOME": str(tmp_path),
    }
    server = start_server(env, tmp_path / "serve.log")
    try:
        time.sleep(0.5)
        before = rss(server.proc.pid)
        body = {"model": NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
        assert httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120).status_code == 200
        grown = rss(server.proc.pid) - before
        loaded = httpx.get(f"{server.base_url}/status", timeout=10).json()["loaded"][0]
        ps = httpx.get(f"{server.base_url}/api/ps", timeout=10).json()["models"][0]
    finally:
        server.stop()
    sequences = loaded["sequences"]
    assert sequences == 8  # one running and one cached per sequence of the cache, not llama.cpp's 256
    states = sequences * shape.state_bytes
    figure = loaded["memory_bytes"]
    assert figure >= path.stat().st_size + states
    assert ps["size"] == figure  # Ollama's /api/ps says the same
    assert grown >= states  # the states are really there ...
    assert grown <= figure * 1.1  # ... and nothing the figure leaves out is large


def test_checkpoints_are_counted_at_their_budget(tmp_path: Path) -> None:
    from pendra_inference.registry import ModelRegistry
    from pendra_shared.config import Settings

    path = write_hybrid(tmp_path / "deltanet.gguf", "qwen35", QWEN36_27B_DELTANET)
    store = ModelStore(tmp_path / "models")
    store.import_file(path, name=NAME, purpose="chat")
    model = store.find(NAME)
    assert model is not None
    settings = Settings(models_dir=tmp_path / "models", parallel=4, memory_budget_bytes=8 * 1024**3)
    shape = memory_shape(path)
    default = ModelRegistry(settings, store).engine_config(model)
    without = settings.model_copy(update={"checkpoint_budget_bytes": 0})
    none = ModelRegistry(without, store).engine_config(model)
    assert default[0].sequences == none[0].sequences == 8
    assert default[0].checkpoint_bytes == 2 * 8 * shape.state_bytes  # two per sequence id
    assert default[1] - none[1] == default[0].checkpoint_bytes


def test_doctor_counts_the_states_of_an_installed_hybrid(tmp_path: Path) -> None:
    import json

    from tests.conftest import run_cli

    path = write_hybrid(tmp_path / "deltanet.gguf", "qwen35", QWEN36_27B_DELTANET)
    ModelStore(tmp_path / "models").import_file(path, name=NAME, purpose="chat")
    env = {"PENDRA_MODELS_DIR": str(tmp_path / "models"), "PENDRA_PARALLEL": "4", "PENDRA_N_CTX": "1024"}
    done = run_cli("doctor", "--json", env=env)
    assert done.returncode == 0, done.stderr
    (model,) = json.loads(done.stdout)["models"]
    state = memory_shape(path).state_bytes
    assert model["name"] == NAME and model["memory_kind"] == HYBRID
    assert model["sequences"] == 8 and model["state_bytes"] == 8 * state
    assert model["checkpoint_bytes"] == 2 * 8 * state
    assert model["memory_bytes"] >= model["weights_bytes"] + model["kv_bytes"] + 3 * 8 * state
    text = run_cli("doctor", env=env).stdout
    assert f"model {NAME} (hybrid): about " in text
    assert "recurrent states 74.8 MiB (8 sequences), checkpoints up to 149.6 MiB" in text
