"""In-context classification: k-shot prompts from a JSONL of ``{"text", "label"}``, with the
semantic labels or anonymized ones, accuracy against the number of shots (the v2 paper: a
Memory Mosaic improves with shots; transformers degrade when the labels are anonymized).

A prompt is ``k`` demonstrations and a query, one ``Input: TEXT`` / ``Label: LABEL`` pair of
lines each (the query's label left out). The model chooses among the labels by the
log-likelihood of each label's tokens after the prompt (no sampling, no parsing). With
``anonymize`` every label is replaced, in the demonstrations and among the choices, by an
arbitrary word of :data:`ANONYMOUS` (a fixed permutation per prompt), so that only the
demonstrations say what a label means. Demonstrations are drawn from the other examples
with a seed, the same for every model.

:func:`synthetic_examples` writes a small topic dataset (sentences built from per-topic
words), so the command is tested without downloads.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.eval.positions import read_jsonl
from mmjax.generate.decoder import model_has_position_table
from mmjax.generate.workdir import Trained, load_workdir

ANONYMOUS = ("foo", "bar", "baz", "qux", "zap", "wim", "dax", "lug")
TOPICS = {
    "sport": ("ball", "team", "goal", "match", "coach", "score", "player", "race"),
    "weather": ("rain", "cloud", "wind", "storm", "sun", "snow", "cold", "warm"),
    "food": ("bread", "soup", "apple", "cake", "cheese", "rice", "salad", "milk"),
}
FILLER = ("the", "a", "was", "very", "today", "and", "we", "saw", "with", "some")


def synthetic_examples(seed: int, num: int) -> list[dict]:
    """``num`` ``{"text", "label"}`` examples over :data:`TOPICS`: sentences of filler words
    and three words of their topic."""
    rng = np.random.default_rng(seed)
    labels = list(TOPICS)
    out = []
    for _ in range(num):
        label = labels[int(rng.integers(len(labels)))]
        words = list(rng.choice(TOPICS[label], 3)) + list(rng.choice(FILLER, 4))
        rng.shuffle(words)
        out.append({"text": " ".join(words), "label": label})
    return out


def read_examples(path: str | pathlib.Path) -> list[dict]:
    """Read ``{"text", "label"}`` lines; one-line errors name the line."""
    examples = [{"text": str(item["text"]), "label": str(item["label"])}
                for _, item in read_jsonl(path, ("text", "label"), "--data")]
    labels = {e["label"] for e in examples}
    if len(labels) < 2:
        raise ValueError(f"--data {path}: needs examples of at least 2 labels, got "
                         f"{sorted(labels)}")
    if len(labels) > len(ANONYMOUS):
        raise ValueError(f"--data {path}: at most {len(ANONYMOUS)} labels can be anonymized, "
                         f"got {len(labels)}")
    return examples


def build_prompt(demos, query_text: str, names: dict) -> str:
    """The k-shot prompt, ending just before the query's label."""
    lines = [f"Input: {d['text']}\nLabel: {names[d['label']]}\n" for d in demos]
    return "".join(lines) + f"Input: {query_text}\nLabel:"


def _label_logprob_fn(model):
    @jax.jit
    def fn(params, tokens_BxT, first_B, last_B):
        logits = model.apply({"params": params}, tokens_BxT[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        target = jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
        pos = jnp.arange(target.shape[1])[None]
        inside = (pos >= first_B[:, None] - 1) & (pos < last_B[:, None] - 1)
        return jnp.sum(jnp.where(inside, target, 0.0), axis=1)

    return fn


def choose_labels(trained: Trained, prompts, choices) -> list[int]:
    """For each prompt, the index of the choice whose tokens are most likely after it."""
    tok = trained.tokenizer
    score = _label_logprob_fn(trained.model)
    prompt_ids = [[tok.eos_id] + ids for ids in tok.encode(prompts)]
    choice_ids = tok.encode([" " + c for c in choices])
    rows, spans = [], []
    for ids in prompt_ids:
        for c in choice_ids:
            rows.append(ids + c)
            spans.append((len(ids), len(ids) + len(c)))
    longest = max(map(len, rows))
    length = 1 << max(1, (longest - 1).bit_length())  # few shapes, few compilations
    if model_has_position_table(trained.model):  # learned positions: no room to round up
        limit = trained.model.context_length
        if longest - 1 > limit:
            raise ValueError(f"a prompt of {longest - 1} tokens exceeds the {limit} learned "
                             "positions of this GPT2: use fewer shots")
        length = min(length, limit + 1)
    tokens = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    first, last = np.array([s[0] for s in spans]), np.array([s[1] for s in spans])
    totals = np.concatenate([np.asarray(score(trained.params, tokens[i:i + 8], first[i:i + 8],
                                              last[i:i + 8]))
                             for i in range(0, len(rows), 8)])
    return list(np.argmax(totals.reshape(len(prompts), len(choices)), axis=1))


def accuracy_by_shots(workdir, examples, *, shots=(0, 1, 2, 4, 8), queries: int = 32,
                      anonymize: bool = False, seed: int = 0) -> list[dict]:
    """Accuracy of a checkpoint with ``k`` demonstrations, for each ``k`` in ``shots``."""
    trained = load_workdir(workdir)
    if trained.tokenizer is None:
        raise FileNotFoundError(f"--workdir {workdir} has no tokenizer: classification "
                                "prompts are text")
    labels = sorted({e["label"] for e in examples})
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(examples), size=min(queries, len(examples)), replace=False)
    rows = []
    for k in shots:
        if k > len(examples) - 1:
            raise ValueError(f"{k} shots need more than {len(examples)} examples")
        prompts, names_per_prompt, truth = [], [], []
        for q in picked:
            others = [i for i in range(len(examples)) if i != q]
            demos = [examples[i] for i in rng.choice(others, size=k, replace=False)]
            if anonymize:
                words = list(rng.permutation(ANONYMOUS)[:len(labels)])
                names = dict(zip(labels, words, strict=True))
            else:
                names = {label: label for label in labels}
            prompts.append(build_prompt(demos, examples[q]["text"], names))
            names_per_prompt.append(names)
            truth.append(labels.index(examples[q]["label"]))
        # the choices must be in label order for every prompt: score prompt by prompt group
        correct = 0
        for names_group in _group(names_per_prompt):
            idx = [i for i, n in enumerate(names_per_prompt) if n == names_group]
            chosen = choose_labels(trained, [prompts[i] for i in idx],
                                   [names_group[label] for label in labels])
            correct += sum(int(c == truth[i]) for c, i in zip(chosen, idx, strict=True))
        rows.append({"shots": k, "anonymized": anonymize, "queries": len(picked),
                     "accuracy": correct / len(picked)})
    return rows


def _group(names_list):
    """The distinct label-name mappings, in first-seen order."""
    seen = []
    for names in names_list:
        if names not in seen:
            seen.append(names)
    return seen

