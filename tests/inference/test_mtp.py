"""Speculative decoding with the model's own multi-token-prediction block, on a tiny random-weight
`qwen35` that has one, as Qwen3.5/3.6 ship (the project's writer, the real Qwen tokenizer and
template): the block's context follows every decode of the model with the model's hidden states,
drafts for many sequences at once, and the answer is the one without speculation, alone and
batched, greedy and seeded. Random weights predict little, so these tests hold the text and the
hand-off, not the acceptance rate."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pendra_inference.engine import EngineConfig, LlamaEngine
from pendra_inference.gguf_hybrid import QWEN35_TINY
from pendra_inference.model_memory import memory_shape
from pendra_inference.mtp import MtpDraft
from pendra_inference.registry import ModelRegistry
from pendra_inference.sampling import SamplingParams
from pendra_inference.scheduler import Scheduler
from pendra_inference.sequence import Completion
from pendra_inference.speculation import Speculation
from pendra_shared.config import load_settings
from pendra_shared.store import ModelStore

from tests.inference.test_hybrid_scheduler import collect, make, prompt
from tests.support.hybrids import agreeing_mtp_weights, write_qwen35
from tests.support.server import ServerProcess, set_options, start_server

QWEN35_MTP_TINY = dataclasses.replace(QWEN35_TINY, nextn_layers=1)
MTP = Speculation(kind="mtp", draft_tokens=3)
QUESTIONS = ["the sea", "a mountain", "the old harbour", "twelve apples and a pear"]


@pytest.fixture(scope="module")
def mtp_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_qwen35(tmp_path_factory.mktemp("qwen35-mtp") / "mtp.gguf", shape=QWEN35_MTP_TINY, seed=3)


@pytest.fixture(scope="module")
def engine(mtp_file: Path) -> Iterator[LlamaEngine]:
    engine = LlamaEngine(mtp_file, EngineConfig(512, 512, 512, 2, 0, False, load_mtp=True))
    yield engine
    engine.close()


def completion(tokens: list[int], sampling: SamplingParams, max_tokens: int = 24) -> Completion:
    return Completion(tokens, max_tokens, sampling, (), 1, True)


async def one(
    scheduler: Scheduler, tokens: list[int], sampling: SamplingParams, max_tokens: int = 24
) -> tuple[str, Any]:
    return await collect(scheduler.submit(completion(tokens, sampling, max_tokens)))


async def answers(
    scheduler: Scheduler, prompts: list[list[int]], sampling: SamplingParams, max_tokens: int = 24
) -> list[tuple[str, Any]]:
    return list(await asyncio.gather(*(one(scheduler, p, sampling, max_tokens) for p in prompts)))


@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_k=20, seed=11)],
    ids=["greedy", "seeded"],
)
def test_the_mtp_block_drafts_and_the_answer_stays(engine: LlamaEngine, sampling: SamplingParams) -> None:
    prompts = [prompt(engine, q) for q in QUESTIONS]
    # Both draw on the host, as a CPU server does (on this hybrid, a seeded draw in llama.cpp's
    # graph is not the host chain's; a speculating model samples on the host).
    plain = make(engine, backend_sampling=False)
    try:
        want = [asyncio.run(one(plain, p, sampling))[0] for p in prompts]
    finally:
        plain.close()
    fast = make(engine, speculative=MTP, mtp_loaded=True, backend_sampling=False)
    try:
        assert fast.mtp is not None and fast.speculative is not None
        alone = [asyncio.run(one(fast, p, sampling)) for p in prompts]
        together = asyncio.run(answers(fast, prompts, sampling))
        # Again: the prompts come from the cache now, the block's cells with them.
        again = asyncio.run(answers(fast, prompts, sampling))
    finally:
        fast.close()
    assert [text for text, _ in alone] == want
    assert [text for text, _ in together] == want
    assert [text for text, _ in again] == want
    results = [r for _, r in (*alone, *together, *again)]
    assert all(r.drafted > 0 for r in results)  # every request was drafted for, alone and batched
    assert all(0 <= r.accepted <= r.drafted for r in results)
    assert any(r.cached_tokens > 0 for _, r in again)


def test_drafts_the_model_agrees_with_are_kept_and_save_steps(tmp_path: Path) -> None:
    path = write_qwen35(
        tmp_path / "agreeing.gguf", shape=QWEN35_MTP_TINY, fixed=agreeing_mtp_weights(QWEN35_MTP_TINY)
    )
    engine = LlamaEngine(path, EngineConfig(512, 512, 512, 2, 0, False, load_mtp=True))
    greedy = SamplingParams(temperature=0.0)
    prompts = [prompt(engine, q) for q in QUESTIONS]
    try:
        plain = make(engine)
        try:
            want = asyncio.run(answers(plain, prompts, greedy))
            steps = plain.stats().steps
        finally:
            plain.close()
        fast = make(engine, speculative=MTP, mtp_loaded=True)
        try:
            got = asyncio.run(answers(fast, prompts, greedy))
            fast_steps = fast.stats().steps
        finally:
            fast.close()
    finally:
        engine.close()
    assert [t for t, _ in got] == [t for t, _ in want]
    drafted, accepted = sum(r.drafted for _, r in got), sum(r.accepted for _, r in got)
    assert drafted > 0 and accepted == drafted
    assert fast_steps < steps * 0.5  # four tokens a step (the pending one and three drafts)


def test_few_sequence_ids_and_a_small_cache_keep_the_blocks_cache_in_step(
    engine: LlamaEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """Two sequence ids and one request's worth of cells: conversations take over each other's ids,
    restore checkpoints and evict cached prefixes, and the block's cache follows every move without
    ever starting again (it would say so) and without changing an answer."""
    greedy = SamplingParams(temperature=0.0)
    prompts = [prompt(engine, q) for q in (*QUESTIONS, QUESTIONS[0], QUESTIONS[2], "the sea again")]
    small = {"n_seq_max": 2, "parallel": 1}
    plain = make(engine, **small)
    try:
        want = [asyncio.run(one(plain, p, greedy, 40))[0] for p in prompts]
    finally:
        plain.close()
    fast = make(engine, speculative=MTP, mtp_loaded=True, **small)
    try:
        alone = [asyncio.run(one(fast, p, greedy, 40)) for p in prompts]
        paired = [
            asyncio.run(answers(fast, prompts[i : i + 2], greedy, 40)) for i in range(0, len(prompts), 2)
        ]
    finally:
        fast.close()
    assert [t for t, _ in alone] == want
    assert [t for pair in paired for t, _ in pair] == want
    assert all(r.drafted > 0 for _, r in alone)
    assert any(r.cached_tokens > 0 for _, r in alone)
    assert "MTP context failed" not in caplog.text


def test_the_drafts_come_from_the_models_hidden_states(engine: LlamaEngine) -> None:
    """The block's drafts depend on the hidden state the model hands over: with the state zeroed,
    the same pending tokens draft otherwise. And its cells follow the model's sequence."""
    scheduler = make(engine, speculative=MTP, mtp_loaded=True)
    try:
        mtp = scheduler.mtp
        assert mtp is not None
        tokens = prompt(engine, "the state")
        asyncio.run(one(scheduler, tokens, SamplingParams(temperature=0.0), 8))
        ((seq_id, held),) = [(s, t) for s, t in scheduler._cached.items() if t[: len(tokens)] == tokens]
        base, cells = mtp.held[seq_id]
        assert base == 0 and cells[: len(tokens)] == tokens  # the block's cache holds the prompt too
        # The next token after the answer, drafted from the hidden state the last decode gave,
        # then from zeros.
        pending = held[-1]
        real = mtp.draft([(seq_id, held, pending, 3)]).get(seq_id, [])
        width = mtp.hidden[seq_id][1].shape[1]
        zeroed = _draft_with_state(mtp, seq_id, held, pending, np.zeros(width, dtype=np.float32))
        assert len(real) == 3 and zeroed != real
    finally:
        scheduler.close()


def _draft_with_state(
    mtp: MtpDraft, seq_id: int, tokens: list[int], pending: int, state: np.ndarray
) -> list[int]:
    start = len(tokens) - 1
    mtp.hidden[seq_id] = (start, state[None, :])
    return mtp.draft([(seq_id, tokens, pending, 3)]).get(seq_id, [])


def test_a_model_without_an_mtp_block_serves_without_speculation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_qwen35(tmp_path / "plain.gguf")
    engine = LlamaEngine(path, EngineConfig(512, 512, 512, 2, 0, False, load_mtp=True))
    try:
        scheduler = make(engine, speculative=MTP, mtp_loaded=True)
        try:
            assert scheduler.speculative is None and scheduler.mtp is None
            text, result = asyncio.run(
                one(scheduler, prompt(engine, "hello"), SamplingParams(temperature=0.0), 6)
            )
            assert text and result.drafted == 0
        finally:
            scheduler.close()
    finally:
        engine.close()
    assert "no multi-token-prediction block: no speculation" in caplog.text


def test_a_model_loaded_without_its_block_does_not_run_it(
    engine: LlamaEngine, caplog: pytest.LogCaptureFixture
) -> None:
    scheduler = make(engine, speculative=MTP)  # (mtp_loaded not said: the registry says it)
    try:
        assert scheduler.speculative is None and scheduler.mtp is None
    finally:
        scheduler.close()
    assert "loaded without its MTP block" in caplog.text


def test_the_mtp_blocks_cache_counts_in_the_models_memory(mtp_file: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    store.import_file(mtp_file, name="qwen:plain", purpose="chat")
    speculating = store.import_file(mtp_file, name="qwen:mtp", purpose="chat")
    set_options(speculating.path, {"speculative": {"kind": "mtp"}})
    registry = ModelRegistry(load_settings(models_dir=store.root, n_ctx=512, parallel=2), store)
    plain_config, plain = registry.engine_config(store.find("qwen:plain"))
    config, with_mtp = registry.engine_config(store.find("qwen:mtp"))
    assert config.load_mtp and not plain_config.load_mtp
    shape = memory_shape(mtp_file)
    # One attention block: 2 KV heads of 64, keys and values in F16.
    assert shape.mtp_kv_bytes_per_token == 2 * 64 * 2 * 2
    assert with_mtp - plain >= shape.mtp_kv_bytes_per_token * 512 * 2


@pytest.fixture(scope="module")
def server(mtp_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("mtp-server")
    store = ModelStore(base / "models")
    store.import_file(mtp_file, name="qwen:plain", purpose="chat")
    set_options(store.import_file(mtp_file, name="qwen:mtp", purpose="chat").path, {"speculative": "mtp"})
    env = {
        "PENDRA_MODELS_DIR": str(store.root),
        "PENDRA_N_CTX": "512",
        "PENDRA_KEEP_ALIVE": "-1",
        "HOME": str(base),
    }
    proc = start_server(env, base / "serve.log")
    yield proc
    proc.stop()


def test_a_sidecar_turns_mtp_on_through_the_server(server: ServerProcess) -> None:
    def chat(model: str) -> str:
        answer = httpx.post(
            f"{server.base_url}/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": "Tell me about the sea."}],
                "max_tokens": 30,
                "temperature": 0,
                "chat_template_kwargs": {"enable_thinking": False},
            },
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        return str(answer.json()["choices"][0]["message"]["content"])

    assert chat("qwen:mtp") == chat("qwen:plain")
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    match = re.search(
        r'^pendra_speculative_draft_tokens_total\{model_name="qwen:mtp"\} ([0-9.e+]+)$', text, re.M
    )
    assert match and float(match.group(1)) > 0
    assert "multi-token-prediction" not in server.log()  # the block loaded and drafted
