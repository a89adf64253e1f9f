"""F-4: a native crash inside the inference service is contained. The process dies of SIGSEGV (as
a fault inside llama.cpp would kill it); the gateway keeps answering, 503 with Retry-After for
inference routes and `inference: unreachable` on its /ready; compose restarts the service
(`restart: unless-stopped`, done here by hand), which is not ready until its preloaded model is
loaded again, and then serves through the gateway as before."""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from pendra_inference.gguf_writer import PROBE, write_llama_gguf

from tests.support.stack import ComposeStack, load_compose
from tests.topology.conftest import Stack

HELLO = [{"role": "user", "content": "Hi"}]


def chat(stack: ComposeStack, model: str) -> httpx.Response:
    body = {"model": model, "messages": HELLO, "max_tokens": 2}
    return httpx.post(f"{stack.api_url}/v1/chat/completions", json=body, timeout=60)


def test_a_native_crash_of_inference_is_a_503_until_it_is_back_and_ready(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    assert load_compose("compose.yaml")["services"]["inference"]["restart"] == "unless-stopped"
    stack = make_stack("compose")
    assert isinstance(stack, ComposeStack)
    shutil.copyfile(write_llama_gguf(tmp_path / "tiny.gguf", PROBE, name="tiny"), stack.store / "tiny.gguf")
    assert chat(stack, "tiny").status_code == 200

    inference = stack.services["inference"]
    inference.proc.send_signal(signal.SIGSEGV)
    assert inference.proc.wait(30) == -signal.SIGSEGV

    down = chat(stack, "tiny")
    assert down.status_code == 503 and down.headers["retry-after"] == "5"
    assert down.json()["error"]["code"] == "service_unavailable"
    gateway_ready = httpx.get(f"{stack.api_url}/ready", timeout=10)
    assert gateway_ready.json()["inference"] == "unreachable"
    assert httpx.get(f"{stack.api_url}/health", timeout=10).status_code == 200

    stack.extra_env["PENDRA_PRELOAD"] = "tiny"
    restarted = stack.start_service("inference", wait=False)
    deadline = time.monotonic() + 120
    while True:
        assert restarted.alive(), restarted.log()
        assert time.monotonic() < deadline, restarted.log()
        try:
            if httpx.get(f"{stack.inference_url}/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        status = chat(stack, "tiny").status_code  # not back yet: a clean 503 (200 only if it just came back)
        assert status == 503 or (status == 200 and "preloaded tiny" in restarted.log())
        time.sleep(0.2)
    assert "preloaded tiny" in restarted.log()  # ready only once the model is loaded again
    assert httpx.get(f"{stack.api_url}/ready", timeout=10).json()["inference"] == "ok"
    assert chat(stack, "tiny").status_code == 200
