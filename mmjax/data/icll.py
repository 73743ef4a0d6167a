"""In-context language learning data (the v1 paper's figure 9, after Akyurek et al. 2024,
REGBENCH): random probabilistic finite automata and the strings they generate.

Every example is a language of its own: a random automaton, and 10-19 strings it generates,
joined by a separator. A model that predicts the next letter well must infer the automaton
from the strings before it, in context. The metrics, the oracle and the n-gram baselines are
in :mod:`mmjax.eval.icll`.

Automata (:func:`random_automaton`): 4-12 states; each state has 1-3 outgoing edges with
distinct letters from an alphabet of 18, never to itself; a string starts at state 0 and
takes each allowed letter with equal probability. Every state has an edge, so a string can
always go on; its length, 1-49 letters, is drawn first (CHOICE: the papers leave the start
state and the stopping rule open; a fixed start state and a drawn length keep every letter
of a string a draw from the automaton).

Token ids: letters ``0..17``, the separator ``18``, padding ``19`` (vocabulary 20). An
example is ``s_1 SEP s_2 SEP ... s_n SEP`` (CHOICE: a separator also closes the last string),
cut or padded to a fixed length. Targets that are the separator or padding are not trained
on or scored (:data:`IGNORED_TARGETS`): the end of a string is a draw of its length, not of
the automaton.

:class:`ICLLCorpus` serves these examples to the trainer (``data.corpus="icll"``): a fixed
training set of ``num_languages`` languages, one example each, shuffled every epoch, and
``eval_languages`` held-out languages, none equal to a training one.
"""


from __future__ import annotations

import dataclasses
import functools

import numpy as np

NUM_LETTERS = 18
SEPARATOR = NUM_LETTERS
PAD = NUM_LETTERS + 1
VOCAB_SIZE = NUM_LETTERS + 2


@dataclasses.dataclass(frozen=True)
class Automaton:
    """A probabilistic finite automaton: ``edges[s]`` maps each allowed letter to the next
    state; letters are drawn uniformly among the allowed ones; strings start at state 0."""

    edges: tuple  # tuple of dicts {letter: next_state}

    @property
    def num_states(self) -> int:
        return len(self.edges)

    def key(self) -> tuple:
        """A hashable identity (held-out languages must differ from the training ones)."""
        return tuple(tuple(sorted(e.items())) for e in self.edges)

    def next_probs(self, state: int) -> np.ndarray:
        """The exact next-token distribution over the vocabulary ``[VOCAB_SIZE]``."""
        p = np.zeros(VOCAB_SIZE)
        letters = list(self.edges[state])
        p[letters] = 1.0 / len(letters)
        return p


def random_automaton(rng: np.random.Generator, *, min_states: int = 4, max_states: int = 12,
                     max_edges: int = 3) -> Automaton:
    """A random automaton: ``min_states..max_states`` states, ``1..max_edges`` edges per
    state with distinct letters, no self loops."""
    if not 2 <= min_states <= max_states:
        raise ValueError(f"need 2 <= min_states <= max_states, got {min_states}, {max_states}")
    if not 1 <= max_edges <= NUM_LETTERS:
        raise ValueError(f"max_edges must be in [1, {NUM_LETTERS}], got {max_edges}")
    n = int(rng.integers(min_states, max_states + 1))
    edges = []
    for state in range(n):
        k = int(rng.integers(1, max_edges + 1))
        letters = rng.choice(NUM_LETTERS, size=k, replace=False)
        others = [s for s in range(n) if s != state]
        targets = rng.choice(others, size=k, replace=True)
        edges.append({int(a): int(b) for a, b in zip(letters, targets, strict=True)})
    return Automaton(tuple(edges))


def sample_string(rng: np.random.Generator, automaton: Automaton, length: int) -> list[int]:
    """``length`` letters from state 0."""
    state, letters = 0, []
    for _ in range(length):
        options = list(automaton.edges[state])
        letter = options[int(rng.integers(len(options)))]
        letters.append(letter)
        state = automaton.edges[state][letter]
    return letters


@dataclasses.dataclass(frozen=True)
class Example:
    """One language's tokens ``[length]`` (padded) and the automaton's state before each
    letter (``-1`` where the position is a separator or padding)."""

    tokens: np.ndarray
    states: np.ndarray
    automaton: Automaton


def make_example(rng: np.random.Generator, automaton: Automaton, length: int, *,
                 min_strings: int = 10, max_strings: int = 19, min_letters: int = 1,
                 max_letters: int = 49) -> Example:
    """``min_strings..max_strings`` strings of ``min_letters..max_letters`` letters, each
    closed by the separator, truncated or padded to ``length`` tokens."""
    tokens, states = [], []
    for _ in range(int(rng.integers(min_strings, max_strings + 1))):
        string = sample_string(rng, automaton, int(rng.integers(min_letters, max_letters + 1)))
        state = 0
        for letter in string:
            tokens.append(letter)
            states.append(state)
            state = automaton.edges[state][letter]
        tokens.append(SEPARATOR)
        states.append(-1)
    tokens, states = tokens[:length], states[:length]
    pad = length - len(tokens)
    return Example(np.array(tokens + [PAD] * pad, np.int32),
                   np.array(states + [-1] * pad, np.int32), automaton)


def make_dataset(seed: int, num_languages: int, length: int, *, exclude=frozenset(),
                 **example_kwargs) -> list[Example]:
    """``num_languages`` examples, one per fresh automaton, none of whose identity is in
    ``exclude`` (pass the training set's keys to hold languages out)."""
    if num_languages < 1:
        raise ValueError(f"num_languages must be >= 1, got {num_languages}")
    if length < 2:
        raise ValueError(f"length must be >= 2, got {length}")
    rng = np.random.default_rng(seed)
    examples, seen = [], set(exclude)
    while len(examples) < num_languages:
        automaton = random_automaton(rng)
        if automaton.key() in seen:
            continue
        seen.add(automaton.key())
        examples.append(make_example(rng, automaton, length, **example_kwargs))
    return examples




IGNORED_TARGETS = (SEPARATOR, PAD)


@functools.lru_cache(maxsize=8)
def _split(seed: int, num_languages: int, eval_languages: int, length: int):
    train = make_dataset(seed, num_languages, length)
    held_out = make_dataset(seed + 1_000_003, eval_languages, length,
                            exclude=frozenset(ex.automaton.key() for ex in train))
    return train, held_out


@dataclasses.dataclass(frozen=True)
class ICLLCorpus:
    """In-context language learning examples for the trainer (``data.corpus="icll"``).

    Attributes:
      vocab_size: the model's vocabulary (at least :data:`VOCAB_SIZE`).
      num_languages: training languages, one example each (the paper's N).
      eval_languages: held-out languages of the ``"eval"`` split.
      seed: seed of both sets and of the epoch shuffles.
    """

    vocab_size: int = VOCAB_SIZE
    num_languages: int = 1000
    eval_languages: int = 256
    seed: int = 0

    ignore_targets = IGNORED_TARGETS

    def __post_init__(self):
        if self.vocab_size < VOCAB_SIZE:
            raise ValueError(f"the icll corpus needs vocab_size >= {VOCAB_SIZE}, got "
                             f"{self.vocab_size}")
        for name in ("num_languages", "eval_languages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def examples(self, split: str, length: int) -> list[Example]:
        """The training or held-out examples at ``length`` tokens."""
        train, held_out = _split(self.seed, self.num_languages, self.eval_languages, length)
        return train if split == "train" else held_out

    def batch(self, step: int, batch_size: int, length: int, *, split: str = "train"):
        """``[batch_size, length]`` tokens of batch ``step``: the training set in a new
        order every epoch, or the held-out set in order (cycling)."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        examples = self.examples(split, length)
        n = len(examples)
        rows = []
        for j in range(batch_size):
            i = step * batch_size + j
            if split == "train":
                order = np.random.default_rng([self.seed, 2, i // n]).permutation(n)
                rows.append(examples[order[i % n]].tokens)
            else:
                rows.append(examples[i % n].tokens)
        return np.stack(rows).astype(np.int32)
