"""Few-shot classification episodes (mmjax.data.episodes)."""

import collections

import numpy as np
import pytest

from mmjax.data.episodes import Classes, EpisodesCorpus, episode
from mmjax.data.synthetic import make_corpus

CLASSES = Classes()
SHOT = CLASSES.input_length + 2


def shots_of(tokens, classes=CLASSES):
    """``[(input ids, label)]`` of an episode's shots, and the query's input."""
    body, query = tokens[:-(classes.input_length + 1)], tokens[-(classes.input_length + 1):-1]
    width = classes.input_length + 2
    shots = [(body[i:i + classes.input_length], body[i + width - 1])
             for i in range(0, len(body), width)]
    return shots, query


def nearest_label(tokens, candidates, classes=CLASSES):
    """An in-context oracle: the candidate whose shots share the most ids with the query."""
    shots, query = shots_of(tokens, classes)
    score = collections.Counter()
    for ids, label in shots:
        score[label] += len(set(ids) & set(query))
    return max(candidates, key=lambda c: score[c])


def test_held_out_classes_never_appear_in_pretraining():
    assert set(CLASSES.held_out).isdisjoint(range(CLASSES.train_classes))
    corpus = make_corpus("episodes", anonymised=0.0, seed=1)  # semantic labels only
    rows = corpus.batch(0, 4, 512)
    held_out_labels = {CLASSES.semantic_label(c) for c in CLASSES.held_out}
    answers = [row[i + 1] for row in rows.tolist() for i, t in enumerate(row[:-1])
               if t == CLASSES.label_marker]
    assert len(answers) > 100 and not held_out_labels & set(answers)
    assert set(answers) <= {CLASSES.semantic_label(c) for c in range(CLASSES.train_classes)}


@pytest.mark.parametrize("anonymised", [False, True])
def test_the_shots_say_which_label_is_which_class(anonymised):
    rng = np.random.default_rng(0)
    right = {1: [], 16: []}
    for shots in right:
        for _ in range(200):
            ways = rng.choice(CLASSES.held_out, 4, replace=False)
            tokens, answer, candidates = episode(rng, CLASSES, ways, shots,
                                                 anonymised=anonymised)
            assert len(tokens) == shots * SHOT + CLASSES.input_length + 1
            assert answer in candidates and len(set(candidates)) == 4
            right[shots].append(nearest_label(tokens, candidates) == answer)
    assert np.mean(right[16]) > 0.75 and np.mean(right[1]) < np.mean(right[16]) - 0.25


def test_anonymised_labels_change_per_episode_and_semantic_ones_do_not():
    rng = np.random.default_rng(1)
    labels = {True: collections.defaultdict(set), False: collections.defaultdict(set)}
    ways = [CLASSES.held_out[0], CLASSES.held_out[1]]
    for anonymised in (True, False):
        for _ in range(50):
            tokens, _, candidates = episode(rng, CLASSES, ways, 4, anonymised=anonymised)
            for c, label in zip(ways, candidates, strict=True):
                labels[anonymised][c].add(label)
    assert all(len(v) == 1 for v in labels[False].values())
    assert all(len(v) > 10 for v in labels[True].values())


def test_corpus_batches_are_deterministic_episodes_with_answers():
    corpus = EpisodesCorpus(seed=3)
    batch = corpus.batch(2, 3, 256)
    assert batch.shape == (3, 256) and batch.dtype == np.int32
    np.testing.assert_array_equal(batch, corpus.batch(2, 3, 256))
    assert not np.array_equal(batch, corpus.batch(3, 3, 256))
    assert (batch == CLASSES.separator).any() and batch.max() < 128


@pytest.mark.parametrize("kwargs,message", [
    (dict(vocab_size=40), "vocab_size 40 leaves 6 feature ids"),
    (dict(train_classes=30), "30 \\+ 8 classes need as many semantic labels"),
    (dict(signal=2.0), "signal must be in"),
])
def test_bad_class_settings_raise_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Classes(**kwargs)


def test_bad_corpus_settings_raise():
    with pytest.raises(ValueError, match="ways must be in"):
        EpisodesCorpus(ways=1)
    with pytest.raises(ValueError, match="anonymised must be in"):
        EpisodesCorpus(anonymised=-0.5)


def test_the_new_domain_is_the_held_out_classes_with_zero_or_more_shots():
    corpus = EpisodesCorpus(domain="new", anonymised=0.0, max_shots=2, seed=4)
    assert list(corpus.class_ids) == list(CLASSES.held_out)
    rows = corpus.batch(0, 4, 256).tolist()
    answers = {row[i + 1] for row in rows for i, t in enumerate(row[:-1])
               if t == CLASSES.label_marker}
    assert answers == {CLASSES.semantic_label(c) for c in CLASSES.held_out}
    sep, width = CLASSES.separator, CLASSES.input_length + 1
    zero_shot = [i for row in rows for i in range(width, len(row) - 2)
                 if row[i] == CLASSES.label_marker and row[i - width] == sep == row[i + 2]]
    assert zero_shot  # episodes that are their query alone: SEP x LABEL y SEP
    with pytest.raises(ValueError, match="domain must be one of"):
        EpisodesCorpus(domain="old")


def test_typical_ids_are_a_seeded_draw_per_class():
    """Each class's typical ids come from its own generator of ``(class_seed, class)``:
    fixed whatever else the corpus does, and distinct ids within a class."""
    classes = Classes()
    for c in (0, classes.train_classes, classes.train_classes + classes.held_out_classes - 1):
        expected = np.random.default_rng([classes.class_seed, c]).choice(
            classes.features, classes.typical, replace=False)
        np.testing.assert_array_equal(classes.typical_ids(c), expected)
        assert len(set(classes.typical_ids(c).tolist())) == classes.typical
