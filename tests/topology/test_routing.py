"""The api routing between three inference processes (PENDRA_INFERENCE_URL listing them, as
compose.replicas.yaml does), on loopback with two real models: each request goes where its model
is loaded, a conversation stays where its prefix is cached, a replica that stops is skipped within
a second with no request lost, and one that comes back is used again."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from pendra_api.routing import Router
from pendra_inference.gguf_writer import write_llama_gguf
from pendra_shared.store import ModelStore

from tests.inference.conftest import TINY_SHAPE
from tests.support.engines import RedisServer
from tests.support.replicas import Process, Replicas, wait_ready
from tests.support.server import free_port

MODELS = ("tiny:a", "tiny:b")
PARALLEL = 6  # each model's sequences on a replica: more of its requests at once go to a second one


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Replicas]:
    workdir = tmp_path_factory.mktemp("replicas")
    store = ModelStore(workdir / "models")
    for name in MODELS:
        path = write_llama_gguf(workdir / f"{name.replace(':', '-')}.gguf", TINY_SHAPE, name=name)
        store.import_file(path, name=name, purpose="chat")
    redis_server.flush()
    # One thread each, as bench_routing runs them: three processes of two spinning threads on a
    # two-core machine slowed decoding many times over.
    env = {"PENDRA_N_CTX": "1024", "PENDRA_PARALLEL": str(PARALLEL), "PENDRA_N_THREADS": "1"}
    stack = Replicas(workdir, store.root, redis_server, inference_env=env).start()
    try:
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()


@pytest.fixture(autouse=True)
def logs_on_failure(request: pytest.FixtureRequest, replicas: Replicas) -> Iterator[None]:
    """The module's processes outlive each test: a failing test prints their logs itself."""
    yield
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(replicas.logs())


@pytest.fixture(scope="module")
def client(replicas: Replicas) -> Iterator[openai.OpenAI]:
    assert replicas.api is not None
    with openai.OpenAI(base_url=f"{replicas.api.url}/v1", api_key="-", max_retries=0, timeout=120) as c:
        yield c


def served(replicas: Replicas) -> list[dict[str, int]]:
    """Per inference process: the requests each model finished there."""
    out = []
    for process in replicas.inference:
        counts: dict[str, int] = {}
        out.append(counts)
        if not process.alive():
            continue
        text = httpx.get(f"{process.url}/metrics", timeout=10).text
        for model, value in re.findall(
            r'^pendra_requests_total\{[^}]*model_name="([^"]+)"[^}]*\} (\S+)$', text, re.M
        ):
            counts[model] = counts.get(model, 0) + int(float(value))
    return out


def loaded(replicas: Replicas) -> list[set[str]]:
    return [
        {m["name"] for m in httpx.get(f"{p.url}/status", timeout=10).json()["loaded"]}
        for p in replicas.inference
    ]


def api_metric(replicas: Replicas, name: str, **labels: str) -> float:
    assert replicas.api is not None
    text = httpx.get(f"{replicas.api.url}/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}\{{{want}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def ask(client: openai.OpenAI, model: str, messages: list[dict[str, str]]) -> tuple[str, int]:
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    details = r.usage.prompt_tokens_details if r.usage else None
    return r.choices[0].message.content or "", (details.cached_tokens or 0) if details else 0


def delta(before: list[dict[str, int]], after: list[dict[str, int]], model: str) -> list[int]:
    return [a.get(model, 0) - b.get(model, 0) for b, a in zip(before, after, strict=True)]


def test_a_mix_of_two_models_loads_each_on_one_replica(replicas: Replicas, client: openai.OpenAI) -> None:
    before = served(replicas)
    mix = [(MODELS[i % 2], f"Question {i} about the sea?") for i in range(12)]
    ask(client, MODELS[0], [{"role": "user", "content": "warm up"}])  # the first load, alone
    ask(client, MODELS[1], [{"role": "user", "content": "warm up"}])
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda m: ask(client, m[0], [{"role": "user", "content": m[1]}]), mix))
    after = served(replicas)
    for model in MODELS:
        per_replica = delta(before, after, model)
        assert sum(per_replica) == 7
        assert sorted(per_replica) == [0, 0, 7], f"{model} spread over replicas: {per_replica}"
    holders = loaded(replicas)
    for model in MODELS:
        assert sum(model in held for held in holders) == 1
    assert api_metric(replicas, "pendra_api_routed_requests_total", reason="model") >= 12


def test_a_model_with_twice_its_sequences_in_flight_gets_a_second_replica(
    replicas: Replicas, client: openai.OpenAI
) -> None:
    model = MODELS[1]
    (holder,) = [i for i, held in enumerate(loaded(replicas)) if model in held]
    before = served(replicas)
    clients = 3 * PARALLEL

    together = threading.Barrier(clients)  # all sent at once: each answer outlasts the burst

    def long_answer(i: int) -> str:
        together.wait(timeout=60)
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Busy {i}"}],
            max_tokens=900,
            temperature=0,
            logit_bias={"0": -100, "1": -100, "2": -100},  # no end: each request runs its 900 tokens
        )
        return r.choices[0].message.content or ""

    with ThreadPoolExecutor(clients) as pool:
        assert all(pool.map(long_answer, range(clients)))
    per_replica = delta(before, served(replicas), model)
    assert sum(per_replica) == clients
    # The holder filled its sequences and queued more (the api spills once the holder reports two
    # waiting or has twice its sequences in flight, whichever comes first)...
    assert per_replica[holder] > PARALLEL, per_replica
    assert sum(n > 0 for n in per_replica) >= 2, per_replica  # the rest went to a second one


def test_a_conversation_stays_where_its_prefix_is_cached(replicas: Replicas, client: openai.OpenAI) -> None:
    model = MODELS[0]
    for process in replicas.inference:  # the model on every replica: only the prefix decides
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        assert httpx.post(f"{process.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    time.sleep(1.5)  # the api has polled: every replica holds the model
    conversations = [
        [{"role": "user", "content": f"Conversation {i}: tell me about the number {i}."}] for i in range(6)
    ]
    homes = []
    for messages in conversations:
        before = served(replicas)
        answer, _ = ask(client, model, messages)
        (home,) = [i for i, n in enumerate(delta(before, served(replicas), model)) if n]
        homes.append(home)
        messages.append({"role": "assistant", "content": answer})
    for turn in range(2):
        for messages, home in zip(conversations, homes, strict=True):
            messages.append({"role": "user", "content": f"And then, turn {turn}?"})
            before = served(replicas)
            answer, cached = ask(client, model, messages)
            assert delta(before, served(replicas), model)[home] == 1, "the conversation moved"
            assert cached > 0  # its earlier turns came from that replica's prefix cache
            messages.append({"role": "assistant", "content": answer})
    assert len(set(homes)) > 1  # new conversations spread over the idle replicas
    assert api_metric(replicas, "pendra_api_routed_requests_total", reason="prefix") >= 12


def test_a_stopped_replica_is_skipped_at_once_and_used_again_when_back(
    replicas: Replicas, client: openai.OpenAI
) -> None:
    model = MODELS[1]
    holder = next(i for i, held in enumerate(loaded(replicas)) if model in held)
    replicas.inference[holder].stop(signal.SIGKILL)  # no goodbye: connections refused from now on
    stopped = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(
                lambda i: ask(client, model, [{"role": "user", "content": f"Still there {i}?"}]), range(8)
            )
        )
    assert all(text for text, _ in answers)  # every request answered by another replica
    while api_metric(replicas, "pendra_api_inference_endpoints", state="down") < 1:
        assert time.monotonic() - stopped < 1.0 + 0.5, "the stopped replica was not seen down within a second"
        time.sleep(0.05)

    replicas.start_inference(holder)
    deadline = time.monotonic() + 5
    while api_metric(replicas, "pendra_api_inference_endpoints", state="up") < 3:
        assert time.monotonic() < deadline, "the replica that came back was not seen up"
        time.sleep(0.05)
    others = [i for i in range(len(replicas.inference)) if i != holder]
    for i in others:  # only the one that came back is left: the api must use it again
        replicas.inference[i].stop()
    try:
        text, _ = ask(client, model, [{"role": "user", "content": "Anyone back?"}])
        assert text
        assert served(replicas)[holder].get(model, 0) >= 1
    finally:
        for i in others:
            replicas.start_inference(i, wait=False)
        for i in others:
            wait_ready(replicas.inference[i])


def test_a_headless_service_s_pods_are_followed_as_they_come_and_go(
    replicas: Replicas, tmp_path: Path
) -> None:
    """PENDRA_INFERENCE_RESOLVE: one name whose addresses are the ready pods (cluster DNS for a
    headless Service). Here two real inference processes on one port of two loopback addresses,
    and the name's answer changed the way cluster DNS changes it as pods come and go."""
    port = free_port()
    second = Process("inference-b", port, tmp_path / "b.log")
    replicas.spawn(second, "inference", {"PENDRA_HOST": "127.0.0.2", "PENDRA_KEEP_ALIVE": "-1"})
    first = Process("inference-a", port, tmp_path / "a.log")
    replicas.spawn(first, "inference", {"PENDRA_KEEP_ALIVE": "-1"})
    pods = ["127.0.0.1"]  # what cluster DNS answers now
    dns_down = False

    async def dns(host: str, at: int) -> list[str]:
        assert (host, at) == ("pendra-inference", port)
        if dns_down:
            raise OSError("Temporary failure in name resolution")
        return list(pods)

    async def polled(router: Router, want: dict[str, bool]) -> None:
        for _ in range(50):  # (a busy machine may answer a first /status late)
            await router.poll()
            if {e.url: e.up for e in router.endpoints.values()} == want:
                return
            await asyncio.sleep(0.2)
        assert {e.url: e.up for e in router.endpoints.values()} == want

    async def scenario() -> None:
        nonlocal dns_down
        router = Router([f"http://pendra-inference:{port}"], resolve=True, resolver=dns)
        try:
            await polled(router, {f"http://127.0.0.1:{port}": True})
            pods.append("127.0.0.2")  # a pod became ready
            both = {f"http://127.0.0.1:{port}": True, f"http://127.0.0.2:{port}": True}
            await polled(router, both)
            dns_down = True  # cluster DNS hiccups: the pods it gave last are kept
            await polled(router, both)
            dns_down = False
            body = json.dumps({"model": MODELS[0], "messages": [{"role": "user", "content": "hi"}]}).encode()
            assert {router.route(body).endpoints[0].url for _ in range(40)} == set(router.endpoints)
            pods.remove("127.0.0.1")  # a pod went away
            await router.poll()
            assert list(router.endpoints) == [f"http://127.0.0.2:{port}"]
        finally:
            await router.close()

    try:
        wait_ready(first)
        deadline = time.monotonic() + 120  # (wait_ready asks 127.0.0.1, the first one's address)
        while True:
            assert second.alive() and time.monotonic() < deadline, second.log()
            try:
                if httpx.get(f"http://127.0.0.2:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        asyncio.run(scenario())
    finally:
        first.stop()
        second.stop()
