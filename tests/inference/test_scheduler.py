"""The scheduler in-process, on a small llama GGUF whose llama.cpp kernels are batch-invariant
(Q8_0 weights: a sequence's logits are bit-identical alone and in any batch), so that every
difference in output is the scheduler's own: per-sequence samplers and seeds, chunked prefill,
prefix sharing, n > 1, cancellation, the queue's limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pendra_inference.engine import EngineConfig, LlamaEngine
from pendra_inference.gguf_writer import write_llama_gguf
from pendra_inference.sampling import SamplingParams
from pendra_inference.scheduler import Scheduler, SchedulerConfig
from pendra_inference.sequence import Completion, Delta, Result, Ticket
from pendra_inference.speculation import Speculation
from pendra_shared.api_errors import InvalidRequest, Overloaded, Unavailable

from tests.inference.conftest import TINY_SHAPE
from tests.support.hybrids import write_qwen35


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaEngine]:
    path = write_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", TINY_SHAPE, name="tiny")
    engine = LlamaEngine(path, EngineConfig(512, 512, 512, 2, 0, False))
    yield engine
    engine.close()


def make(engine: LlamaEngine, **overrides: object) -> Scheduler:
    values: dict[str, object] = {
        "n_ctx": 512,
        "parallel": 16,
        "n_batch": 512,
        "n_ubatch": 512,
        "prefill_budget": 16,  # small: prompts span several steps beside generating sequences
        "max_queue": 64,
        "queue_timeout_s": 60.0,
        "n_threads": 2,
        "flash_attention": False,  # what PENDRA_FLASH_ATTENTION=auto gives on a CPU
    }
    values.update(overrides)
    return Scheduler(engine.model, engine.vocab, SchedulerConfig(**values), "tiny")  # type: ignore[arg-type]


def prompt(i: int, length: int = 20) -> list[int]:
    return [1] + [(300 + 7 * i + j) % 1900 + 50 for j in range(length)]


Outcome = tuple[list[str], list[str | None], Result, list[Delta]]


async def collect(ticket: Ticket) -> Outcome:
    await ticket.admitted
    n = ticket.completion.n
    texts, finishes, deltas = [""] * n, [None] * n, []
    while True:
        item = await ticket.events.get()
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, Result):
            return texts, finishes, item, deltas
        deltas.append(item)
        texts[item.index] += item.text
        finishes[item.index] = item.finish_reason or finishes[item.index]


async def complete(
    scheduler: Scheduler, tokens: list[int], max_tokens: int = 24, n: int = 1, **sampling: Any
) -> Outcome:
    return await collect(scheduler.submit(Completion(tokens, max_tokens, SamplingParams(**sampling), (), n)))


def test_same_text_alone_and_among_fifteen_others(engine: LlamaEngine) -> None:
    scheduler = make(engine)

    async def scenario() -> None:
        seeded = await complete(scheduler, prompt(99, 40), temperature=1.0, seed=7)
        greedy = await complete(scheduler, prompt(98, 30), temperature=0)
        others = [
            complete(scheduler, prompt(i, 10 + 5 * i), temperature=0.9, top_k=50, seed=i) for i in range(14)
        ]
        crowd = await asyncio.gather(
            *others,
            complete(scheduler, prompt(99, 40), temperature=1.0, seed=7),
            complete(scheduler, prompt(98, 30), temperature=0),
        )
        assert crowd[-2][0] == seeded[0] and crowd[-1][0] == greedy[0]
        assert len({c[0][0] for c in crowd[:14]}) > 1
        for texts, finishes, result, _ in crowd:
            assert result.completion_tokens == [24] and finishes == ["length"] and texts[0]

    try:
        asyncio.run(scenario())
        assert scheduler.stats().steps > 24  # prefill chunks and decode shared steps
    finally:
        scheduler.close()


def test_prefix_sharing_keeps_the_text_and_counts_cached_tokens(engine: LlamaEngine) -> None:
    scheduler = make(engine)

    async def scenario() -> None:
        system = prompt(5, 120)
        first = await complete(scheduler, system + [60, 61, 62], temperature=1.0, seed=3)
        assert first[2].cached_tokens == 0
        again = await complete(scheduler, system + [60, 61, 62], temperature=1.0, seed=3)
        assert again[2].cached_tokens == len(system) + 2  # all but the last prompt token
        assert again[0] == first[0]
        # A running sequence shares its prefix too: two clients with one system prompt at once.
        a, b = await asyncio.gather(
            complete(scheduler, system + [70, 71], max_tokens=40, temperature=0),
            complete(scheduler, system + [80, 81], max_tokens=40, temperature=0),
        )
        assert a[2].cached_tokens >= len(system) and b[2].cached_tokens >= len(system)
        no_cache = make(engine, prefix_cache=False)
        try:
            cold = await complete(no_cache, system + [80, 81], max_tokens=40, temperature=0)
        finally:
            no_cache.close()
        assert cold[2].cached_tokens == 0 and cold[0] == b[0]

    try:
        asyncio.run(scenario())
        assert scheduler.stats().prefix_hit_tokens > 3 * 120
    finally:
        scheduler.close()


def test_n_choices_fork_the_prompt(engine: LlamaEngine) -> None:
    scheduler = make(engine)

    async def scenario() -> None:
        single = await complete(scheduler, prompt(1), temperature=1.0, seed=42)
        texts, finishes, result, _ = await complete(scheduler, prompt(1), n=3, temperature=1.0, seed=42)
        assert texts[0] == single[0][0]  # choice 0 is what the same seed gives alone
        assert len(set(texts)) == 3 and finishes == ["length"] * 3
        assert result.completion_tokens == [24, 24, 24]
        greedy = await complete(scheduler, prompt(2), n=2, temperature=0)
        assert greedy[0][0] == greedy[0][1]

    try:
        asyncio.run(scenario())
    finally:
        scheduler.close()


def test_logprobs_are_sorted_and_greedy_picks_the_top(engine: LlamaEngine) -> None:
    scheduler = make(engine)
    try:
        _, _, _, deltas = asyncio.run(
            complete(scheduler, prompt(3), max_tokens=8, temperature=0, top_logprobs=4)
        )
    finally:
        scheduler.close()
    entries = [e for d in deltas for e in (d.logprobs or [])]
    assert len(entries) == 8
    for entry in entries:
        values = [lp for _, lp, _ in entry.top]
        assert len(values) == 4 and values == sorted(values, reverse=True)
        assert entry.logprob == pytest.approx(values[0]) and entry.logprob <= 0
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_a_cancelled_request_leaves_within_a_step(engine: LlamaEngine) -> None:
    scheduler = make(engine)

    async def scenario() -> None:
        ticket = scheduler.submit(Completion(prompt(4), 400, SamplingParams(temperature=1.0)))
        await ticket.admitted
        await ticket.events.get()
        assert scheduler.stats().running == 1
        steps = scheduler.stats().steps
        ticket.cancel()
        deadline = time.monotonic() + 5
        while scheduler.stats().running:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        assert scheduler.stats().steps - steps <= 2
        result = None
        while not isinstance(result, Result):
            result = await ticket.events.get()
        assert 0 < result.completion_tokens[0] < 400

    try:
        asyncio.run(scenario())
    finally:
        scheduler.close()


def test_queue_limit_and_timeout(engine: LlamaEngine) -> None:
    # One sequence of 512 tokens: a request for 480 tokens holds the whole cache.
    scheduler = make(engine, parallel=1, max_queue=1, queue_timeout_s=0.05)

    async def scenario() -> None:
        long = scheduler.submit(Completion(prompt(6), 480, SamplingParams(temperature=1.0)))
        await long.admitted
        waiting = scheduler.submit(Completion(prompt(7), 8))
        with pytest.raises(Overloaded, match="PENDRA_MAX_QUEUE"):
            scheduler.submit(Completion(prompt(8), 8))
        with pytest.raises(Overloaded, match="PENDRA_QUEUE_TIMEOUT_S"):
            await waiting.admitted
        texts, _, result, _ = await collect(long)
        assert result.completion_tokens == [480] or texts[0]

    try:
        asyncio.run(scenario())
    finally:
        scheduler.close()


def test_a_bad_grammar_fails_only_its_request_and_close_fails_the_rest(engine: LlamaEngine) -> None:
    scheduler = make(engine)

    async def scenario() -> None:
        bad = scheduler.submit(Completion(prompt(9), 8, SamplingParams(grammar="root ::= (")))
        good = scheduler.submit(Completion(prompt(10), 8, SamplingParams(temperature=0)))
        with pytest.raises(InvalidRequest):
            await bad.admitted
        assert (await collect(good))[2].completion_tokens == [8]
        pending = scheduler.submit(Completion(prompt(11), 400, SamplingParams(temperature=1.0)))
        await pending.admitted
        await asyncio.to_thread(scheduler.close)
        with pytest.raises(Unavailable, match="unloaded"):
            await collect(pending)

    asyncio.run(scenario())


def test_the_scheduler_refuses_what_can_never_fit(engine: LlamaEngine, tmp_path: Path) -> None:
    scheduler = make(engine, parallel=1)

    async def scenario() -> None:
        with pytest.raises(Unavailable, match="KV cells"):
            scheduler.submit(Completion(prompt(1), 500, n=2))

    try:
        asyncio.run(scenario())
    finally:
        scheduler.close()


def test_sampling_in_the_graph_gives_the_host_paths_text(engine: LlamaEngine) -> None:
    """Greedy and seeded requests, every sampler parameter set: llama.cpp's graph picks the tokens
    the host picks from its own row of logits through the same chain and random stream (a request
    with logprobs samples on the host), and greedy ones what a model sampling on the host gives.
    (top-k is left out of the seeded cases: llama.cpp's graph keeps the k best in another order
    than its host sampler, so the same draw may land on another of them;
    test_the_graph_takes_each_parameter covers it.)"""
    cases: list[dict[str, Any]] = [
        {"temperature": 0},
        {"temperature": 0, "top_k": 20, "presence_penalty": 1.5, "logit_bias": ((60, 5.0), (61, -100.0))},
        {"temperature": 0.8, "seed": 11},
        {"temperature": 0.7, "top_p": 0.8, "min_p": 0.05, "presence_penalty": 1.5, "seed": 12},
        {"temperature": 1.2, "frequency_penalty": 0.8, "seed": 13},
        {"temperature": 1.0, "min_p": 0.1, "logit_bias": ((70, 3.0),), "seed": 14},
    ]

    async def run(scheduler: Scheduler, **extra: Any) -> list[str]:
        return [
            (await complete(scheduler, prompt(i, 12), max_tokens=32, **c, **extra))[0][0]
            for i, c in enumerate(cases)
        ]

    # (gpu: top-p and min-p without top-k in the graph too, where a CPU leaves them to the host)
    # (each scheduler fresh: a cached prefix's cells change the logits in their last bits)
    graph, logprobs = make(engine, gpu=True), make(engine, gpu=True)
    host, cpu = make(engine, backend_sampling=False), make(engine)
    try:
        in_graph = asyncio.run(run(graph))
        assert graph.stats().graph_sampled == 32 * len(cases) and graph.stats().host_sampled == 0
        assert asyncio.run(run(logprobs, top_logprobs=0)) == in_graph
        assert logprobs.stats().host_sampled == 32 * len(cases)
        assert asyncio.run(run(cpu)) == in_graph
        assert cpu.stats().host_sampled == 2 * 32  # the two cases with top-p or min-p and no top-k
        greedy = [i for i, c in enumerate(cases) if not c["temperature"]]
        on_host = asyncio.run(run(host))
        assert host.stats().graph_sampled == 0
    finally:
        for scheduler in (graph, logprobs, host, cpu):
            scheduler.close()
    assert [on_host[i] for i in greedy] == [in_graph[i] for i in greedy]
    assert len(set(in_graph)) == len(cases)


def test_the_graph_takes_each_parameter(engine: LlamaEngine) -> None:
    """top_k 1 is greedy at any temperature; a penalty changes what a seed gives; a banned token
    never comes, even where greedy picks it over and over."""
    scheduler = make(engine)

    async def scenario() -> None:
        greedy = await complete(scheduler, prompt(3), max_tokens=32, temperature=0)
        for seed in (1, 2):
            hot = await complete(scheduler, prompt(3), max_tokens=32, temperature=1.5, top_k=1, seed=seed)
            assert hot[0] == greedy[0]
        plain = await complete(scheduler, prompt(4), max_tokens=32, temperature=0.9, seed=5)
        penalized = await complete(
            scheduler, prompt(4), max_tokens=32, temperature=0.9, seed=5, presence_penalty=2
        )
        assert plain[0] != penalized[0]
        # The token greedy generates most often, banned: greedy and a draw never yield it.
        tokens = generated_tokens(scheduler, prompt(3))
        banned = max(set(tokens), key=tokens.count)
        for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 9}):
            await complete(scheduler, prompt(3), max_tokens=32, logit_bias=((banned, -100.0),), **sampling)
            assert banned not in generated_tokens(scheduler, prompt(3))

    try:
        asyncio.run(scenario())
        assert scheduler.stats().host_sampled == 0
    finally:
        scheduler.close()


def generated_tokens(scheduler: Scheduler, tokens: list[int]) -> list[int]:
    """What the last finished sequence for `tokens` generated: its cells stay cached, with their
    tokens, until another request needs them."""
    held = [t for t in scheduler._cached.values() if t[: len(tokens)] == tokens]
    return held[-1][len(tokens) :]


def test_cached_prompts_give_way_to_running_ones(engine: LlamaEngine) -> None:
    """An idle server keeps every finished prompt for later prefixes; once a request runs, the
    cache keeps at most one n_ctx or the running cells' worth of them (each cached cell costs every
    running sequence's attention in a unified cache), the most recently used last out."""
    scheduler = make(engine, n_ctx=64)

    async def scenario() -> None:
        prompts = [complete(scheduler, prompt(i, 40), max_tokens=8, temperature=0) for i in range(6)]
        first = await asyncio.gather(*prompts)
        assert scheduler.stats().cached_sequences == 6  # 6 × 47 cells, idle: all kept
        assert scheduler.stats().cache_trimmed == 0
        # The most recently used is still there.
        again = await complete(scheduler, prompt(5, 40), max_tokens=8, temperature=0)
        assert again[2].cached_tokens == 40 and again[0] == first[5][0]
        seen: list[tuple[int, int]] = []
        ticket = scheduler.submit(Completion(prompt(20, 40), 20, SamplingParams(temperature=0), (), 1))
        await ticket.admitted
        while not isinstance(item := await ticket.events.get(), Result):
            assert not isinstance(item, BaseException)
            stats = scheduler.stats()
            if item.finish_reason is None:  # (its own sequence is cached once it ends)
                seen.append((stats.cached_sequences, stats.kv_cells_used))
        assert seen and max(n for n, _ in seen) <= 1  # 5 older prompts went as it started
        assert max(used for _, used in seen) <= 64 + 41 + 20  # one n_ctx cached, the running one
        assert scheduler.stats().cache_trimmed >= 5
        lru = await complete(scheduler, prompt(0, 40), max_tokens=8, temperature=0)
        assert lru[2].cached_tokens == 1 and lru[0] == first[0][0]  # decoded again but its BOS; same text

    try:
        asyncio.run(scenario())
    finally:
        scheduler.close()


def test_speculation_gives_the_same_text_in_fewer_steps(engine: LlamaEngine) -> None:
    """N-gram drafts: greedy text (and a seeded draw's) equals the text without speculation, alone
    and batched, with a grammar and logprobs too; a prompt the answer repeats is accepted in part,
    so the answer takes fewer steps than tokens."""
    looped = prompt(7, 12) * 4  # the tiny model's greedy answers run in loops too
    cases: list[tuple[list[int], dict[str, Any]]] = [
        (looped, {"temperature": 0}),
        (prompt(8, 30), {"temperature": 0}),
        (prompt(9, 20) * 3, {"temperature": 0.9, "seed": 4}),
        (looped, {"temperature": 0, "top_logprobs": 2}),
        (looped, {"temperature": 0, "grammar": 'root ::= ("w1" | "w2" | "w3" | "w4" | "w5")+'}),
    ]

    async def run(scheduler: Scheduler, batched: bool) -> list[Outcome]:
        calls = [complete(scheduler, tokens, max_tokens=48, **sampling) for tokens, sampling in cases]
        if batched:
            return list(await asyncio.gather(*calls))
        return [await call for call in calls]

    plain, fast = make(engine), make(engine, speculative=Speculation(draft_tokens=6))
    try:
        expected = asyncio.run(run(plain, False))
        alone = asyncio.run(run(fast, False))
        steps = fast.stats().steps
        crowd = asyncio.run(run(fast, True))
    finally:
        plain.close()
        fast.close()
    for want, got in zip(expected, alone, strict=True):
        assert got[0] == want[0] and got[2].completion_tokens == want[2].completion_tokens
    assert [c[0] for c in crowd] == [e[0] for e in expected]
    # logprobs arrive one per token, speculated or not
    assert [lp.token for d in alone[3][3] for lp in d.logprobs or []] == [
        lp.token for d in expected[3][3] for lp in d.logprobs or []
    ]
    drafted, accepted = sum(r[2].drafted for r in alone), sum(r[2].accepted for r in alone)
    assert drafted > 0 and 0 < accepted <= drafted
    generated = sum(r[2].completion_tokens[0] for r in alone)
    assert steps < generated  # decode steps saved by accepted drafts (prompts take a step each)


def drafting(engine: LlamaEngine, draft: Path, **overrides: object) -> Scheduler:
    values: dict[str, object] = {
        "n_ctx": 512,
        "parallel": 16,
        "n_batch": 512,
        "n_ubatch": 512,
        "prefill_budget": 16,
        "max_queue": 64,
        "queue_timeout_s": 60.0,
        "n_threads": 2,
        "flash_attention": False,
        "speculative": Speculation(kind="draft", model="draft", draft_tokens=4),
    }
    values.update(overrides)
    config = SchedulerConfig(**values)  # type: ignore[arg-type]
    return Scheduler(engine.model, engine.vocab, config, "tiny", draft=draft)


def test_a_draft_model_gives_the_same_text_in_fewer_steps(engine: LlamaEngine, tmp_path: Path) -> None:
    """Drafts from a second model of the same vocabulary, batched over the sequences: the text is
    the one without speculation (greedy, seeded, with logprobs; alone and batched). With the
    model itself as its draft, its greedy drafts are all accepted; another random model's seldom
    are, and cost no text."""
    cases: list[tuple[list[int], dict[str, Any]]] = [
        (prompt(8, 30), {"temperature": 0}),
        (prompt(9, 20), {"temperature": 0.9, "seed": 4}),
        (prompt(10, 25), {"temperature": 0, "top_logprobs": 2}),
        (prompt(11, 35), {"temperature": 0}),
    ]

    async def run(scheduler: Scheduler, batched: bool) -> list[Outcome]:
        calls = [complete(scheduler, tokens, max_tokens=40, **sampling) for tokens, sampling in cases]
        if batched:
            return list(await asyncio.gather(*calls))
        return [await call for call in calls]

    other = write_llama_gguf(tmp_path / "other.gguf", TINY_SHAPE, name="other", seed=5)
    plain = make(engine)
    try:
        expected = asyncio.run(run(plain, False))
    finally:
        plain.close()
    texts = [e[0] for e in expected]
    for draft, greedy_accepts in ((engine.path, True), (other, False)):
        fast = drafting(engine, draft)
        try:
            assert fast.draft_model is not None
            alone = asyncio.run(run(fast, False))
            steps = fast.stats().steps
            crowd = asyncio.run(run(fast, True))
            assert not fast.draft_model.held  # each finished sequence's draft cells went
        finally:
            fast.close()
        assert [a[0] for a in alone] == texts and [c[0] for c in crowd] == texts
        assert [lp.token for d in alone[2][3] for lp in d.logprobs or []] == [
            lp.token for d in expected[2][3] for lp in d.logprobs or []
        ]
        drafted, accepted = sum(r[2].drafted for r in alone), sum(r[2].accepted for r in alone)
        assert drafted > 0
        generated = sum(r[2].completion_tokens[0] for r in alone)
        if greedy_accepts:
            # every greedy request's drafts are its own picks; the seeded one's only where it draws the top
            greedy = [alone[i][2] for i in (0, 2, 3)]
            assert all(r.accepted == r.drafted > 0 for r in greedy)
            assert steps < generated * 0.5
        else:
            assert accepted < drafted


def test_a_draft_model_that_cannot_draft_is_refused(
    engine: LlamaEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another vocabulary, or a hybrid draft (its recurrent state could not drop a rejected
    draft): the model serves, without speculation, and the log says why."""
    wide = write_llama_gguf(tmp_path / "wide.gguf", replace(TINY_SHAPE, n_vocab=2048), name="wide")
    hybrid = write_qwen35(tmp_path / "hybrid.gguf")
    for draft, why in (
        (wide, "the draft model has 2048 tokens, the model 2000"),
        (hybrid, "hybrid draft model"),
    ):
        caplog.clear()
        scheduler = drafting(engine, draft)
        try:
            assert scheduler.draft_model is None and scheduler.speculative is None
            outcome = asyncio.run(complete(scheduler, prompt(3, 20), temperature=0))
            assert outcome[2].drafted == 0 and outcome[2].completion_tokens == [24]
        finally:
            scheduler.close()
        assert why in caplog.text and "no speculation" in caplog.text
