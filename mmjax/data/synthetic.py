"""Synthetic corpora that the package generates itself (no downloads).

``PFACorpus``: every sequence is a walk on its own random probabilistic finite automaton
(the in-context language learning setting of the Memory Mosaics paper, section 8). Each
automaton has ``num_states`` states with ``edges_per_state`` outgoing edges, labelled with
distinct symbols; a walk picks an outgoing edge uniformly, emits its symbol and moves on. A
model can only predict well by remembering, in context, which symbols followed which: exactly
what an associative memory does. The best achievable loss tends to ``log(edges_per_state)``
once an automaton's edges have been seen; a model that has learnt nothing sits at
``log(vocab_size)``.

Batches are a pure function of ``(seed, step)``: any step's batch can be regenerated, so the
stream needs no iterator state to resume.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mmjax.data.episodes import EpisodesCorpus
from mmjax.data.icll import ICLLCorpus
from mmjax.data.multidoc import MultidocCorpus
from mmjax.data.recall import RecallCorpus
from mmjax.data.rows import batch_rng


@dataclasses.dataclass(frozen=True)
class PFACorpus:
    """Random-automaton token sequences.

    Attributes:
      vocab_size: number of symbols (token ids ``0..vocab_size-1``).
      num_states: states per automaton.
      edges_per_state: outgoing edges per state (distinct symbols within a state).
      seed: base seed of the stream.
    """

    vocab_size: int = 64
    num_states: int = 8
    edges_per_state: int = 3
    seed: int = 0

    def __post_init__(self):
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.num_states < 1:
            raise ValueError(f"num_states must be >= 1, got {self.num_states}")
        if not 1 <= self.edges_per_state <= self.vocab_size:
            raise ValueError(
                f"edges_per_state must be in [1, vocab_size={self.vocab_size}], "
                f"got {self.edges_per_state}"
            )

    def sample(self, rng: np.random.Generator, batch_size: int, length: int) -> np.ndarray:
        """``[batch_size, length]`` int32 tokens, one fresh automaton per row."""
        if batch_size < 1 or length < 1:
            raise ValueError(f"batch_size and length must be >= 1, got {batch_size}, {length}")
        s, e = self.num_states, self.edges_per_state
        # symbols: for each (row, state) a random choice of e distinct symbols
        scores = rng.random((batch_size, s, self.vocab_size))
        symbols = np.argsort(scores, axis=-1)[..., :e]
        next_state = rng.integers(0, s, size=(batch_size, s, e))
        state = rng.integers(0, s, size=batch_size)
        rows = np.arange(batch_size)
        tokens = np.empty((batch_size, length), np.int32)
        for t in range(length):
            edge = rng.integers(0, e, size=batch_size)
            tokens[:, t] = symbols[rows, state, edge]
            state = next_state[rows, state, edge]
        return tokens

    def batch(self, step: int, batch_size: int, length: int, *, split: str = "train"):
        """The batch of a given step: ``[batch_size, length]`` tokens, deterministic."""
        return self.sample(batch_rng(self.seed, split, step), batch_size, length)


_CORPORA = {"pfa": PFACorpus, "icll": ICLLCorpus, "recall": RecallCorpus,
            "multidoc": MultidocCorpus, "episodes": EpisodesCorpus}


def ignored_targets(name: str) -> tuple[int, ...]:
    """The target ids corpus ``name`` does not train on (the icll separator and padding);
    none for a token store or a corpus without such ids. Needs no data."""
    return tuple(getattr(_CORPORA.get(name), "ignore_targets", ()))


def make_corpus(name: str, **kwargs):
    """Build a synthetic corpus by name (``"pfa"``, ``"icll"``: :mod:`mmjax.data.icll`,
    ``"recall"``: :mod:`mmjax.data.recall`, ``"multidoc"``: :mod:`mmjax.data.multidoc`,
    ``"episodes"``: :mod:`mmjax.data.episodes`);
    unknown names and keys raise clearly."""
    if name not in _CORPORA:
        raise ValueError(f"unknown corpus {name!r}; known: {sorted(_CORPORA)}")
    cls = _CORPORA[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"corpus {name!r} has no option(s) {unknown}; valid: {sorted(known)}")
    return cls(**kwargs)
