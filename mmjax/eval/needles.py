"""Long-context retrieval: facts scattered through filler, queried at the end (in the style of
RULER), and multi-document question answering on the user's own JSONL.

Synthetic tasks (:func:`needle_tasks`, made by :mod:`mmjax.data.recall`, whose ``recall``
corpus trains models on the same format) need no tokenizer. A fact is ``KEY k_1..k_a VAL
v_1..v_b``, a query ``QUERY k_1..k_a VAL``, and the model must continue with ``v_1..v_b``;
the markers are the three highest ids of the vocabulary, the rest of the tokens are drawn
from the other ids. With ``facts > 1`` the other facts are distractors with different keys
(the multi-key, multi-document flavour). The answer is read greedily with the caches of
:mod:`mmjax.generate`; a task counts when the continuation starts with the value (exact
match). A model that copies (:func:`copy_oracle`) scores 1.

Question answering (:func:`qa_tasks`): a JSONL file of ``{"context", "question", "answers"}``
objects (the v2 paper's multi-document QA needs real documents; bring yours). The prompt is
the context and the question, each on its own line; an answer counts when the normalised
continuation starts with one of the normalised answers.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import numpy as np

from mmjax.data.recall import markers, needle
from mmjax.eval.positions import check_context, read_jsonl
from mmjax.generate.decoder import Decoder, generate
from mmjax.generate.sampling import Sampling
from mmjax.generate.workdir import load_workdir


@dataclasses.dataclass(frozen=True)
class Task:
    """A prompt (token ids) and the tokens that must follow it."""

    prompt: tuple
    answer: tuple


def needle_tasks(seed: int, *, vocab_size: int, context: int, facts: int = 1,
                 num_tasks: int = 20, key_length: int = 2, value_length: int = 2) -> list[Task]:
    """``num_tasks`` prompts of exactly ``context`` tokens holding ``facts`` facts
    (:func:`mmjax.data.recall.needle`)."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    rng = np.random.default_rng(seed)
    tasks = []
    for _ in range(num_tasks):
        prompt, answer = needle(rng, vocab_size=vocab_size, context=context, facts=facts,
                                key_length=key_length, value_length=value_length)
        tasks.append(Task(tuple(prompt), answer))
    return tasks


def copy_oracle(prompt, vocab_size: int, value_length: int) -> list[int]:
    """What a perfect copy model answers: the value stored under the queried key."""
    key_mark, val_mark, query_mark = markers(vocab_size)
    prompt = list(prompt)
    q = len(prompt) - 1 - prompt[::-1].index(query_mark)
    key = prompt[q + 1:len(prompt) - 1]
    pattern = [key_mark, *key, val_mark]
    for i in range(q - len(pattern) + 1):
        if prompt[i:i + len(pattern)] == pattern:
            return prompt[i + len(pattern):i + len(pattern) + value_length]
    return []


def exact_match(continuations, tasks) -> float:
    """The fraction of tasks whose continuation starts with the answer."""
    hits = [list(c[:len(t.answer)]) == list(t.answer)
            for c, t in zip(continuations, tasks, strict=True)]
    return float(np.mean(hits))


def continue_greedily(model, params, prompts, max_new_tokens: int,
                      batch_size: int = 4) -> list[list[int]]:
    """Greedy continuations of ``prompts`` with the model's caches, ``batch_size`` at a time."""
    longest = max(len(p) for p in prompts)
    decoder = Decoder(model, params, batch_size=batch_size,
                      cache_length=longest + max_new_tokens)
    out = []
    for i in range(0, len(prompts), batch_size):
        out += generate(decoder, [list(p) for p in prompts[i:i + batch_size]],
                        max_new_tokens=max_new_tokens, sampling=Sampling(temperature=0))
    return out


def needle_accuracy(workdir, *, contexts, facts=(1,), num_tasks: int = 20, seed: int = 0,
                    value_length: int = 2, memory: dict | None = None) -> list[dict]:
    """Exact-match accuracy of a checkpoint on the synthetic tasks at each context length.

    ``memory``: model settings that change how the long-term memory is read, not what was
    learned (``long_term_memory``, ``long_term_page``, ``long_term_top_pages`` of a v2
    Memory Mosaic: :func:`mmjax.ops.retrieve_paged`).
    """
    trained = load_workdir(workdir, model_overrides=memory)
    vocab = trained.model.vocab_size
    described = describe_memory(trained.model)
    for context in contexts:
        check_context(trained, context + value_length, str(workdir))
    rows = []
    for n in facts:
        for context in contexts:
            tasks = needle_tasks(seed, vocab_size=vocab, context=context, facts=n,
                                 num_tasks=num_tasks, value_length=value_length)
            got = continue_greedily(trained.model, trained.params, [t.prompt for t in tasks],
                                   value_length)
            rows.append({"task": "needle" if n == 1 else f"{n} facts", "facts": n,
                         "context": context, "memory": described,
                         "accuracy": exact_match(got, tasks)})
    return rows


def describe_memory(model) -> str:
    """``"exact"``, or ``"paged U x W"`` for a paged long-term memory (``U`` pairs a page,
    ``W`` pages kept)."""
    if getattr(model, "long_term_memory", "exact") != "paged":
        return "exact"
    return f"paged {model.long_term_page} x {model.long_term_top_pages}"


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", "", text.lower())).strip()


def qa_match(continuation: str, answers) -> bool:
    """Whether the continuation starts with one of the answers (case, punctuation and spaces
    normalised)."""
    text = _normalise(continuation)
    return any(text.startswith(_normalise(a)) for a in answers)


def qa_tasks(path: str | pathlib.Path) -> list[dict]:
    """Read ``{"context", "question", "answers"}`` lines; one-line errors name the line."""
    tasks = []
    for number, item in read_jsonl(path, ("context", "question", "answers"), "--qa"):
        answers = item["answers"]
        if isinstance(answers, str):
            answers = [answers]
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise ValueError(f"--qa {path}:{number}: answers must be non-empty strings")
        tasks.append({"context": str(item["context"]), "question": str(item["question"]),
                      "answers": list(answers)})
    if not tasks:
        raise ValueError(f"--qa {path}: no question in the file")
    return tasks


def qa_accuracy(workdir, qa_file, *, max_new_tokens: int = 16) -> dict:
    """Exact-match accuracy (normalised prefix) on a JSONL of questions."""
    trained = load_workdir(workdir)
    if trained.tokenizer is None:
        raise FileNotFoundError(f"--workdir {workdir} has no tokenizer: question answering "
                                "needs text")
    tasks = qa_tasks(qa_file)
    tok = trained.tokenizer
    prompts = [[tok.eos_id] + ids for ids in
               tok.encode([f"{t['context']}\n{t['question']}\n" for t in tasks])]
    for prompt in prompts:
        check_context(trained, len(prompt) + max_new_tokens, str(workdir))
    got = continue_greedily(trained.model, trained.params, prompts, max_new_tokens)
    hits = [qa_match(tok.decode([ids])[0], t["answers"])
            for ids, t in zip(got, tasks, strict=True)]
    return {"task": "qa", "questions": len(tasks), "accuracy": float(np.mean(hits))}
