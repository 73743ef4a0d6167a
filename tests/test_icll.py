"""In-context language learning data: the automata and strings the issue specifies, held-out
languages, the oracle scores 1 / 0, an in-context bigram beats a unigram."""

import numpy as np
import pytest

from mmjax.eval import icll


@pytest.fixture(scope="module")
def train_set():
    return icll.make_dataset(0, 300, 512)


def test_automata_have_the_specified_shape(train_set):
    states = [ex.automaton.num_states for ex in train_set]
    assert min(states) == 4 and max(states) == 12
    edges = [len(e) for ex in train_set for e in ex.automaton.edges]
    assert min(edges) == 1 and max(edges) == 3
    for ex in train_set:
        for state, out in enumerate(ex.automaton.edges):
            assert state not in out.values()  # no self loops
            assert all(0 <= letter < icll.NUM_LETTERS for letter in out)  # distinct (dict)


def test_examples_are_10_to_19_strings_of_1_to_49_letters():
    rng = np.random.default_rng(1)
    counts, lengths = [], []
    for _ in range(200):
        ex = icll.make_example(rng, icll.random_automaton(rng), 2000)
        real = ex.tokens[ex.tokens != icll.PAD]
        assert real[-1] == icll.SEPARATOR
        strings = "".join("x" if t < icll.NUM_LETTERS else "|" for t in real).split("|")[:-1]
        counts.append(len(strings))
        lengths += [len(s) for s in strings]
        # every letter is one the automaton allows from the state recorded before it
        for t, s in zip(ex.tokens, ex.states, strict=True):
            assert (s >= 0) == (t < icll.NUM_LETTERS)
            if s >= 0:
                assert t in ex.automaton.edges[s]
    assert min(counts) == 10 and max(counts) == 19
    assert min(lengths) == 1 and max(lengths) == 49


def test_held_out_languages_are_not_training_languages(train_set):
    keys = {ex.automaton.key() for ex in train_set}
    test = icll.make_dataset(1, 300, 512, exclude=keys)
    assert not keys & {ex.automaton.key() for ex in test}
    assert len({ex.automaton.key() for ex in test}) == 300


def test_oracle_scores_accuracy_1_and_tvd_0(train_set):
    for ex in train_set[:20]:
        s = icll.score(icll.oracle_probs(ex), ex)
        assert np.nanmean(s["accuracy"]) == 1.0
        assert np.nanmax(s["tvd"]) == pytest.approx(0.0, abs=1e-12)
        scored, _ = icll.targets_and_truth(ex)
        assert np.isnan(s["accuracy"][~scored]).all()


def test_an_in_context_bigram_beats_a_unigram_and_learns_along_the_example(train_set):
    results = {}
    for n in (1, 2, 3):
        acc = [icll.score(icll.ngram_probs(ex, n), ex)["accuracy"] for ex in train_set[:100]]
        results[n] = np.nanmean(np.stack(acc), axis=0)
    assert np.nanmean(results[2]) > np.nanmean(results[1]) + 0.1
    early, late = np.nanmean(results[2][:64]), np.nanmean(results[2][-128:])
    assert late > early + 0.1
    tvd2 = np.nanmean([icll.score(icll.ngram_probs(ex, 2), ex)["tvd"] for ex in train_set[:50]])
    tvd1 = np.nanmean([icll.score(icll.ngram_probs(ex, 1), ex)["tvd"] for ex in train_set[:50]])
    assert tvd2 < tvd1


@pytest.mark.parametrize("call, message", [
    (lambda: icll.make_dataset(0, 0, 64), "num_languages must be >= 1"),
    (lambda: icll.make_dataset(0, 3, 1), "length must be >= 2"),
    (lambda: icll.ngram_probs(icll.make_dataset(0, 1, 8)[0], 0), "n must be >= 1"),
    (lambda: icll.score(np.zeros((3, 20)), icll.make_dataset(0, 1, 8)[0]),
     "probs must be [7, 20]"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call()
