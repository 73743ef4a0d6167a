"""In-context language learning (the v1 paper's figure 9): metrics, the oracle, in-context
n-gram predictors.

The data (random automata, examples, held-out languages) is :mod:`mmjax.data.icll`.
Metrics, at each scored position (:func:`score`): accuracy (the model's most likely token is
one the automaton allows next) and the total variation distance between the model's
next-token distribution and the automaton's (probability on the separator or padding counts
as error). The oracle (:func:`oracle_probs`) scores 1 and 0; in-context n-gram predictors
(:func:`ngram_probs`) are the baselines of the paper's figure.
"""

from __future__ import annotations

import json
import pathlib
import warnings

import jax
import numpy as np

from mmjax.config import PAIR_MODELS, icll_config
from mmjax.data.icll import NUM_LETTERS, SEPARATOR, VOCAB_SIZE, Example, ICLLCorpus

# The v1 paper's figure 9 (held-out accuracy at N = 100 / 1000 / 2500 training languages).
PAPER_ACCURACY = {"memory_mosaic": {100: 0.925, 1000: 0.934, 2500: 0.941},
                  "transformer": {100: 0.523, 1000: 0.533, 2500: 0.925}}


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


# ----------------------------------------------------------------------------- training


def model_probs(model, params, examples: list[Example], batch_size: int = 16) -> np.ndarray:
    """Next-token distributions ``[examples, length - 1, VOCAB_SIZE]`` of a trained model."""
    apply = jax.jit(lambda p, x: jax.nn.softmax(model.apply({"params": p}, x), axis=-1))
    tokens = np.stack([ex.tokens for ex in examples])
    out = [np.asarray(apply(params, tokens[i:i + batch_size, :-1]))[..., :VOCAB_SIZE]
           for i in range(0, len(tokens), batch_size)]
    return np.concatenate(out)


def mean_scores(probs: np.ndarray, examples: list[Example]) -> dict:
    """Mean accuracy and TVD over every scored position, and their curves by position."""
    scores = [score(p, ex) for p, ex in zip(probs, examples, strict=True)]
    acc = np.stack([s["accuracy"] for s in scores])
    tvd = np.stack([s["tvd"] for s in scores])
    with warnings.catch_warnings():  # positions no example scores: NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return {"accuracy": float(np.nanmean(acc)), "tvd": float(np.nanmean(tvd)),
                "accuracy_by_position": np.nanmean(acc, axis=0).tolist(),
                "tvd_by_position": np.nanmean(tvd, axis=0).tolist()}


def run(*, languages=(100, 1000, 2500), seeds=(0,), steps: int = 600, models=PAIR_MODELS,
        width: int = 64, context: int = 512, eval_languages: int = 256,
        output: str | None = None, log=print) -> list[dict]:
    """Train each model on each N with each seed; score it on held-out languages.

    Each run is :func:`mmjax.config.icll_config` (``configs/icll.py`` with its presets).

    Returns one row per (model, N, seed) and per (n-gram baseline, N, seed); with
    ``output`` writes ``icll.json`` there (rows with per-position curves).
    """
    from mmjax.models import build_model
    from mmjax.train.loop import train_and_evaluate

    rows = []
    for seed in seeds:
        for n in languages:
            corpus = ICLLCorpus(num_languages=n, eval_languages=eval_languages, seed=seed)
            held_out = corpus.examples("eval", context + 1)
            for k in (2, 3):
                probs = np.stack([ngram_probs(ex, k) for ex in held_out])
                rows.append({"model": f"in-context {k}-gram", "languages": n, "seed": seed,
                             **mean_scores(probs, held_out)})
            for name in models:
                config = icll_config(name, languages=n, steps=steps, seed=seed, width=width,
                                     context=context, eval_languages=eval_languages)
                result = train_and_evaluate(config, None, progress=False)
                model = build_model(config.model)
                probs = model_probs(model, result["state"].params, held_out)
                row = {"model": config.model.name, "languages": n, "seed": seed,
                       "eval_loss": float(result["eval_loss"]),
                       "params": int(sum(x.size for x in
                                         jax.tree.leaves(result["state"].params))),
                       **mean_scores(probs, held_out)}
                rows.append(row)
                log(f"N={n} seed={seed} {row['model']}: accuracy {row['accuracy']:.3f} "
                    f"TVD {row['tvd']:.3f} ({row['params']:,} parameters)")
    if output is not None:
        path = pathlib.Path(output)
        path.mkdir(parents=True, exist_ok=True)
        (path / "icll.json").write_text(json.dumps(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    """Mean (and spread over seeds) of accuracy and TVD per model and N, with the paper's
    accuracy beside."""
    names = list(dict.fromkeys(r["model"] for r in rows))
    ns = sorted({r["languages"] for r in rows})
    paper = {"memory_mosaic": "memory_mosaic", "gpt2": "transformer"}
    lines = ["| model | N | accuracy | TVD | seeds | paper accuracy |", "|---|---|---|---|---|---|"]
    for name in names:
        for n in ns:
            sel = [r for r in rows if r["model"] == name and r["languages"] == n]
            if not sel:
                continue
            acc = np.array([r["accuracy"] for r in sel])
            tvd = np.array([r["tvd"] for r in sel])
            ref = PAPER_ACCURACY.get(paper.get(name, ""), {}).get(n)
            lines.append(f"| {name} | {n} | {acc.mean():.3f} +- {acc.std():.3f} | "
                         f"{tvd.mean():.3f} +- {tvd.std():.3f} | {len(sel)} | "
                         f"{'' if ref is None else f'{ref:.3f}'} |")
    return "\n".join(lines)
