"""Tiny synthetic stories from templates: text for tests, benchmarks and CPU demos.

Nothing is downloaded: ``make_stories(n, seed)`` builds ``n`` short stories (three to eight
sentences each) from a few dozen names, places, objects and sentence templates, so that a
tokenizer and a small language model have real, learnable structure to find (names recur
within a story, sentences follow a grammar). ``write_story_files`` lays them out as the
``<|endoftext|>``-separated text files (or JSONL) that :mod:`mmjax.data.prepare` reads.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from mmjax.data.text import SEPARATOR

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Zoe", "Sam", "Ella",
         "Jack", "Nora", "Finn", "Ruby", "Owen"]
ANIMALS = ["cat", "dog", "bird", "frog", "bunny", "fox", "duck", "bear", "mouse", "horse"]
PLACES = ["park", "garden", "forest", "beach", "kitchen", "school", "river", "hill", "farm",
          "library"]
THINGS = ["ball", "kite", "book", "cake", "box", "hat", "boat", "drum", "apple", "shell",
          "flower", "toy car"]
FEELINGS = ["happy", "sad", "scared", "proud", "sleepy", "curious", "angry", "excited"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "little", "big", "shiny"]

OPENINGS = [
    "Once upon a time, there was a {feeling} {animal} named {name}.",
    "One day, {name} went to the {place} with a {colour} {thing}.",
    "{name} lived near a {place}. {name} had a {colour} {thing}.",
]
MIDDLES = [
    "{name} saw a {animal} near the {place}.",
    "The {animal} wanted to play with the {thing}.",
    "{name} felt {feeling} and said, \"Can I have the {thing}?\"",
    "{friend} came to the {place} and smiled at {name}.",
    "They looked for the {colour} {thing} all day.",
    "\"Look!\" said {friend}. \"The {thing} is under the tree.\"",
    "{name} shared the {thing} with {friend}.",
    "It started to rain, so {name} and {friend} ran home.",
    "The {animal} was {feeling} because the {thing} was lost.",
]
ENDINGS = [
    "In the end, {name} and {friend} were {feeling} friends.",
    "{name} learned that sharing is good.",
    "That night, {name} slept with the {colour} {thing}.",
    "And the {animal} never lost the {thing} again.",
]


def make_story(rng: np.random.Generator) -> str:
    names = rng.choice(NAMES, size=2, replace=False)
    slots = dict(name=names[0], friend=names[1], animal=rng.choice(ANIMALS),
                 place=rng.choice(PLACES), thing=rng.choice(THINGS),
                 feeling=rng.choice(FEELINGS), colour=rng.choice(COLOURS))
    sentences = [rng.choice(OPENINGS)]
    sentences += list(rng.choice(MIDDLES, size=int(rng.integers(1, 6))))
    sentences.append(rng.choice(ENDINGS))
    sentences = [s.format(**slots) for s in sentences]
    # a paragraph break now and then: documents hold newlines too
    cut = int(rng.integers(1, len(sentences)))
    return " ".join(sentences[:cut]) + "\n\n" + " ".join(sentences[cut:])


def make_stories(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [make_story(rng) for _ in range(n)]


def write_story_files(directory: str | pathlib.Path, stories: list[str], *, num_files: int = 1,
                      jsonl: bool = False, prefix: str = "stories") -> list[pathlib.Path]:
    """Write ``stories`` over ``num_files`` files (contiguous runs, in order); returns paths."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, part in enumerate(np.array_split(np.arange(len(stories)), num_files)):
        docs = [stories[j] for j in part]
        if jsonl:
            path = directory / f"{prefix}_{i:03d}.jsonl"
            path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs),
                            encoding="utf-8")
        else:
            path = directory / f"{prefix}_{i:03d}.txt"
            path.write_text(f"\n{SEPARATOR}\n".join(docs), encoding="utf-8")
        paths.append(path)
    return paths


def make_story_store(root: str | pathlib.Path, num_stories: int, *, seed: int = 0,
                     vocab_size: int = 512):
    """Generated stories -> a trained tokenizer -> a token store, all under ``root``.

    Returns ``(store_directory, tokenizer)``: the test and benchmark corpus of a few seconds.
    """
    from mmjax.data import prepare, tokenizer  # they import this module's neighbours

    root = pathlib.Path(root)
    docs = make_stories(num_stories, seed=seed)
    write_story_files(root / "in", docs)
    tok = tokenizer.train_tokenizer(docs, root / "tok.model", vocab_size=vocab_size)
    prepare.prepare(str(root / "in" / "*"), root / "tok.model", root / "store", progress=False)
    return root / "store", tok
