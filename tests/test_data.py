"""Synthetic corpora: determinism, automaton structure, errors."""

import numpy as np
import pytest

from mmjax.data import PFACorpus, make_corpus


def test_batches_are_deterministic_per_step_and_split():
    corpus = PFACorpus(vocab_size=16, seed=3)
    a, b = corpus.batch(5, 4, 50), corpus.batch(5, 4, 50)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, corpus.batch(6, 4, 50))
    assert not np.array_equal(a, corpus.batch(5, 4, 50, split="eval"))
    assert a.dtype == np.int32 and a.shape == (4, 50)
    assert a.min() >= 0 and a.max() < 16


def test_each_row_uses_few_symbols_and_follows_an_automaton():
    corpus = PFACorpus(vocab_size=64, num_states=4, edges_per_state=2)
    tokens = corpus.batch(0, 8, 400)
    for row in tokens:
        # at most num_states * edges_per_state distinct symbols per automaton
        assert len(set(row.tolist())) <= 8
        # the successors of any symbol come from one state's edges: at most 2 * 4 options,
        # and in a long walk far fewer than the vocabulary
        succ = {}
        for a, b in zip(row[:-1], row[1:]):
            succ.setdefault(a, set()).add(b)
        assert max(len(s) for s in succ.values()) <= 8


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="edges_per_state"):
        PFACorpus(vocab_size=4, edges_per_state=5)
    with pytest.raises(ValueError, match="unknown corpus"):
        make_corpus("wikipedia")
    with pytest.raises(ValueError, match=r"no option\(s\) \['states'\]"):
        make_corpus("pfa", states=3)
    with pytest.raises(ValueError, match="split"):
        PFACorpus().batch(0, 1, 1, split="test")
