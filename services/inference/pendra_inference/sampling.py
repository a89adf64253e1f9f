"""How a token is chosen: one sampler per sequence, and the OpenAI logprobs.

Every sequence gets its own sampler (logit bias, penalties, top-k, top-p, min-p, temperature and
a seeded random stream, or greedy), so penalties, grammar state and the random draws of one
request never depend on what runs beside it. The scheduler's thread calls `Sampler.sample` with
the sequence's row of logits; nothing here is thread-safe, and nothing needs to be.

Sampling costs little even on a 262k-entry vocabulary (Gemma's): llama.cpp's own chain builds and
scans a candidate array of the whole vocabulary per token (4.7 ms here for a plain temperature
draw, 21 ms with top-p, which sorts it), so
- logit bias and OpenAI's presence and frequency penalties touch only their few logits, in numpy;
- greedy is an `argmax`, and a temperature draw is numpy over the logits (`_draw`, about 1 ms),
  sorting only the part top-p can reach;
- only a grammar (JSON schema, tools) uses llama.cpp's chain, on one reusable candidate array
  (`Candidates`), and the grammar is checked against the token the chain picked first and
  applied to the whole vocabulary only when it rejects that token, as llama-server does.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

BLOCK = 512  # weights per block in a whole-vocabulary draw
SAMPLE_STRIDE = 64  # `largest` looks at every 64th logit for its threshold
TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    grammar: str | None = None  # GBNF, root rule "root"
    top_logprobs: int | None = None  # None: no logprobs; 0..20: logprobs with that many alternatives

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that needs llama.cpp's samplers: an argmax is enough."""
        return self.greedy and self.grammar is None


class Candidates:
    """One reusable llama_token_data array over the whole vocabulary."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self.data = np.zeros(n_vocab, dtype=TOKEN_DATA)
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.array = llama_cpp.llama_token_data_array()
        self.one = np.zeros(1, dtype=TOKEN_DATA)

    def fill(self, logits: np.ndarray) -> Any:
        self.data["id"] = self.ids
        self.data["logit"] = logits
        self.data["p"] = 0.0
        return self._point(self.data)

    def single(self, token: int, logit: float) -> Any:
        self.one[0] = (token, logit, 0.0)
        return self._point(self.one)

    def _point(self, data: np.ndarray) -> Any:
        self.array.data = data.ctypes.data_as(llama_cpp.llama_token_data_p)  # type: ignore[assignment]
        self.array.size = len(data)
        self.array.selected = -1
        self.array.sorted = False
        return ctypes.byref(self.array)

    def selected(self) -> int:
        return int(self.array.data[self.array.selected].id)

    def first_logit(self) -> float:
        return float(self.array.data[0].logit)


class Sampler:
    """The chain of one sequence. `sample` picks a token from a row of logits and accepts it; a
    chain that runs in llama.cpp's graph (`in_graph`, set by the scheduler once llama.cpp took it)
    picked the token already, and `accept` only records it."""

    def __init__(
        self,
        vocab: Any,
        n_vocab: int,
        params: SamplingParams,
        seed_offset: int = 0,
        *,
        history: int = 0,
        graph: bool = False,
        sort_in_graph: bool = True,
        offload: bool = True,
    ) -> None:
        """`history`: the most tokens the sequence generates (what the penalties look back on);
        `graph`: the model samples in llama.cpp's graph: build llama.cpp's chain, to run there
        (see `graph_capable`) or, for a seeded draw, on the host with the graph's random stream;
        `sort_in_graph`: top-p and min-p without top-k may run there too (they sort or scan the
        whole vocabulary: cheap on a GPU, on a CPU three times the cost of the host's draw);
        `offload`: this request may run in the graph (not n > 1, not a speculating model's)."""
        self.sort_in_graph = sort_in_graph
        self.params = params
        self.n_vocab = n_vocab
        self.bias_ids = np.array([t for t, _ in params.logit_bias], dtype=np.int64)
        self.bias_values = np.array([v for _, v in params.logit_bias], dtype=np.float32)
        self.counts: dict[int, int] = {}  # generated tokens, for the penalties
        seed = params.seed + seed_offset if params.seed is not None else None
        self.rng = np.random.default_rng(seed)
        self.chain: Any = None
        self.grammar: Any = None
        self.in_graph = False
        if params.grammar is None:
            # Greedy and unseeded draws run in numpy (see _draw), and so do seeded ones where the
            # model does not sample in the graph. Where it does, llama.cpp's chain, in the graph or
            # on the host (logprobs, n > 1), whose random stream is the same in both: a seed gives
            # one text whichever side drew it. (On the host it costs twice numpy's draw.)
            if graph and ((offload and self.graph_capable) or (seed is not None and not params.greedy)):
                self.chain = _chain(params, seed, n_vocab, max(history, 1), bias=True)
            return
        # With a grammar: llama.cpp's samplers, whose grammar state follows the accepted tokens.
        self.chain = _chain(params, seed, n_vocab, max(history, 1), bias=False)
        self.grammar = llama_cpp.llama_sampler_init_grammar(vocab, params.grammar.encode(), b"root")
        if not self.grammar:
            self.close()
            raise ValueError("the grammar did not compile")

    @property
    def graph_capable(self) -> bool:
        """llama.cpp can run this request's whole chain in its graph, and should: no grammar, no
        logprobs (which need the whole row of logits on the host), and no sort of the whole
        vocabulary where that costs more in the graph than on the host."""
        params = self.params
        if params.grammar is not None or params.top_logprobs is not None:
            return False
        whole = not params.greedy and params.top_k == 0 and (params.top_p < 1.0 or params.min_p > 0.0)
        return self.sort_in_graph or not whole

    def accept(self, token: int) -> None:
        """Record a token the graph picked: the penalties' counts and the random stream move on."""
        llama_cpp.llama_sampler_accept(self.chain, token)

    def sample(self, logits: np.ndarray, candidates: Candidates) -> int:
        if self.chain is not None and self.grammar is None:
            return self._choose(logits, candidates)  # the chain applies bias and penalties itself
        params = self.params
        if self.chain is None and not params.greedy and 0 < params.top_k < len(logits):
            # Only the best k can be drawn: found in the row as it is, with the few logits the
            # bias and penalties move, and adjusted there (no copy, no partition of the row).
            token = self._draw_among(*self._best(logits, params.top_k))
        else:
            token = self._choose(self._adjusted(logits), candidates)
        if params.presence_penalty or params.frequency_penalty:
            self.counts[token] = self.counts.get(token, 0) + 1
        return token

    def _adjusted(self, logits: np.ndarray) -> np.ndarray:
        """Logit bias, then OpenAI's penalties: each generated token's logit is lowered by
        presence_penalty once and by frequency_penalty for every time it was generated."""
        params = self.params
        penalize = (params.presence_penalty or params.frequency_penalty) and self.counts
        if not len(self.bias_ids) and not penalize:
            return logits
        logits = logits.copy()
        if len(self.bias_ids):
            logits[self.bias_ids] += self.bias_values
        if penalize:
            ids = np.fromiter(self.counts, dtype=np.int64, count=len(self.counts))
            counts = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
            logits[ids] -= params.presence_penalty + params.frequency_penalty * counts
        return logits

    def _moved(self) -> tuple[np.ndarray, np.ndarray]:
        """The tokens whose logits the bias and penalties move, ascending, and by how much."""
        params = self.params
        ids, values = [self.bias_ids], [self.bias_values]
        if (params.presence_penalty or params.frequency_penalty) and self.counts:
            n = len(self.counts)
            counts = np.fromiter(self.counts.values(), dtype=np.float32, count=n)
            ids.append(np.fromiter(self.counts, dtype=np.int64, count=n))
            values.append(-(params.presence_penalty + params.frequency_penalty * counts))
        every = np.concatenate(ids)
        moved, where = np.unique(every, return_inverse=True)
        moves = np.zeros(len(moved), dtype=np.float32)
        np.add.at(moves, where, np.concatenate(values).astype(np.float32))
        return moved, moves

    def _best(self, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best tokens after bias and penalties, ascending by id, and their adjusted logits:
        among the k + m best of the row as it is and the m moved tokens (a token outside both has
        k unmoved tokens above it), found without sorting the vocabulary."""
        moved, moves = self._moved()
        ids = np.union1d(largest(logits, min(k + len(moved), len(logits))), moved)
        values = logits[ids].astype(np.float32)
        if len(moved):
            at = np.searchsorted(ids, moved)
            values[at] += moves
        if len(ids) > k:
            keep = np.sort(np.argpartition(values, -k)[-k:])
            ids, values = ids[keep], values[keep]
        return ids, values

    def _choose(self, logits: np.ndarray, candidates: Candidates) -> int:
        if self.chain is None:
            return int(np.argmax(logits)) if self.params.greedy else self._draw(logits)
        if self.grammar is None:  # llama.cpp's chain, with the bias and penalties in it
            llama_cpp.llama_sampler_apply(self.chain, candidates.fill(logits))
            token = candidates.selected()
            llama_cpp.llama_sampler_accept(self.chain, token)
            return token
        cur = candidates.fill(logits)
        llama_cpp.llama_sampler_apply(self.chain, cur)
        token = candidates.selected()
        if self.grammar is not None:
            llama_cpp.llama_sampler_apply(self.grammar, candidates.single(token, float(logits[token])))
            if not math.isfinite(candidates.first_logit()):
                # The chain's pick breaks the grammar: constrain the whole vocabulary, then pick.
                cur = candidates.fill(logits)
                llama_cpp.llama_sampler_apply(self.grammar, cur)
                llama_cpp.llama_sampler_apply(self.chain, cur)
                token = candidates.selected()
            llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.chain, token)
        return token

    def _draw_among(self, ids: np.ndarray, values: np.ndarray) -> int:
        """`_draw` over the top-k candidates `_best` found."""
        params = self.params
        peak = float(values.max())
        if params.min_p > 0.0 or params.top_p < 1.0:
            weights = np.exp(values - peak)
            if params.min_p > 0.0:
                keep = weights >= params.min_p
                ids, values, weights = ids[keep], values[keep], weights[keep]
            if params.top_p < 1.0:
                order = np.argsort(-weights, kind="stable")
                goal = params.top_p * float(weights.sum(dtype=np.float64))
                cut = int(np.searchsorted(np.cumsum(weights[order], dtype=np.float64), goal)) + 1
                ids, values = ids[order[:cut]], values[order[:cut]]
        mass = np.cumsum(np.exp((values - peak) / params.temperature), dtype=np.float64)
        pick = int(np.searchsorted(mass, self.rng.random() * mass[-1], side="right"))
        return int(ids[min(pick, len(ids) - 1)])

    def _draw(self, logits: np.ndarray) -> int:
        """A seeded draw, in llama-server's order: top-k, then min-p and top-p on the model's own
        distribution, then temperature. Only what these filters keep is sorted; a plain
        temperature draw over the whole vocabulary finds its token through block sums instead
        of a running sum of every weight."""
        params = self.params
        peak = float(logits.max())
        ids: np.ndarray | None = None
        if 0 < params.top_k < len(logits):
            ids = np.argpartition(logits, -params.top_k)[-params.top_k :]
        if params.min_p > 0.0 or params.top_p < 1.0:
            if ids is None:
                ids = np.arange(len(logits))
            weights = np.exp(logits[ids] - peak)  # the model's own distribution, best token = 1
            if params.min_p > 0.0:
                keep = weights >= params.min_p
                ids, weights = ids[keep], weights[keep]
            if params.top_p < 1.0:
                goal = params.top_p * float(weights.sum(dtype=np.float64))
                order = None
                for size in (1024, 16384):
                    if size < len(weights):
                        top = np.argpartition(weights, -size)[-size:]
                        if float(weights[top].sum(dtype=np.float64)) >= goal:
                            order = top[np.argsort(-weights[top], kind="stable")]
                            break
                if order is None:
                    order = np.argsort(-weights, kind="stable")
                cut = int(np.searchsorted(np.cumsum(weights[order], dtype=np.float64), goal)) + 1
                ids = ids[order[:cut]]
        if ids is not None:
            mass = np.cumsum(np.exp((logits[ids] - peak) / params.temperature), dtype=np.float64)
            pick = int(np.searchsorted(mass, self.rng.random() * mass[-1], side="right"))
            return int(ids[min(pick, len(ids) - 1)])
        # The whole vocabulary: weights in blocks, the block holding the draw, then within it.
        weights = np.exp((logits - peak) / np.float32(params.temperature))
        size = len(weights)
        block = BLOCK if size > BLOCK else size
        rows = -(-size // block)
        padded = np.zeros(rows * block, dtype=np.float32)
        padded[:size] = weights
        blocks = padded.reshape(rows, block).sum(axis=1, dtype=np.float64)
        ends = np.cumsum(blocks)
        target = self.rng.random() * ends[-1]
        row = min(int(np.searchsorted(ends, target, side="right")), rows - 1)
        inside = np.cumsum(padded[row * block : (row + 1) * block], dtype=np.float64)
        before = ends[row - 1] if row else 0.0
        pick = int(np.searchsorted(inside, target - before, side="right"))
        return min(row * block + min(pick, block - 1), size - 1)

    def close(self) -> None:
        """Free the chains; the scheduler has taken a chain in the graph back from llama.cpp first."""
        for sampler in (self.chain, self.grammar):
            if sampler:
                llama_cpp.llama_sampler_free(sampler)
        self.chain = self.grammar = None


def largest(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of `row` (in no order): those at or above a threshold that a
    strided sample puts a few hundred above the k-th, then the k best of them; a compare and a
    partition of a few hundred, where a partition of the whole row would cost three times more."""
    n = len(row)
    if k >= n:
        return np.arange(n)
    if k * SAMPLE_STRIDE * 4 >= n:
        return np.argpartition(row, -k)[-k:]
    sample = row[::SAMPLE_STRIDE]
    j = min(len(sample), 2 * (k // SAMPLE_STRIDE) + 4)
    ids = np.flatnonzero(row >= np.partition(sample, -j)[-j])
    if len(ids) < k:  # (the sample was unlucky)
        return np.argpartition(row, -k)[-k:]
    return ids[np.argpartition(row[ids], -k)[-k:]]


def _chain(params: SamplingParams, seed: int | None, n_vocab: int, history: int, *, bias: bool) -> Any:
    """llama.cpp's chain in llama-server's order: logit bias and OpenAI's penalties (over the
    tokens generated, at most `history`), then greedy, or top-k, top-p, min-p, temperature and a
    seeded draw. Every one of them also runs in llama.cpp's graph. (`bias`: with the bias and
    penalties; a grammar's chain gets logits adjusted in numpy.)"""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

    def add(sampler: Any) -> None:
        llama_cpp.llama_sampler_chain_add(chain, sampler)

    if bias and params.logit_bias:
        entries = (llama_cpp.llama_logit_bias * len(params.logit_bias))()
        for entry, (token, value) in zip(entries, params.logit_bias, strict=True):
            entry.token, entry.bias = token, value
        add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), entries))
    if bias and (params.presence_penalty or params.frequency_penalty):
        add(
            llama_cpp.llama_sampler_init_penalties(
                n_vocab, history, 1.0, params.frequency_penalty, params.presence_penalty
            )
        )
    if params.greedy:
        add(llama_cpp.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(llama_cpp.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
    add(llama_cpp.llama_sampler_init_temp(params.temperature))
    # llama.cpp reads LLAMA_DEFAULT_SEED (2**32 - 1) as "seed at random": a request's seed never is.
    add(
        llama_cpp.llama_sampler_init_dist(llama_cpp.LLAMA_DEFAULT_SEED if seed is None else seed % 0xFFFFFFFF)
    )
    return chain


def logprobs_of(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of `token` and its `top` most likely alternatives, from the raw
    logits (before penalties, bias and temperature), as OpenAI reports them."""
    row = logits.astype(np.float64, copy=False)
    peak = float(row.max())
    log_total = peak + math.log(float(np.exp(row - peak).sum()))
    alternatives: list[tuple[int, float]] = []
    if top > 0:
        best = np.argpartition(-row, top)[:top]
        best = best[np.argsort(-row[best], kind="stable")]
        alternatives = [(int(t), float(row[t]) - log_total) for t in best]
    return float(row[token]) - log_total, alternatives
