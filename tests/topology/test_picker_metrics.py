"""The endpoint picker's reading of the inference service's `/metrics` on compose's processes:
a model installed through the api and a chat streamed through it show up the way the Gateway API
Inference Extension's picker reads them (tests/support/picker.py; the same contract on `pendra
serve` is tests/inference/test_picker_contract.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from tests.support import api
from tests.support.picker import loaded_in, picker_scrape
from tests.support.stack import ComposeStack
from tests.topology.conftest import Stack

MODEL = "gemma3:270m"
NO_END = {"1": -100, "106": -100}  # Gemma's <eos> and <end_of_turn>


def test_the_picker_reads_an_installed_model_and_a_running_stream(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack("compose")
    assert isinstance(stack, ComposeStack)
    inference = stack.inference_url
    idle = picker_scrape(inference)
    assert (idle["waiting"], idle["running"], idle["kv_usage"]) == (0, 0, 0)
    assert loaded_in(idle["lora"], "running_lora_adapters") == set()
    job = api.install(stack.api_url, MODEL)
    assert api.wait_job(stack.api_url, job["id"])["state"] == "done"
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 200,
        "logit_bias": NO_END,
        "stream": True,
    }
    with httpx.stream("POST", f"{stack.api_url}/v1/chat/completions", json=body, timeout=120) as r:
        events = (line for line in r.iter_lines() if line.startswith("data: "))
        for _ in range(3):
            next(events)
        busy = picker_scrape(inference)
    assert busy["running"] == 1 and busy["waiting"] == 0
    assert 0 < busy["kv_usage"] <= 1
    assert loaded_in(busy["lora"], "running_lora_adapters") == {MODEL}
    deadline = time.monotonic() + 30  # the client left: its request ends
    while picker_scrape(inference)["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert picker_scrape(inference)["running"] == 0
