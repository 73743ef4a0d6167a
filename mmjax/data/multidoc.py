"""Multi-document question answering in token space: many short documents of facts about
entities, then a question answered by a span of one of them (the v2 paper's "new knowledge"
tasks, harder than needles: no filler, every token is information, and the key is spread
over a document).

The language (ids from the top of the vocabulary down, :func:`layout`): four markers
``DOC``, ``QUESTION``, ``ANSWER``, ``END``; ``relations`` relation words; ``entity_ids``
ids from which entity names of ``entity_length`` ids are drawn; every other id is a value
word. A document is ``DOC e_1..e_n r v_1..v_b r' v'_1..v'_b ...``: one entity and
``attributes`` relations of it, each with a value of ``value_length`` value words, drawn
afresh for every document (nothing is learnable but the format). A question is ``QUESTION
e_1..e_n r ANSWER`` and its answer the value, then ``END``.

Distractors reuse entities: an entity gets several documents, each with other relations,
and every relation appears for many entities, so the answer is found only by binding the
entity at the head of a document to a relation further in, in the one document that holds
that pair (each ``(entity, relation)`` pair is stated once per context).

* :func:`multidoc_task`: a prompt of exactly ``context`` tokens (documents, the first one
  cut from the left) ending with a question about one complete document, and its answer.
* :class:`MultidocCorpus` (``data.corpus="multidoc"``): training rows of documents and
  questions about earlier documents of the row, with their answers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mmjax.data.rows import RowCorpus


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which ids play which part (:func:`layout`)."""

    doc: int
    question: int
    answer: int
    end: int
    relations: tuple
    entity_ids: tuple
    value_ids: tuple


def layout(vocab_size: int, relations: int = 8, entity_ids: int = 16) -> Layout:
    """Markers at the top of the vocabulary, then relations, entity ids, and value words
    below; a one-line error when fewer than 16 value words are left."""
    values = vocab_size - 4 - relations - entity_ids
    if relations < 1 or entity_ids < 1 or values < 16:
        raise ValueError(f"vocab_size {vocab_size} leaves {values} value words after 4 "
                         f"markers, {relations} relations and {entity_ids} entity ids "
                         "(need >= 16, relations and entity ids >= 1)")
    top = vocab_size - 1
    rel0 = top - 3 - relations
    ent0 = rel0 - entity_ids
    return Layout(doc=top, question=top - 1, answer=top - 2, end=top - 3,
                  relations=tuple(range(rel0, rel0 + relations)),
                  entity_ids=tuple(range(ent0, ent0 + entity_ids)),
                  value_ids=tuple(range(0, ent0)))


@dataclasses.dataclass(frozen=True)
class Documents:
    """The documents' generator: sizes of the language and of a document.

    Attributes:
      vocab_size: the model's vocabulary.
      relations, entity_ids: how many ids are relation words and entity-name ids.
      entity_length, value_length: ids per entity name and per value.
      attributes: relations stated per document.
      reuse: probability that a document is about an entity already described in the
        context (with relations not yet stated for it).
    """

    vocab_size: int = 128
    relations: int = 8
    entity_ids: int = 16
    entity_length: int = 2
    value_length: int = 2
    attributes: int = 3
    reuse: float = 0.5

    def __post_init__(self):
        layout(self.vocab_size, self.relations, self.entity_ids)
        for name in ("entity_length", "value_length", "attributes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attributes > self.relations:
            raise ValueError(f"attributes {self.attributes} > relations {self.relations}: a "
                             "document states each relation once")
        if not 0.0 <= self.reuse <= 1.0:
            raise ValueError(f"reuse must be in [0, 1], got {self.reuse}")

    @property
    def layout(self) -> Layout:
        return layout(self.vocab_size, self.relations, self.entity_ids)

    @property
    def doc_length(self) -> int:
        return 1 + self.entity_length + self.attributes * (1 + self.value_length)

    @property
    def question_length(self) -> int:
        return 2 + self.entity_length + 1

    def document(self, rng: np.random.Generator, stated: dict) -> tuple[list[int], dict]:
        """A new document, and its ``{(entity, relation): value}``; ``stated`` (the pairs of
        the context so far, by entity) decides which entities and relations are still free."""
        lay = self.layout
        free = lambda e: [r for r in lay.relations if (e, r) not in stated.get(e, {})]
        reusable = [e for e in stated if len(free(e)) >= self.attributes]
        if reusable and rng.random() < self.reuse:
            entity = reusable[int(rng.integers(len(reusable)))]
        else:
            entity = self._new_entity(rng, stated)
        relations = rng.choice(free(entity), self.attributes, replace=False)
        tokens, facts = [lay.doc, *entity], {}
        for r in relations:
            value = tuple(int(v) for v in rng.choice(lay.value_ids, self.value_length))
            facts[(entity, int(r))] = value
            tokens += [int(r), *value]
        return tokens, facts

    def _new_entity(self, rng, stated) -> tuple:
        lay = self.layout
        for _ in range(1000):
            entity = tuple(int(x) for x in rng.choice(lay.entity_ids, self.entity_length))
            if entity not in stated:
                return entity
        raise ValueError(f"no new entity of {self.entity_length} ids out of "
                         f"{self.entity_ids} is left: raise entity_ids or entity_length")

    def question(self, entity: tuple, relation: int) -> list[int]:
        lay = self.layout
        return [lay.question, *entity, relation, lay.answer]


def _add(stated: dict, facts: dict) -> None:
    for (entity, relation), value in facts.items():
        stated.setdefault(entity, {})[(entity, relation)] = value


def multidoc_task(rng: np.random.Generator, *, context: int,
                  documents: Documents = Documents()) -> tuple[list[int], tuple]:
    """A prompt of exactly ``context`` tokens: documents (the first cut from the left, never
    asked about), then a question about one complete document, chosen uniformly; and the
    answer (its value for the asked relation)."""
    q_len, d_len = documents.question_length, documents.doc_length
    if context < q_len + d_len:
        raise ValueError(f"context {context} is too short for one document of {d_len} tokens "
                         f"and a question of {q_len}")
    count = -(-(context - q_len) // d_len)  # whole documents, the first one cut
    stated: dict = {}
    docs = []
    for _ in range(count):
        tokens, facts = documents.document(rng, stated)
        _add(stated, facts)
        docs.append((tokens, facts))
    cut = count * d_len - (context - q_len)
    asked_doc = int(rng.integers(1 if cut else 0, count))
    (entity, relation), value = list(docs[asked_doc][1].items())[
        int(rng.integers(documents.attributes))]
    prompt = [t for tokens, _ in docs for t in tokens][cut:]
    return prompt + documents.question(entity, relation), value


@dataclasses.dataclass(frozen=True)
class MultidocCorpus(Documents, RowCorpus):
    """Rows of documents and questions about earlier documents of the row, each followed by
    its answer and ``END``: after each document, ``questions`` questions (about any complete
    document so far, uniformly) follow with probability ``ask``.

    Attributes: those of :class:`Documents`, and
      ask: probability of questions after a document.
      questions: questions asked then.
      seed: base seed; batches are a pure function of ``(seed, split, step)``.
    """

    ask: float = 0.5
    questions: int = 2
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.ask <= 1.0 or self.questions < 1:
            raise ValueError(f"ask must be in [0, 1] and questions >= 1, got {self.ask}, "
                             f"{self.questions}")

    def row(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """One row of ``length`` tokens."""
        lay = self.layout
        stated: dict = {}
        tokens: list[int] = []
        while len(tokens) < length:
            doc, facts = self.document(rng, stated)
            _add(stated, facts)
            tokens += doc
            if rng.random() < self.ask:
                pairs = [pair for facts in stated.values() for pair in facts.items()]
                for i in rng.integers(len(pairs), size=self.questions):
                    (entity, relation), value = pairs[int(i)]
                    tokens += self.question(entity, relation) + [*value, lay.end]
        return np.asarray(tokens[:length], np.int32)
