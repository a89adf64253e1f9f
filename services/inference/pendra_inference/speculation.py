"""Speculative decoding by n-gram lookup: drafts from the sequence's own tokens, no second model.

A sequence whose last few tokens occurred before in its prompt or its answer (code being edited,
a document quoted back, a JSON value repeated) is likely to go on as it went on then. Each step,
the scheduler asks a sequence's `NgramDraft` for up to `draft_tokens` tokens that followed the
most recent earlier occurrence of its last `ngram_max` (down to `ngram_min`) tokens, decodes them
in the same batch as the pending token with a row of logits each, and keeps the drafted tokens the
model's own sampler picks as well, up to the first it does not: that token is the next pending
one, and the cells of the drafts after it are removed from the cache. The answer is the one the
model gives without speculation (a drafted token is kept only where the sampler, with its random
stream at the same point, picks it), in fewer steps when drafts are accepted.

Chosen per model: the sidecar's `options.speculative` (or its catalogue entry's `speculative`), as
`{"kind": "ngram", "draft_tokens": 4, "ngram_min": 2, "ngram_max": 4, "max_sequences": 8}`; off by
default. Drafts are made only while at most `max_sequences` sequences generate: past that the batch
is full of real tokens and checking drafts would only take from them.
"""

from __future__ import annotations

from typing import Any

from pendra_shared.catalogue import Speculative
from pydantic import ValidationError

# The catalogue's and the sidecar's `speculative` (kind, draft_tokens, ngram_min, ngram_max).
Speculation = Speculative


def speculation_of(value: Any) -> Speculation | None:
    """A sidecar option or catalogue field: None, false or "off" for none, "ngram", or a mapping.
    Raises ValueError, saying what is wrong."""
    if value is None or value is False or value in ("off", "none", ""):
        return None
    try:
        return Speculative.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"speculative{'.' + where if where else ''}: {first['msg']}") from None


# The most recent tokens a sequence's drafts come from: a long prompt is indexed only this far back,
# once (about 12 ms of Python for three n-gram sizes).
WINDOW = 4096


class NgramDraft:
    """One sequence's index of where each n-gram of its tokens was last followed by a token."""

    def __init__(self, spec: Speculation) -> None:
        self.spec = spec
        self.sizes = range(spec.ngram_max, spec.ngram_min - 1, -1)
        self.follows: dict[tuple[int, ...], int] = {}  # n-gram -> the index of the token after it
        self.indexed = 0  # n-grams ending before this index are in `follows`

    def draft(self, tokens: list[int], pending: int, most: int) -> list[int]:
        """Up to `most` tokens that followed the latest earlier occurrence of the longest suffix of
        the sequence (its `tokens`, then its `pending` one) seen before; [] when none was. Only
        the tokens added since the last call are indexed, within the last WINDOW."""
        if most <= 0:
            return []
        self._index(tokens)
        end = len(tokens)
        for n in self.sizes:
            if n - 1 > end:
                continue
            at = self.follows.get((*tokens[end - n + 1 :], pending) if n > 1 else (pending,))
            if at is not None:
                found = tokens[at : at + most]
                return found + [pending] if len(found) < most and at + len(found) == end else found
        return []

    def _index(self, tokens: list[int]) -> None:
        # Every n-gram with a token after it: ending at index i, followed by index i + 1 (the
        # pending token's for the last one).
        follows = self.follows
        for i in range(max(self.indexed, len(tokens) - WINDOW), len(tokens)):
            for n in self.sizes:
                if n <= i + 1:
                    follows[tuple(tokens[i + 1 - n : i + 1])] = i + 1
        self.indexed = max(self.indexed, len(tokens))
