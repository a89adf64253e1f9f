"""The embedding batcher on real models: requests share decodes, within the token budget, and each
gets the vectors of its own inputs; cancellation, decode errors and close() reach only their
callers.

llama.cpp's arithmetic depends a little on what shares a decode (its CPU matmuls take rows in
groups, and flash attention, on for embedding models, sums differently): an input's vector in
another pack can differ by up to about 1e-4 (MiniLM) or 2e-2 (Gemma 3 270M Q4_K_M, cosine above
0.999). So the exact checks compare against `LlamaEngine.embed` making the very same packs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pendra_inference.embed_batcher import EmbedBatcher
from pendra_inference.engine import POOLING, EngineConfig, LlamaEngine
from pendra_shared.api_errors import Unavailable

MakeBatcher = Callable[[int], EmbedBatcher]


def load(path: Path, pooling: int | None, n_ctx: int) -> LlamaEngine:
    """An embedding engine as the registry makes one: the batch is the whole context."""
    return LlamaEngine(path, EngineConfig(n_ctx, n_ctx, n_ctx, None, 0, True, pooling))


@pytest.fixture(scope="module")
def gemma_engine(gemma_path: Path) -> Iterator[LlamaEngine]:
    engine = load(gemma_path, POOLING["mean"], 1024)
    yield engine
    engine.close()


@pytest.fixture
def batcher(gemma_engine: LlamaEngine) -> Iterator[MakeBatcher]:
    """Batchers over the Gemma engine (mean pooling), closed after the test. The engine itself may
    only be used while no batcher is open."""
    made: list[EmbedBatcher] = []

    def make(token_budget: int) -> EmbedBatcher:
        made.append(EmbedBatcher(gemma_engine, token_budget=token_budget, name="gemma-embed"))
        return made[-1]

    yield make
    for b in made:
        b.close()


def requests_of(engine: LlamaEngine, count: int, size: int) -> list[list[list[int]]]:
    """`count` requests of `size` real-text inputs, 16 or 32 tokens each."""
    text = " ".join(f"word{n}" for n in range(40))
    return [
        [engine.tokenize(f"request {r}, sentence {i}: {text}")[: 16 * (1 + (r + i) % 2)] for i in range(size)]
        for r in range(count)
    ]


def sized(length: int, start: int = 100) -> list[int]:
    """An input of exactly `length` (valid) tokens."""
    return [start + i for i in range(length)]


@pytest.mark.parametrize("model", ["gemma", "minilm"])
def test_concurrent_requests_share_decodes_and_get_their_own_vectors(
    model: str, request: pytest.FixtureRequest
) -> None:
    if model == "gemma":
        engine = request.getfixturevalue("gemma_engine")
    else:
        engine = load(request.getfixturevalue("minilm_path"), None, 512)
        request.addfinalizer(engine.close)
    budget = 256
    first = [sized(budget)]  # fills a decode alone; the others queue up meanwhile
    reqs = requests_of(engine, 8, 4)  # 768 tokens in all
    # Before the batcher owns the engine: each request alone, and the packs the batcher will make
    # (arrival order, whole inputs, at most `budget` tokens each).
    alone = [engine.embed(r) for r in reqs]
    engine.decode_calls = 0
    same_packs = engine.embed([x for r in reqs for x in r], token_budget=budget)
    packs = engine.decode_calls

    async def run() -> tuple[list[np.ndarray], dict[str, int]]:
        b = EmbedBatcher(engine, token_budget=budget, name=model)
        try:
            results = await asyncio.gather(b.embed(first), *(b.embed(r) for r in reqs))
            return results[1:], b.stats()
        finally:
            await asyncio.to_thread(b.close)

    vectors, stats = asyncio.run(run())
    assert packs < len(reqs) and stats["decodes"] == 1 + packs
    assert stats["inputs_embedded"] == 33 and stats["inputs_waiting"] == 0 and stats["requests_active"] == 0
    for i, (got, expected) in enumerate(zip(vectors, alone, strict=True)):
        assert got.shape == expected.shape and got.dtype == np.float32
        assert np.allclose(got, same_packs[4 * i : 4 * i + 4], atol=1e-6)
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert ((got * expected).sum(axis=1) > 0.998).all()


def test_token_budget_and_arrival_order_set_the_decodes(batcher: MakeBatcher) -> None:
    b = batcher(100)

    async def run() -> None:
        # One request of ten 30-token inputs: three per 100-token decode, so four decodes.
        await b.embed([sized(30) for _ in range(10)])
        assert b.stats()["decodes"] == 4
        # While a first request fills one decode, two more queue up; their inputs are then packed
        # in arrival order across both: 60 + 20 + 20 tokens, then 50 + 30. Each request alone
        # would need two decodes.
        first, a, b_ = await asyncio.gather(
            b.embed([sized(100)]), b.embed([sized(60), sized(20)]), b.embed([sized(20), sized(50), sized(30)])
        )
        assert b.stats()["decodes"] == 4 + 3
        assert (len(first), len(a), len(b_)) == (1, 2, 3)

    asyncio.run(run())


def test_an_input_longer_than_the_budget_is_decoded_alone(
    batcher: MakeBatcher, gemma_engine: LlamaEngine
) -> None:
    inputs = [sized(5), sized(40, 200), sized(5, 300)]
    expected = gemma_engine.embed(inputs, token_budget=16)
    b = batcher(16)
    got = asyncio.run(b.embed(inputs))
    assert b.stats()["decodes"] == 3
    assert np.allclose(got, expected, atol=1e-6)


def test_a_cancelled_caller_does_not_break_the_others(
    batcher: MakeBatcher, gemma_engine: LlamaEngine
) -> None:
    kept = requests_of(gemma_engine, 1, 3)[0]
    expected = gemma_engine.embed(kept, token_budget=32)
    b = batcher(32)  # a few inputs per decode, so the big request spans many decodes

    async def run() -> None:
        doomed = asyncio.create_task(b.embed([sized(30) for _ in range(40)]))
        while b.stats()["decodes"] == 0:
            await asyncio.sleep(0.01)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        got = await b.embed(kept)
        assert np.allclose(got, expected, atol=1e-6)
        stats = b.stats()
        assert stats["inputs_waiting"] == 0 and stats["requests_active"] == 0
        assert stats["inputs_embedded"] < 40 + len(kept)  # the cancelled request's rest was dropped

    asyncio.run(run())


def test_a_failed_decode_fails_only_its_callers(batcher: MakeBatcher, gemma_engine: LlamaEngine) -> None:
    good = requests_of(gemma_engine, 1, 2)[0]
    expected = gemma_engine.embed(good, token_budget=8)
    b = batcher(8)  # one short input per decode: the bad request's decode holds nothing else

    async def run() -> None:
        bad = [sized(4), [5, gemma_engine.n_vocab + 10, 6]]  # llama.cpp refuses the id: decode fails
        results = await asyncio.gather(b.embed(bad), b.embed(good), return_exceptions=True)
        assert isinstance(results[0], RuntimeError) and "llama_decode" in str(results[0])
        assert isinstance(results[1], np.ndarray) and np.allclose(results[1], expected, atol=1e-6)
        # The thread lives on.
        assert np.allclose(await b.embed(good), expected, atol=1e-6)
        assert b.stats()["requests_active"] == 0 and b.stats()["inputs_waiting"] == 0

    asyncio.run(run())


def test_close_fails_pending_callers_and_later_ones(batcher: MakeBatcher) -> None:
    b = batcher(32)

    async def run() -> None:
        pending = [asyncio.create_task(b.embed([sized(30) for _ in range(20)])) for _ in range(3)]
        while b.stats()["decodes"] == 0:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(b.close)
        for task in pending:
            with pytest.raises(Unavailable, match="unloaded"):
                await task
        with pytest.raises(Unavailable):
            await b.embed([sized(3)])
        assert b.stats()["inputs_waiting"] == 0 and b.stats()["requests_active"] == 0

    asyncio.run(run())
    assert not b._thread.is_alive()


def test_inputs_the_context_cannot_hold_are_refused(batcher: MakeBatcher) -> None:
    b = batcher(64)
    with pytest.raises(ValueError, match="1 to 1024 tokens"):
        asyncio.run(b.embed([sized(3), sized(1025)]))
    with pytest.raises(ValueError):
        asyncio.run(b.embed([[]]))
    assert asyncio.run(b.embed([])).shape == (0, 640)
    assert b.stats()["decodes"] == 0
