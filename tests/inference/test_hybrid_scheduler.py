"""The scheduler in-process on a tiny hybrid (`qwen35`): a context with few sequence ids (each holds a
recurrent state) makes requests wait for an id instead of failing, asks for more choices than it
holds are refused, and a checkpoint that cannot be restored falls back to decoding the whole prompt."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from pendra_inference.engine import EngineConfig, LlamaEngine
from pendra_inference.sampling import SamplingParams
from pendra_inference.scheduler import Scheduler
from pendra_inference.sequence import Completion, Result, Ticket
from pendra_inference.speculation import NgramDraft, Speculation
from pendra_shared.api_errors import InvalidRequest

from tests.inference.test_scheduler import make as make_scheduler
from tests.support.hybrids import write_qwen35


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaEngine]:
    path = write_qwen35(tmp_path_factory.mktemp("qwen35") / "tiny.gguf")
    engine = LlamaEngine(path, EngineConfig(512, 512, 512, 2, 0, False))
    yield engine
    engine.close()


def make(engine: LlamaEngine, **overrides: object) -> Scheduler:
    """test_scheduler's scheduler, with a hybrid's sequence ids and checkpoint budget."""
    hybrid: dict[str, object] = {"parallel": 8, "prefill_budget": 32, "n_seq_max": 16}
    return make_scheduler(engine, **{**hybrid, "checkpoint_budget_bytes": 8 << 20, **overrides})


def prompt(engine: LlamaEngine, user: str) -> list[int]:
    system = "You are terse. " * 20
    text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
    text += "<|im_start|>assistant\n"
    return engine.tokenize_prompt(text)


async def collect(ticket: Ticket) -> tuple[str, Result]:
    await ticket.admitted
    text = ""
    while True:
        item = await ticket.events.get()
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, Result):
            return text, item
        text += item.text


def completion(tokens: list[int], cache: bool = True) -> Completion:
    return Completion(tokens, 12, SamplingParams(temperature=0.0), (), 1, cache)


def test_requests_wait_for_a_sequence_id_and_more_choices_than_ids_are_refused(engine: LlamaEngine) -> None:
    scheduler = make(engine, n_seq_max=2)
    assert scheduler.n_seq_max == 2 and scheduler.kind == "hybrid"

    async def scenario() -> None:
        prompts = [prompt(engine, f"question {i}") for i in range(5)]
        alone = [(await collect(scheduler.submit(completion(p, cache=False))))[0] for p in prompts]
        together = await asyncio.gather(*(collect(scheduler.submit(completion(p))) for p in prompts))
        assert [text for text, _ in together] == alone
        with pytest.raises(InvalidRequest, match="n=3"):
            scheduler.submit(Completion(prompts[0], 4, SamplingParams(), (), 3))

    try:
        asyncio.run(scenario())
    finally:
        scheduler.close()


def test_a_checkpoint_that_cannot_be_restored_decodes_the_prompt_whole(
    engine: LlamaEngine, caplog: pytest.LogCaptureFixture
) -> None:
    scheduler = make(engine)

    async def scenario() -> None:
        first = prompt(engine, "the first question")
        await collect(scheduler.submit(completion(first)))
        assert len(scheduler.checkpoints) > 0
        for checkpoint in scheduler.checkpoints._by_tokens.values():  # corrupt every saved state
            checkpoint.data[:] = bytes(len(checkpoint.data))
        second = prompt(engine, "the second question")
        want = (await collect(scheduler.submit(completion(second, cache=False))))[0]
        text, result = await collect(scheduler.submit(completion(second)))
        assert text == want
        assert result.checkpoints_restored == 0 and result.cached_tokens == 0
        assert "restoring a checkpoint" in caplog.text

    try:
        asyncio.run(scenario())
    finally:
        scheduler.close()


def test_with_no_free_id_the_checkpoints_holder_is_taken_over(engine: LlamaEngine) -> None:
    """Two sequence ids: one runs a long answer, the other holds a finished conversation. A prompt
    that shares that conversation's prefix only up to a checkpoint takes the holder's id over."""
    scheduler = make(engine, n_seq_max=2)
    fresh = make(engine, prefix_cache=False)

    async def scenario() -> None:
        first, second = prompt(engine, "the first question"), prompt(engine, "the first question, again")
        want = (await collect(fresh.submit(completion(second))))[0]
        await collect(scheduler.submit(completion(first)))  # cached, with its checkpoints
        long = scheduler.submit(Completion(prompt(engine, "a long one"), 200, SamplingParams(), (), 1))
        await long.admitted  # holds the other id meanwhile
        text, result = await collect(scheduler.submit(completion(second)))
        assert text == want
        assert result.checkpoints_restored == 1 and result.cached_tokens > 0
        await collect(long)

    try:
        asyncio.run(scenario())
    finally:
        scheduler.close()
        fresh.close()


def test_speculation_rolls_a_hybrids_state_back(engine: LlamaEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rejected draft on a hybrid: llama.cpp's rollback snapshots (n_rs_seq) take the recurrent
    state back to the last kept token, so the greedy answer is the one without speculation. The
    drafts are the answer itself with every third token wrong (a random model repeats nothing an
    n-gram lookup could find), so each step keeps some drafts and rejects the rest."""
    tokens = prompt(engine, "Count: 1 2 3")
    plain = make(engine)
    try:
        want, _ = asyncio.run(run(plain, tokens))
        answer = next(t for t in plain._cached.values() if t[: len(tokens)] == tokens)[len(tokens) :]
    finally:
        plain.close()

    def draft(self: NgramDraft, held: list[int], pending: int, most: int) -> list[int]:
        done = len(held) + 1 - len(tokens)  # the pending token is answer[done - 1]
        guess = answer[done : done + most]
        return [t + 1 if (done + i) % 3 == 2 else t for i, t in enumerate(guess)]

    monkeypatch.setattr(NgramDraft, "draft", draft)
    fast = make(engine, speculative=Speculation(draft_tokens=4))
    try:
        assert fast.speculative is not None  # llama.cpp keeps snapshots for this architecture
        got, result = asyncio.run(run(fast, tokens))
    finally:
        fast.close()
    assert got == want
    assert 0 < result.accepted < result.drafted


async def run(scheduler: Scheduler, tokens: list[int]) -> tuple[str, Result]:
    return await collect(scheduler.submit(completion(tokens)))
