"""Associative recall in token space: key-value facts scattered through random filler, and
queries that ask for a stored value (RULER-style needles; the v2 paper's "store and retrieve
new knowledge given in the context").

A fact is ``KEY k_1..k_a VAL v_1..v_b``, a query ``QUERY k_1..k_a VAL`` followed by the
value. The markers are the three highest ids (:func:`markers`); keys, values and filler are
drawn uniformly from the other ids. Nothing here needs a tokenizer.

* :func:`needle`: facts in filler and one query at the end, a prompt of exactly ``context``
  tokens and its answer (the task of ``python -m mmjax.eval retrieval``).
* :class:`RecallCorpus` (``data.corpus="recall"``): training rows in which new facts,
  queries of earlier facts (with their answers) and runs of filler follow each other, so
  that every row teaches storing and retrieving. A model can predict an answer only by
  finding its fact earlier in the same row.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mmjax.data.rows import RowCorpus


def markers(vocab_size: int) -> tuple[int, int, int]:
    """``(KEY, VAL, QUERY)``: the three highest ids."""
    if vocab_size < 8:
        raise ValueError(f"recall tasks need a vocabulary of at least 8 ids, got {vocab_size}")
    return vocab_size - 1, vocab_size - 2, vocab_size - 3


def _ids(rng: np.random.Generator, vocab_size: int, n: int) -> tuple:
    """``n`` ids that are not markers."""
    return tuple(int(x) for x in rng.integers(0, vocab_size - 3, n))


def _new_key(rng, vocab_size: int, length: int, taken) -> tuple:
    while True:
        key = _ids(rng, vocab_size, length)
        if key not in taken:
            return key


def needle(rng: np.random.Generator, *, vocab_size: int, context: int, facts: int = 1,
           key_length: int = 2, value_length: int = 2) -> tuple[list[int], tuple]:
    """A prompt of exactly ``context`` tokens holding ``facts`` facts (distinct keys) at
    random places in filler, ending with the query of one of them; and that fact's value.

    With ``facts > 1`` the other facts are distractors (the multi-key, multi-document
    flavour)."""
    key_mark, val_mark, query_mark = markers(vocab_size)
    fact_length = key_length + value_length + 2
    query_length = key_length + 2
    filler_length = context - facts * fact_length - query_length
    if facts < 1 or key_length < 1 or value_length < 1:
        raise ValueError(f"facts, key_length and value_length must be >= 1, got {facts}, "
                         f"{key_length}, {value_length}")
    if filler_length < 0:
        raise ValueError(f"context {context} is too short for {facts} facts of "
                         f"{fact_length} tokens and a query of {query_length}")
    keys: list[tuple] = []
    for _ in range(facts):
        keys.append(_new_key(rng, vocab_size, key_length, keys))
    values = [_ids(rng, vocab_size, value_length) for _ in keys]
    filler = list(_ids(rng, vocab_size, filler_length))
    cuts = sorted(int(x) for x in rng.integers(0, filler_length + 1, facts))
    tokens, last = [], 0
    for cut, key, value in zip(cuts, keys, values, strict=True):
        tokens += filler[last:cut] + [key_mark, *key, val_mark, *value]
        last = cut
    tokens += filler[last:]
    asked = int(rng.integers(facts))
    tokens += [query_mark, *keys[asked], val_mark]
    return tokens, values[asked]


@dataclasses.dataclass(frozen=True)
class RecallCorpus(RowCorpus):
    """Rows of facts, queries of earlier facts and filler, for the trainer.

    Each segment of a row is, with probabilities ``(fact, query, filler)`` = ``(0.35, 0.35,
    0.3)``: a new fact (a key not yet used in the row); a query of a fact stored earlier in
    the row, uniformly chosen, followed by its value; or 1 to ``max_filler`` filler tokens.
    The first segment is always a fact.

    Attributes:
      vocab_size: the model's vocabulary (markers are its three highest ids).
      key_length, value_length: tokens per key and per value.
      max_filler: the longest run of filler.
      seed: base seed; batches are a pure function of ``(seed, split, step)``.
    """

    vocab_size: int = 64
    key_length: int = 2
    value_length: int = 2
    max_filler: int = 24
    seed: int = 0

    def __post_init__(self):
        markers(self.vocab_size)
        for name in ("key_length", "value_length", "max_filler"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if (self.vocab_size - 3) ** self.key_length < 64:
            raise ValueError(f"vocab_size {self.vocab_size} and key_length {self.key_length} "
                             "give fewer than 64 distinct keys")

    def row(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """One row of ``length`` tokens."""
        key_mark, val_mark, query_mark = markers(self.vocab_size)
        stored: dict[tuple, tuple] = {}
        tokens: list[int] = []
        while len(tokens) < length:
            r = rng.random() if stored else 0.0
            if r < 0.35:
                key = _new_key(rng, self.vocab_size, self.key_length, stored)
                stored[key] = _ids(rng, self.vocab_size, self.value_length)
                tokens += [key_mark, *key, val_mark, *stored[key]]
            elif r < 0.7:
                key = list(stored)[int(rng.integers(len(stored)))]
                tokens += [query_mark, *key, val_mark, *stored[key]]
            else:
                run = int(rng.integers(1, self.max_filler + 1))
                tokens += _ids(rng, self.vocab_size, run)
        return np.asarray(tokens[:length], np.int32)
