"""More models asked for at once than may be loaded (Ollama's TestMultiModelStress): each request
is answered, or refused with a clear 503 while the others hold the slots; never a crash."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path

import httpx
from pendra_inference.gguf_writer import LlamaShape, write_llama_gguf
from pendra_shared.store import ModelStore

from tests.support.server import start_server

SHAPE = LlamaShape(n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=256, n_vocab=1000, context=512)


def test_requests_across_more_models_than_fit_are_served_or_refused_cleanly(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    names = [f"tiny{i}:q8" for i in range(3)]
    for i, name in enumerate(names):
        path = write_llama_gguf(tmp_path / f"tiny{i}.gguf", SHAPE, name=f"tiny {i}")
        store.import_file(path, name=name, purpose="chat")
    env = {
        "PENDRA_MODELS_DIR": str(store.root),
        "PENDRA_MAX_LOADED_MODELS": "1",
        "PENDRA_N_CTX": "512",
        "PENDRA_KEEP_ALIVE": "0",
    }
    server = start_server(env, tmp_path / "serve.log", timeout_s=120)

    def ask(i: int) -> httpx.Response:
        body = {
            "model": names[i % len(names)],
            "max_tokens": 8,
            "messages": [{"role": "user", "content": f"request {i}"}],
        }
        return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=180)

    most_loaded = 0
    done = threading.Event()

    def watch() -> None:  # loads under way count against the limit too: never two at once
        nonlocal most_loaded
        while not done.is_set():
            loaded = httpx.get(f"{server.base_url}/status", timeout=10).json()["loaded"]
            most_loaded = max(most_loaded, len(loaded))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(ask, range(24)))
        done.set()
        watcher.join()
        assert most_loaded == 1
        statuses = [answer.status_code for answer in answers]
        assert set(statuses) <= {200, 503}, [(a.status_code, a.text) for a in answers if a.status_code >= 400]
        assert statuses.count(200) >= len(names)  # every model was loaded and served in turn
        for answer in answers:
            if answer.status_code == 503:
                assert answer.headers["retry-after"] and answer.json()["error"]["message"]
            else:
                assert answer.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert server.proc.poll() is None
        assert ask(0).status_code == 200
    finally:
        done.set()
        server.stop()
