"""Sliding-window models (Gemma 3) reuse a prefix of a cached sequence longer than the window
through checkpoints of its last window: the scheduler in-process on a tiny random-weight `gemma3`
(a window of 32 positions on two of its four layers), written by the project's own writer.

llama.cpp reuses the sliding-window cells a sequence no longer sees, so a strict prefix of a
sequence as long as the window may have lost cells; sharing it by its cells alone then gives other
logits. Each scenario makes that happen (an eviction sends the next prompt into the cached
sequence's old cells) and asks, one request at a time, for greedy answers whose text must be the
very text a scheduler without a prefix cache gives, and whose logprobs (the top 5 of every token: a
wrong window changes them long before it changes the text) must be within `TOLERANCE` of its.

Not bit for bit: llama.cpp's CPU attention sums a sequence's cells in cell order, so a sequence
whose cells are not in position order (a shared prefix in cells above its own tokens', as after an
eviction) gets logits a few ulps off, with or without a checkpoint. F32 weights keep those ulps
small (about 3e-4 in a logprob here); Q8_0 weights quantize the activations, and an ulp then
sometimes moves a quantization step (0.03). Reusing a prefix without its window moves them by 0.35."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import openai
import pytest
from pendra_inference.engine import EngineConfig, LlamaEngine
from pendra_inference.gguf_gemma import GEMMA3_TINY, write_gemma3_gguf
from pendra_inference.model_memory import SWA, memory_shape
from pendra_inference.sampling import SamplingParams
from pendra_inference.scheduler import Scheduler, SchedulerConfig
from pendra_inference.sequence import Completion, Result, TokenLogprob
from pendra_shared.store import ModelStore

from tests.inference.conftest import CHAT

WEIGHTS = "f32"
TOLERANCE = 1e-2
WINDOW = GEMMA3_TINY.sliding_window
SYSTEM = [1] + [(17 * j) % 300 + 10 for j in range(79)]  # 80 tokens: longer than the window


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gemma3_gguf(tmp_path_factory.mktemp("gemma3") / "gemma3.gguf", weights=WEIGHTS)


@pytest.fixture(scope="module")
def engine(gguf: Path) -> Iterator[LlamaEngine]:
    engine = LlamaEngine(gguf, EngineConfig(256, 256, 256, 2, 0, False))
    yield engine
    engine.close()


def make(engine: LlamaEngine, **overrides: object) -> Scheduler:
    values: dict[str, object] = {
        "n_ctx": 256,
        "parallel": 2,  # 512 cells: a long prompt soon needs a cached sequence's cells
        "n_batch": 512,
        "n_ubatch": 512,
        "prefill_budget": 64,
        "max_queue": 16,
        "queue_timeout_s": 60.0,
        "n_threads": 2,
        "flash_attention": False,
        "checkpoint_budget_bytes": 1 << 20,
    }
    values.update(overrides)
    return Scheduler(engine.model, engine.vocab, SchedulerConfig(**values), "gemma3")  # type: ignore[arg-type]


def tokens(seed: int, length: int) -> list[int]:
    return [(31 * seed + 7 * j) % 300 + 10 for j in range(length)]


# The text and, for every token, its logprob and the top 5 alternatives'.
Answer = tuple[str, list[TokenLogprob]]


def run(
    scheduler: Scheduler, prompt: list[int], max_tokens: int = 16, **extra: object
) -> tuple[Answer, Result]:
    async def go() -> tuple[Answer, Result]:
        sampling = SamplingParams(temperature=0, top_logprobs=5)
        ticket = scheduler.submit(Completion(prompt, max_tokens, sampling, **extra))  # type: ignore[arg-type]
        await ticket.admitted
        text, logprobs = "", list[TokenLogprob]()
        while True:
            item = await ticket.events.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Result):
                return (text, logprobs), item
            text += item.text
            logprobs += item.logprobs or []

    return asyncio.run(go())


# The requests of one scenario, in order: a long prompt cached first (it is evicted), a first
# question after the system prompt (its sequence outgrows the window), a long prompt that takes the
# evicted cells and then the first question's old sliding-window cells, a second question after the
# same system prompt, and the first question with another ending.
FIRST = SYSTEM + tokens(1, 20)
REQUESTS = [
    [1, *tokens(9, 199)],
    FIRST,
    [1, *tokens(5, 299)],
    SYSTEM + tokens(2, 20),
    FIRST[:-6] + tokens(3, 6),
]
MARKS = (len(SYSTEM),)  # where the caller says a later request may diverge (the system prompt)


@pytest.fixture(scope="module")
def expected(engine: LlamaEngine) -> list[Answer]:
    """Every request's answer from a scheduler that shares nothing."""
    fresh = make(engine, prefix_cache=False)
    try:
        return [run(fresh, prompt)[0] for prompt in REQUESTS]
    finally:
        fresh.close()


def scenario(scheduler: Scheduler) -> list[tuple[Answer, Result]]:
    results = [run(scheduler, prompt, marks=MARKS) for prompt in REQUESTS[:3]]
    # The first question's sequence has lost sliding-window cells that the token after the system
    # prompt attends to (positions len(SYSTEM) - WINDOW + 1 on; llama.cpp keeps a sequence's
    # positions contiguous, so its lowest tells).
    (holder,) = (i for i, t in scheduler._cached.items() if t[: len(FIRST)] == FIRST)
    assert llama_cpp.llama_memory_seq_pos_min(scheduler.memory, holder) > len(SYSTEM) - WINDOW + 1
    return results + [run(scheduler, prompt, marks=MARKS) for prompt in REQUESTS[3:]]


def same(got: Answer, want: Answer) -> bool:
    """The same text and tokens, with every logprob (the chosen token's and the top 5, in order)
    within TOLERANCE."""
    pairs = list(zip(got[1], want[1], strict=True))
    return got[0] == want[0] and all(
        a.token == b.token
        and abs(a.logprob - b.logprob) <= TOLERANCE
        and all(abs(x[1] - y[1]) <= TOLERANCE for x, y in zip(a.top, b.top, strict=True))
        for a, b in pairs
    )


def test_a_prefix_of_a_sequence_longer_than_the_window_comes_from_a_checkpoint(
    gguf: Path, engine: LlamaEngine, expected: list[Answer]
) -> None:
    scheduler = make(engine)
    try:
        results = scenario(scheduler)
        stats = scheduler.stats()
    finally:
        scheduler.close()
    assert all(same(answer, want) for (answer, _), want in zip(results, expected, strict=True))
    assert len({text for text, _ in expected}) > 1  # the model does answer each prompt its own way
    first, second, other_ending = results[1][1], results[3][1], results[4][1]
    assert first.checkpoints_saved == 2  # after the system prompt, and 6 tokens before the end
    assert second.cached_tokens == len(SYSTEM) and second.checkpoints_restored == 1
    assert other_ending.cached_tokens == len(FIRST) - 6 and other_ending.checkpoints_restored == 1
    assert stats.memory_kind == SWA and stats.checkpoints_restored == 2
    # What a checkpoint holds: one window of the sliding-window layers' cells, as model_memory says.
    figure = memory_shape(gguf).swa_state_bytes
    assert figure <= stats.checkpoint_bytes / stats.checkpoints <= figure + 256


def test_without_checkpoints_such_a_prefix_is_decoded_again(
    engine: LlamaEngine, expected: list[Answer]
) -> None:
    scheduler = make(engine, checkpoint_budget_bytes=0)
    try:
        results = scenario(scheduler)
    finally:
        scheduler.close()
    assert all(same(answer, want) for (answer, _), want in zip(results, expected, strict=True))
    assert all(
        r.cached_tokens == 0 and r.checkpoints_saved == r.checkpoints_restored == 0 for _, r in results
    )


def test_the_registry_gives_a_sliding_window_model_a_checkpoint_budget(gguf: Path, tmp_path: Path) -> None:
    from pendra_inference.registry import ModelRegistry
    from pendra_shared.config import Settings

    store = ModelStore(tmp_path / "models")
    store.import_file(gguf, name="gemma3:tiny", purpose="chat")
    model = store.find("gemma3:tiny")
    assert model is not None
    shape = memory_shape(gguf)
    # Two sliding layers of 2 KV heads of 32, keys and values in F16, and each cell's position.
    assert shape.kind == SWA and shape.swa_state_bytes == WINDOW * (2 * 2 * 64 * 2 + 12)
    assert shape.state_bytes == 0
    settings = Settings(models_dir=tmp_path / "models", parallel=4, memory_budget_bytes=8 * 1024**3)
    default = ModelRegistry(settings, store).engine_config(model)
    zero = settings.model_copy(update={"checkpoint_budget_bytes": 0})
    none = ModelRegistry(zero, store).engine_config(model)
    assert default[0].sequences == none[0].sequences == 0  # llama.cpp's 256: no state per sequence
    assert default[0].checkpoint_bytes == 2 * 4 * shape.swa_state_bytes  # two per sequence
    assert none[0].checkpoint_bytes == 0
    assert default[1] - none[1] == default[0].checkpoint_bytes


def test_a_system_prompt_gemma_folds_into_the_first_turn_is_shared_between_conversations(
    client: openai.OpenAI,
) -> None:
    """Gemma 3's template writes the system prompt inside the first user turn, so the prompt has
    no message boundary after it; the chat service marks where it ends (rendered before a
    placeholder user message), the prefill checkpoints the window there, and another conversation
    with the same system prompt restores it instead of decoding the whole prompt again."""
    system = "You answer questions about the lighthouse museum and its lamps. " * 50  # past the window
    usages = []
    for i in range(3):
        r = client.chat.completions.create(
            model=CHAT,
            messages=[
                {"role": "system", "content": system},
                {"role": "user", "content": f"Lamp number {i}?"},
            ],
            max_tokens=4,
            temperature=0,
        )
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        usages.append((r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens or 0))
    (prompt, first), *others = usages
    assert prompt > 512 and first == 0  # longer than Gemma 3's 512-token window
    for prompt, cached in others:
        assert prompt - 20 < cached < prompt  # the system prompt: all but the user's question
