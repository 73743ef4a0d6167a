"""Few-shot classification episodes in token space (the v2 paper's in-context learning with
semantic and anonymised labels).

A class is a source of inputs: each class has ``typical`` feature ids of its own, and an
input is ``input_length`` feature ids, each one of its class's typical ids with probability
``signal`` and any feature id otherwise. A shot is ``x_1..x_L LABEL y``: the input, the
``LABEL`` marker, and the class's label token. An episode draws ``ways`` classes and a
number of shots of them, then a query ``x_1..x_L LABEL`` whose answer is its class's label.

Labels come in two kinds (:func:`episode`):

* **semantic**: a class's own label token, the same in every episode (its "name"): a model
  may learn it from pretraining for the classes it has seen, and must read it from the
  shots for the others;
* **anonymised**: the episode's classes get label tokens drawn at random for this episode
  only, so that only the shots say which label means which class.

Classes ``0 .. train_classes - 1`` appear in pretraining; the held-out classes after them
are only evaluated (disjoint by construction, :meth:`Classes.held_out`). Layout (ids from
the top of the vocabulary down): ``LABEL``, ``SEP`` (between episodes), then ``labels``
label tokens, then feature ids.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from mmjax.data.rows import RowCorpus


@dataclasses.dataclass(frozen=True)
class Classes:
    """The class sources and the token layout.

    Attributes:
      vocab_size: the model's vocabulary.
      labels: label tokens (semantic labels and the anonymised pool).
      train_classes, held_out_classes: classes of pretraining, and held out for evaluation.
      typical: typical feature ids per class.
      input_length: feature ids per input.
      signal: probability that an input id is one of its class's typical ids.
      class_seed: the seed of the classes themselves (the same world for every corpus
        seed).
    """

    vocab_size: int = 128
    labels: int = 32
    train_classes: int = 24
    held_out_classes: int = 8
    typical: int = 6
    input_length: int = 6
    signal: float = 0.7
    class_seed: int = 1234

    def __post_init__(self):
        if self.features < 2 * self.typical or self.labels < 2:
            raise ValueError(f"vocab_size {self.vocab_size} leaves {self.features} feature "
                             f"ids and {self.labels} labels (need >= {2 * self.typical} "
                             "features and >= 2 labels)")
        if self.train_classes + self.held_out_classes > self.labels:
            raise ValueError(f"{self.train_classes} + {self.held_out_classes} classes need as "
                             f"many semantic labels, got labels={self.labels}")
        for name in ("train_classes", "held_out_classes", "typical", "input_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.signal <= 1.0:
            raise ValueError(f"signal must be in [0, 1], got {self.signal}")

    @property
    def features(self) -> int:
        return self.vocab_size - 2 - self.labels

    @property
    def label_marker(self) -> int:
        return self.vocab_size - 1

    @property
    def separator(self) -> int:
        return self.vocab_size - 2

    @property
    def label_tokens(self) -> np.ndarray:
        return np.arange(self.features, self.features + self.labels)

    @property
    def held_out(self) -> range:
        """The evaluated classes (never in pretraining)."""
        return range(self.train_classes, self.train_classes + self.held_out_classes)

    def typical_ids(self, c: int) -> np.ndarray:
        """Class ``c``'s typical feature ids (fixed by ``class_seed``)."""
        return self._typical_table[c]

    @functools.cached_property
    def _typical_table(self) -> np.ndarray:
        """Every class's typical ids, drawn once (a generator per class per input made half
        of a batch's generation time)."""
        return np.stack([np.random.default_rng([self.class_seed, c]).choice(
            self.features, self.typical, replace=False)
            for c in range(self.train_classes + self.held_out_classes)])

    def semantic_label(self, c: int) -> int:
        return int(self.label_tokens[c])

    def sample_input(self, rng: np.random.Generator, c: int) -> list[int]:
        typical = self.typical_ids(c)
        ids = np.where(rng.random(self.input_length) < self.signal,
                       rng.choice(typical, self.input_length),
                       rng.integers(0, self.features, self.input_length))
        return [int(x) for x in ids]


def episode(rng: np.random.Generator, classes: Classes, class_ids, shots: int, *,
            anonymised: bool) -> tuple[list[int], int, list[int]]:
    """``shots`` shots of classes drawn from ``class_ids`` (round-robin over a random order,
    so that every class has a shot once ``shots >= len(class_ids)``), then a query of one of
    them. Returns ``(tokens, answer label, the episode's candidate labels)``."""
    class_ids = [int(c) for c in class_ids]
    if anonymised:
        pool = rng.choice(classes.label_tokens, len(class_ids), replace=False)
        label_of = {c: int(t) for c, t in zip(class_ids, pool, strict=True)}
    else:
        label_of = {c: classes.semantic_label(c) for c in class_ids}
    order = [class_ids[i] for i in rng.permutation(len(class_ids))]
    tokens: list[int] = []
    for s in range(shots):
        c = order[s % len(order)] if s < len(order) else int(rng.choice(class_ids))
        tokens += classes.sample_input(rng, c) + [classes.label_marker, label_of[c]]
    asked = int(rng.choice(class_ids))
    tokens += classes.sample_input(rng, asked) + [classes.label_marker]
    return tokens, label_of[asked], [label_of[c] for c in class_ids]


DOMAINS = ("pretrain", "new")


@dataclasses.dataclass(frozen=True)
class EpisodesCorpus(Classes, RowCorpus):
    """Pretraining rows of episodes of the training classes, separated by ``SEP``, each with
    ``ways`` classes, 1 to ``max_shots`` shots and its query's answer; half of the episodes
    with semantic labels, half anonymised (``anonymised`` their share). ``domain="new"``:
    episodes of the held-out classes with 0 to ``max_shots`` shots instead (fine-tuning on
    a new domain).

    Attributes: those of :class:`Classes`, and ``ways``, ``max_shots``, ``anonymised``,
    ``domain``, ``seed`` (base seed; batches are a pure function of ``(seed, split,
    step)``).
    """

    ways: int = 4
    max_shots: int = 32
    anonymised: float = 0.5
    domain: str = "pretrain"
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {self.domain!r}")
        count = len(self.class_ids)
        if not 2 <= self.ways <= count or self.max_shots < 0:
            raise ValueError(f"ways must be in [2, {count} classes of the domain] and "
                             f"max_shots >= 0, got {self.ways}, {self.max_shots}")
        if not 0.0 <= self.anonymised <= 1.0:
            raise ValueError(f"anonymised must be in [0, 1], got {self.anonymised}")

    @property
    def class_ids(self) -> range:
        """The domain's classes: the training classes, or the held-out ones (``"new"``: the
        domain a pretrained model is fine-tuned on)."""
        return self.held_out if self.domain == "new" else range(self.train_classes)

    def row(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """One row of ``length`` tokens."""
        tokens: list[int] = []
        while len(tokens) < length:
            ways = rng.choice(self.class_ids, self.ways, replace=False)
            shots = int(rng.integers(0, self.max_shots + 1)) if self.domain == "new" else int(
                rng.integers(1, self.max_shots + 1))
            ep, answer, _ = episode(rng, self, ways, shots,
                                    anonymised=bool(rng.random() < self.anonymised))
            tokens += ep + [answer, self.separator]
        return np.asarray(tokens[:length], np.int32)
