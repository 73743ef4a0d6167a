"""In-context language learning (the v1 paper's figure 9, after Akyurek et al. 2024, REGBENCH).

Every example is a language of its own: a random probabilistic finite automaton, and 10-19
strings it generates, joined by a separator. A model that predicts the next letter well must
infer the automaton from the strings before it, in context.

Automata (:func:`random_automaton`): 4-12 states; each state has 1-3 outgoing edges with
distinct letters from an alphabet of 18, never to itself; a string starts at state 0 and
takes each allowed letter with equal probability. Every state has an edge, so a string can
always go on; its length, 1-49 letters, is drawn first (CHOICE: the papers leave the start
state and the stopping rule open; a fixed start state and a drawn length keep every letter
of a string a draw from the automaton).

Token ids: letters ``0..17``, the separator ``18``, padding ``19`` (vocabulary 20). An
example is ``s_1 SEP s_2 SEP ... s_n SEP`` (CHOICE: a separator also closes the last string),
padded to a fixed length. Targets that are the separator or padding are not scored (nor
trained on): the end of a string is a draw of its length, not of the automaton.

Metrics, at each scored position (:func:`score`): accuracy (the model's most likely token is
one the automaton allows next) and the total variation distance between the model's
next-token distribution and the automaton's (probability on the separator or padding counts
as error). The oracle (:func:`oracle_probs`) scores 1 and 0; in-context n-gram predictors
(:func:`ngram_probs`) are the baselines of the paper's figure.
"""

from __future__ import annotations

import dataclasses

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


def targets_and_truth(example: Example) -> tuple[np.ndarray, np.ndarray]:
    """``(scored [length - 1] bool, true_probs [length - 1, VOCAB_SIZE])`` for the prediction
    of token ``t + 1`` from tokens ``0..t``: scored where token ``t + 1`` is a letter."""
    states = example.states[1:]
    scored = states >= 0
    truth = np.zeros((len(states), VOCAB_SIZE))
    for t in np.flatnonzero(scored):
        truth[t] = example.automaton.next_probs(int(states[t]))
    return scored, truth


def oracle_probs(example: Example) -> np.ndarray:
    """The automaton's own next-token distributions ``[length - 1, VOCAB_SIZE]`` (where a
    letter follows; the separator elsewhere)."""
    scored, truth = targets_and_truth(example)
    truth[~scored, SEPARATOR] = 1.0
    return truth


def ngram_probs(example: Example, n: int, smoothing: float = 1e-3) -> np.ndarray:
    """An in-context ``n``-gram predictor ``[length - 1, VOCAB_SIZE]``: the counts of what
    followed the last ``n - 1`` tokens earlier in the same example (letters only,
    ``smoothing`` added to every letter); ``n = 1`` counts letters."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tokens = example.tokens
    counts: dict[tuple, np.ndarray] = {}
    probs = np.zeros((len(tokens) - 1, VOCAB_SIZE))
    for t in range(len(tokens) - 1):
        context = tuple(tokens[max(0, t + 2 - n):t + 1]) if n > 1 else ()
        row = counts.get(context)
        p = np.full(VOCAB_SIZE, 0.0)
        p[:NUM_LETTERS] = smoothing
        if row is not None:
            p[:NUM_LETTERS] += row
        probs[t] = p / p.sum()
        nxt = tokens[t + 1]  # then token t + 1 is seen
        if nxt < NUM_LETTERS:
            counts.setdefault(context, np.zeros(NUM_LETTERS))[nxt] += 1.0
    return probs


def score(probs: np.ndarray, example: Example) -> dict[str, np.ndarray]:
    """Per-position ``accuracy`` and ``tvd`` (NaN where not scored) of next-token
    distributions ``probs [length - 1, VOCAB_SIZE]`` for ``example``."""
    scored, truth = targets_and_truth(example)
    if probs.shape != truth.shape:
        raise ValueError(f"probs must be [{truth.shape[0]}, {VOCAB_SIZE}], got {probs.shape}")
    allowed = truth > 0
    greedy = np.argmax(probs, axis=-1)
    accuracy = allowed[np.arange(len(greedy)), greedy].astype(float)
    tvd = 0.5 * np.abs(probs - truth).sum(axis=-1)
    return {"accuracy": np.where(scored, accuracy, np.nan), "tvd": np.where(scored, tvd, np.nan)}
