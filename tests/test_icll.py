"""In-context language learning data: the automata and strings of the v1 paper's setup, held-out
languages, the oracle scores 1 / 0, an in-context bigram beats a unigram."""

import numpy as np
import pytest

from mmjax.data import icll as data
from mmjax.eval import icll


@pytest.fixture(scope="module")
def train_set():
    return data.make_dataset(0, 300, 512)


def test_automata_have_the_specified_shape(train_set):
    states = [ex.automaton.num_states for ex in train_set]
    assert min(states) == 4 and max(states) == 12
    edges = [len(e) for ex in train_set for e in ex.automaton.edges]
    assert min(edges) == 1 and max(edges) == 3
    for ex in train_set:
        for state, out in enumerate(ex.automaton.edges):
            assert state not in out.values()  # no self loops
            assert all(0 <= letter < data.NUM_LETTERS for letter in out)  # distinct (dict)


def test_examples_are_10_to_19_strings_of_1_to_49_letters():
    rng = np.random.default_rng(1)
    counts, lengths = [], []
    for _ in range(200):
        ex = data.make_example(rng, data.random_automaton(rng), 2000)
        real = ex.tokens[ex.tokens != data.PAD]
        assert real[-1] == data.SEPARATOR
        strings = "".join("x" if t < data.NUM_LETTERS else "|" for t in real).split("|")[:-1]
        counts.append(len(strings))
        lengths += [len(s) for s in strings]
        # every letter is one the automaton allows from the state recorded before it
        for t, s in zip(ex.tokens, ex.states, strict=True):
            assert (s >= 0) == (t < data.NUM_LETTERS)
            if s >= 0:
                assert t in ex.automaton.edges[s]
    assert min(counts) == 10 and max(counts) == 19
    assert min(lengths) == 1 and max(lengths) == 49


def test_held_out_languages_are_not_training_languages(train_set):
    keys = {ex.automaton.key() for ex in train_set}
    test = data.make_dataset(1, 300, 512, exclude=keys)
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
    (lambda: data.make_dataset(0, 0, 64), "num_languages must be >= 1"),
    (lambda: data.make_dataset(0, 3, 1), "length must be >= 2"),
    (lambda: icll.ngram_probs(data.make_dataset(0, 1, 8)[0], 0), "n must be >= 1"),
    (lambda: icll.score(np.zeros((3, 20)), data.make_dataset(0, 1, 8)[0]),
     "probs must be [7, 20]"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call()


# ----------------------------------------------------------------------------- training


def test_corpus_shuffles_the_training_set_each_epoch_and_holds_languages_out():
    corpus = data.ICLLCorpus(num_languages=12, eval_languages=5, seed=3)
    train = corpus.examples("train", 65)
    epoch = np.concatenate([corpus.batch(k, 4, 65) for k in range(3)])
    as_bytes = lambda rows: sorted(r.tobytes() for r in rows)
    assert as_bytes(epoch) == as_bytes([ex.tokens for ex in train])  # each language once
    assert not np.array_equal(epoch, np.concatenate([corpus.batch(k, 4, 65)
                                                     for k in range(3, 6)]))
    held = corpus.batch(0, 5, 65, split="eval")
    assert not {r.tobytes() for r in held} & {ex.tokens.tobytes() for ex in train}
    assert np.array_equal(corpus.batch(7, 4, 65), corpus.batch(7, 4, 65))


def test_separator_and_padding_targets_are_not_trained_on():
    import jax.numpy as jnp

    from mmjax.train.step import split_batch

    tokens = jnp.array([[1, data.SEPARATOR, 2, data.PAD, data.PAD]])
    inputs, targets = split_batch(tokens, data.IGNORED_TARGETS)
    assert inputs.tolist() == [[1, data.SEPARATOR, 2, data.PAD]]
    assert targets.tolist() == [[-1, 2, -1, -1]]
    assert split_batch(tokens)[1].tolist() == [[data.SEPARATOR, 2, data.PAD, data.PAD]]


def test_bad_corpus_options():
    with pytest.raises(ValueError, match="needs vocab_size >= 20"):
        data.ICLLCorpus(vocab_size=8)
    with pytest.raises(ValueError, match="num_languages must be >= 1"):
        data.ICLLCorpus(num_languages=0)


def test_the_icll_command_trains_scores_and_writes_json(tmp_path, capsys):
    import json

    from mmjax.eval.__main__ import main

    code = main(["icll", "--languages", "8", "--steps", "4", "--width", "16", "--context",
                 "64", "--eval_languages", "4", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    rows = json.loads((tmp_path / "icll.json").read_text())
    assert {r["model"] for r in rows} == {"in-context 2-gram", "in-context 3-gram",
                                          "memory_mosaic", "gpt2"}
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["tvd"] <= 1.0
        assert len(r["accuracy_by_position"]) == 64
    assert "| memory_mosaic | 8 |" in out and "| gpt2 | 8 |" in out


@pytest.mark.parametrize("argv", [["nope"], ["icll", "--languages", "0"],
                                  ["icll", "--models", "rnn"], ["icll", "--steps", "0"],
                                  ["icll", "--seeds", "x"]])
def test_bad_flags_exit_2(argv, capsys):
    from mmjax.eval.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    capsys.readouterr()


@pytest.mark.parametrize("width, context", [(64, 512), (32, 128)])
def test_the_two_models_have_the_same_number_of_parameters(width, context):
    from mmjax import flops
    from mmjax.config import load

    mm, gpt2 = (flops.count(load(f"icll.py:{m},width={width},context={context}").model
                            ).total_params for m in ("mm", "gpt2"))
    # the same up to the Memory Mosaic's per-head scalars: 7 per head and layer
    assert mm - gpt2 == 7 * 4 * 2, (mm, gpt2)


def test_the_study_builds_its_runs_in_the_package_as_the_config_file_does():
    """``python -m mmjax.eval icll`` needs no checkout: its runs come from
    ``mmjax.config.icll_config``, which ``configs/icll.py`` presets name."""
    from mmjax.config import icll_config, load

    for model in ("mm", "gpt2"):
        assert icll_config(model, languages=7, steps=9, seed=2, width=16, context=32,
                           eval_languages=5).to_dict() == load(
            f"configs/icll.py:{model},languages=7,steps=9,seed=2,width=16,context=32,"
            "eval_languages=5").to_dict()
