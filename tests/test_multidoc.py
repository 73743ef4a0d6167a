"""The multi-document question-answering language (mmjax.data.multidoc)."""

import collections

import numpy as np
import pytest

from mmjax.data.multidoc import Documents, MultidocCorpus, layout, multidoc_task
from mmjax.data.synthetic import make_corpus

DOCS = Documents()


def read_documents(tokens, documents=DOCS):
    """``{(entity, relation): [value, ...]}`` of the complete documents in ``tokens``, read
    back by an oracle that knows the format, and the entity of each document."""
    lay = documents.layout
    facts, entities = collections.defaultdict(list), []
    starts = [i for i, t in enumerate(tokens) if t == lay.doc]
    for start in starts:
        i = start + 1
        entity = tuple(tokens[i:i + documents.entity_length])
        i += documents.entity_length
        entities.append(entity)
        for _ in range(documents.attributes):
            relation, value = tokens[i], tuple(tokens[i + 1:i + 1 + documents.value_length])
            if len(value) < documents.value_length or relation not in lay.relations:
                break
            facts[(entity, relation)].append(value)
            i += 1 + documents.value_length
    return facts, entities


def parse_question(prompt, documents=DOCS):
    lay = documents.layout
    assert prompt[-1] == lay.answer
    q = len(prompt) - documents.question_length
    assert prompt[q] == lay.question
    return tuple(prompt[q + 1:q + 1 + documents.entity_length]), prompt[-2]


@pytest.mark.parametrize("context", [31, 512, 2048])
def test_the_answer_is_the_one_document_stating_the_asked_pair(context):
    rng = np.random.default_rng(context)
    for _ in range(20):
        prompt, answer = multidoc_task(rng, context=context)
        assert len(prompt) == context
        facts, _ = read_documents(prompt[:-DOCS.question_length])
        asked = parse_question(prompt)
        assert facts[asked] == [answer]  # stated once, in a complete document
        assert all(len(values) == 1 for values in facts.values())


def test_distractors_reuse_the_asked_entity_and_relation():
    rng = np.random.default_rng(0)
    same_entity = same_relation = 0
    for _ in range(50):
        prompt, _ = multidoc_task(rng, context=512)
        facts, entities = read_documents(prompt[:-DOCS.question_length])
        entity, relation = parse_question(prompt)
        same_entity += entities.count(entity) > 1
        same_relation += sum(r == relation for _, r in facts) > 1
    assert same_entity >= 15 and same_relation == 50


def test_answers_come_only_from_the_context():
    """The same question gets different answers in different contexts: values are drawn
    afresh per document, so no answer can be memorised in the weights."""
    rng = np.random.default_rng(1)
    answers = collections.defaultdict(set)
    for _ in range(400):
        prompt, answer = multidoc_task(rng, context=64)
        answers[parse_question(prompt)].add(answer)
    repeated = [a for a in answers.values() if len(a) > 1]
    assert len(repeated) >= 20


def test_corpus_rows_answer_every_question_from_an_earlier_document_of_the_row():
    corpus = make_corpus("multidoc", seed=2)
    lay = corpus.layout
    batch = corpus.batch(0, 4, 512)
    assert batch.shape == (4, 512) and batch.dtype == np.int32
    np.testing.assert_array_equal(batch, corpus.batch(0, 4, 512))
    assert not np.array_equal(batch, corpus.batch(1, 4, 512))
    asked = 0
    for row in batch.tolist():
        for q in [i for i, t in enumerate(row) if t == lay.question]:
            end = q + DOCS.question_length + DOCS.value_length
            if end >= len(row):
                continue
            facts, _ = read_documents(row[:q])
            entity = tuple(row[q + 1:q + 1 + DOCS.entity_length])
            relation = row[q + 1 + DOCS.entity_length]
            value = tuple(row[q + DOCS.question_length:end])
            assert facts[(entity, relation)] == [value] and row[end] == lay.end
            asked += 1
    assert asked >= 20


@pytest.mark.parametrize("kwargs,message", [
    (dict(vocab_size=32), "vocab_size 32 leaves 4 value words"),
    (dict(attributes=9), "attributes 9 > relations 8"),
    (dict(reuse=1.5), "reuse must be in"),
    (dict(value_length=0), "value_length must be >= 1"),
])
def test_bad_settings_raise_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Documents(**kwargs)


def test_bad_corpus_and_task_settings_raise():
    with pytest.raises(ValueError, match="ask must be in"):
        MultidocCorpus(ask=2.0)
    with pytest.raises(ValueError, match="too short for one document"):
        multidoc_task(np.random.default_rng(0), context=10)
    with pytest.raises(ValueError, match="split must be"):
        MultidocCorpus().batch(0, 1, 8, split="test")
    with pytest.raises(ValueError, match="no new entity"):
        multidoc_task(np.random.default_rng(0), context=4096,
                      documents=Documents(entity_ids=3, entity_length=1, reuse=0.0))
    assert layout(128).doc == 127 and min(layout(128).value_ids) == 0
