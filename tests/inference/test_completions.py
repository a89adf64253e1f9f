"""`/v1/completions` through the real `openai` client on a real `pendra serve` with Gemma: a raw
prompt (no chat template), streamed and not, lists of prompts, echo, logprobs, and clear refusals;
bodies validated against OpenAI's own schema."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.inference.conftest import CHAT
from tests.support.openai_schemas import validate
from tests.support.server import ServerProcess

PROMPT = "The capital of France is"


def test_a_completion_continues_the_prompt_as_it_is(client: openai.OpenAI, server: ServerProcess) -> None:
    answer = client.completions.create(model=CHAT, prompt=PROMPT, max_tokens=8, temperature=0)
    assert answer.object == "text_completion" and len(answer.choices) == 1
    choice = answer.choices[0]
    assert choice.text and choice.finish_reason == "length" and answer.usage is not None
    assert answer.usage.completion_tokens == 8
    raw = httpx.post(
        f"{server.base_url}/v1/completions",
        json={"model": CHAT, "prompt": PROMPT, "max_tokens": 8, "temperature": 0},
        timeout=120,
    ).json()
    validate(raw, "CreateCompletionResponse")
    assert raw["choices"][0]["text"] == choice.text  # greedy: the same continuation
    # No chat template: the prompt's tokens are the prompt's own (plus BOS).
    tokens = httpx.post(
        f"{server.base_url}/tokenize", json={"model": CHAT, "content": PROMPT}, timeout=60
    ).json()
    assert answer.usage.prompt_tokens == len(tokens["tokens"]) + 1


def test_streamed_pieces_add_up_to_the_answer(client: openai.OpenAI, server: ServerProcess) -> None:
    whole = client.completions.create(model=CHAT, prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
    chunks = list(
        client.completions.create(
            model=CHAT,
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len([t for t in texts if t]) >= 2 and "".join(texts) == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    # OpenAI's schema has chunks in the response's shape, finish_reason a string: the last one is;
    # the ones before carry null there, as OpenAI's own streams do.
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finished) == 1
    validate(finished[0].model_dump(exclude_unset=True), "CreateCompletionResponse")
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)


def test_lists_of_prompts_echo_and_logprobs(client: openai.OpenAI) -> None:
    answer = client.completions.create(
        model=CHAT, prompt=[PROMPT, "Two plus two is"], max_tokens=4, n=2, temperature=0, echo=True
    )
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert answer.choices[0].text.startswith(PROMPT) and answer.choices[2].text.startswith("Two plus two is")
    scored = client.completions.create(model=CHAT, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    logprobs = scored.choices[0].logprobs
    assert logprobs is not None and len(logprobs.tokens or []) == 3
    assert all(lp <= 0 for lp in logprobs.token_logprobs or [])
    assert all(len(top) == 2 for top in logprobs.top_logprobs or [])
    assert "".join(logprobs.tokens or []) == scored.choices[0].text
    streamed = list(
        client.completions.create(model=CHAT, prompt=[PROMPT, "Two plus two is"], max_tokens=3, stream=True)
    )
    assert {c.choices[0].index for c in streamed if c.choices} == {0, 1}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"suffix": " and that is all."}, "suffix"),
        ({"echo": True, "logprobs": 1}, "logprobs"),
        ({"prompt": [[1, 2, 3]]}, "prompt"),
        ({"best_of": 3}, "best_of"),
    ],
)
def test_what_the_engine_cannot_do_is_refused_clearly(
    server: ServerProcess, extra: dict[str, object], param: str
) -> None:
    body = {"model": CHAT, "prompt": PROMPT, "max_tokens": 4, **extra}
    answer = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == param
