"""The host's top-k draw finds its candidates without sorting the vocabulary (`largest`, then the
few logits the bias and penalties move): the same k tokens, with the same adjusted logits, as
adjusting the whole row and partitioning it, on rows shaped like real models' (Gemma's 262k
vocabulary, flat and peaked, ties) with every sign of bias and penalty."""

from __future__ import annotations

import numpy as np
import pytest
from pendra_inference.sampling import Sampler, SamplingParams, largest

VOCAB = 262_144


def rows() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    flat = rng.standard_normal(VOCAB).astype(np.float32)
    peaked = flat * 8
    peaked[rng.integers(0, VOCAB, 5)] += 40
    ties = np.round(flat * 2).astype(np.float32)  # many logits equal at the boundary
    return [flat, peaked, ties, rng.standard_normal(5000).astype(np.float32)]


@pytest.mark.parametrize("k", [1, 20, 40, 300, 5000])
def test_largest_finds_the_k_best(k: int) -> None:
    for row in rows():
        k_ = min(k, len(row))
        got = np.sort(row[largest(row, k_)])
        assert len(set(largest(row, k_).tolist())) == k_
        np.testing.assert_array_equal(got, np.sort(row)[-k_:])


@pytest.mark.parametrize(
    ("presence", "frequency", "bias"),
    [
        (1.5, 0.0, ()),
        (0.0, 0.7, ()),
        (-2.0, 0.0, ()),
        (1.5, 0.3, ((5, 30.0), (9, -100.0), (17, float("-inf")))),
    ],
)
def test_the_best_after_bias_and_penalties_are_the_whole_row_s(
    presence: float, frequency: float, bias: tuple[tuple[int, float], ...]
) -> None:
    params = SamplingParams(
        temperature=0.7, top_k=20, presence_penalty=presence, frequency_penalty=frequency, logit_bias=bias
    )
    for row in rows()[:2]:
        sampler = Sampler(None, len(row), params)
        generated = np.argsort(row)[-60:]  # the best tokens were generated: the penalties bite
        for i, token in enumerate(generated.tolist()):
            sampler.counts[token] = 1 + i % 3
        adjusted = sampler._adjusted(row)
        ids, values = sampler._best(row, 20)
        want = np.sort(adjusted)[-20:]
        np.testing.assert_array_equal(np.sort(values), want)
        np.testing.assert_array_equal(values, adjusted[ids])
        assert list(ids) == sorted(ids)


def test_a_seeded_top_k_draw_is_repeatable_and_stays_in_the_top_k() -> None:
    row = rows()[0]
    best = set(np.argsort(row)[-20:].tolist())
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=11)
    draws = [[Sampler(None, VOCAB, params).sample(row, None) for _ in range(1)] for _ in range(3)]  # type: ignore[arg-type]
    assert draws[0] == draws[1] == draws[2]
    sampler = Sampler(None, VOCAB, params)
    picks = [sampler.sample(row, None) for _ in range(200)]  # type: ignore[arg-type]
    assert set(picks) <= best and len(set(picks)) > 3
