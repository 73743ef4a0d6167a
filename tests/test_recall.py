"""The associative-recall corpus and needles (mmjax.data.recall)."""

import numpy as np
import pytest

from mmjax.data.recall import RecallCorpus, markers, needle
from mmjax.data.synthetic import make_corpus


def _segments(row, vocab_size, key_length=2, value_length=2):
    """``[(kind, key, value)]`` of the complete facts and queries in a row."""
    key_mark, val_mark, query_mark = markers(vocab_size)
    out, i = [], 0
    width = key_length + value_length + 2
    while i + width <= len(row):
        if row[i] in (key_mark, query_mark):
            assert row[i + 1 + key_length] == val_mark
            key = tuple(row[i + 1:i + 1 + key_length])
            value = tuple(row[i + 2 + key_length:i + width])
            out.append(("fact" if row[i] == key_mark else "query", key, value))
            i += width
        else:
            i += 1
    return out


def test_every_query_asks_an_earlier_fact_and_is_followed_by_its_value():
    corpus = make_corpus("recall", vocab_size=64, seed=3)
    batch = corpus.batch(0, 8, 256)
    assert batch.shape == (8, 256) and batch.dtype == np.int32
    assert batch.min() >= 0 and batch.max() < 64
    counts = {"fact": 0, "query": 0}
    for row in batch.tolist():
        stored = {}
        for kind, key, value in _segments(row, 64):
            counts[kind] += 1
            if kind == "fact":
                assert key not in stored  # keys are distinct within a row
                stored[key] = value
            else:
                assert stored[key] == value
        # markers appear only where a segment starts: never inside filler, keys or values
        plain = [t for kind_key_value in _segments(row, 64) for t in kind_key_value[1:]]
        assert all(t < 61 for part in plain for t in part)
    assert counts["fact"] > 8 * 5 and counts["query"] > 8 * 5


def test_batches_are_a_pure_function_of_seed_split_and_step():
    a, b = RecallCorpus(seed=1), RecallCorpus(seed=2)
    np.testing.assert_array_equal(a.batch(4, 2, 64), a.batch(4, 2, 64))
    assert not np.array_equal(a.batch(4, 2, 64), a.batch(5, 2, 64))
    assert not np.array_equal(a.batch(4, 2, 64), b.batch(4, 2, 64))
    assert not np.array_equal(a.batch(4, 2, 64), a.batch(4, 2, 64, split="eval"))
    with pytest.raises(ValueError, match="split must be"):
        a.batch(0, 2, 64, split="test")


@pytest.mark.parametrize("options, match", [
    (dict(vocab_size=7), "at least 8 ids"),
    (dict(key_length=0), "key_length must be >= 1"),
    (dict(max_filler=0), "max_filler must be >= 1"),
    (dict(vocab_size=8, key_length=2), "fewer than 64 distinct keys"),
])
def test_bad_options_are_one_line_errors(options, match):
    with pytest.raises(ValueError, match=match):
        RecallCorpus(**options)


@pytest.mark.parametrize("facts", [1, 4])
def test_needle_prompt_has_the_context_length_and_its_answer_is_stored(facts):
    rng = np.random.default_rng(0)
    prompt, answer = needle(rng, vocab_size=64, context=100, facts=facts)
    key_mark, val_mark, query_mark = markers(64)
    assert len(prompt) == 100 and prompt[-1] == val_mark and prompt[-4] == query_mark
    stored = dict((key, value) for kind, key, value in _segments(prompt[:-4], 64))
    assert len(stored) == facts
    assert stored[tuple(prompt[-3:-1])] == tuple(answer)
    with pytest.raises(ValueError, match="too short"):
        needle(rng, vocab_size=64, context=10, facts=2)


def test_the_v2_recall_models_have_equal_parameters():
    """``configs/recall.py:v2|llama|llama_short_long``: within 0.5% of each other."""
    from config_loading import load_config

    from mmjax import flops

    params = {name: flops.count(dict(load_config(f"recall.py:{name}").model)).total_params
              for name in ("v2", "llama", "llama_short_long")}
    assert params == {"v2": 127376, "llama": 127296, "llama_short_long": 127808}
    assert max(params.values()) / min(params.values()) < 1.005
    assert load_config("recall.py:v2").model.inference_long_term_skip == 4
