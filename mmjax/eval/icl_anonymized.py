"""In-context classification as shots grow, with semantic and anonymised labels (the v2
paper's in-context learning): ``python -m mmjax.eval icl_anonymized``.

Each model of :data:`mmjax.config.STUDY_MODELS` is pretrained at context 512 on episodes of
the training classes (:mod:`mmjax.data.episodes`, :func:`mmjax.config.study_config`),
then shown 1, 2, 4, ..., 64 shots of 4 held-out classes and a query. The prediction is the
episode's candidate label with the highest logit after the query (no sampling); accuracy is
the fraction right. With anonymised labels only the shots say which label is which class;
with semantic ones, the held-out classes' labels are as new to the model as anonymised ones,
but the same in every episode. The v2 paper: MM v2's accuracy rises with the shots, a
transformer's does not (more shots can hurt), and separate short/long attention does not
close the gap; what is and is not comparable: ``docs/results.md``.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from mmjax.config import STUDY_CONTEXT, STUDY_MODELS, STUDY_STEPS
from mmjax.data.episodes import Classes, episode
from mmjax.eval import studies

SHOTS = (1, 2, 4, 8, 16, 32, 64)
WAYS = 4
KINDS = ("semantic", "anonymised")


def tasks(seed: int, shots: int, num: int, *, anonymised: bool, classes: Classes = Classes()):
    """``num`` episodes of ``shots`` shots of ``WAYS`` held-out classes: ``(tokens [num, T],
    answers [num], candidates [num, WAYS])`` (seeded; the same for every model)."""
    rng = np.random.default_rng([seed, shots, int(anonymised)])
    rows = [episode(rng, classes, rng.choice(classes.held_out, WAYS, replace=False), shots,
                    anonymised=anonymised) for _ in range(num)]
    return (np.asarray([r[0] for r in rows], np.int32), np.asarray([r[1] for r in rows]),
            np.asarray([r[2] for r in rows]))


@functools.cache
def _last_logits(model):
    """The jitted logits of the last position (one per model: fine-tuning asks again)."""
    return jax.jit(lambda p, x: model.apply({"params": p}, x)[:, -1])


def accuracy(model, params, tokens, answers, candidates, batch_size: int = 16) -> float:
    """The fraction of episodes whose highest-logit candidate after the query is the answer."""
    last = _last_logits(model)
    right = []
    for i in range(0, len(tokens), batch_size):
        logits = np.asarray(last(params, tokens[i:i + batch_size]))
        cand = candidates[i:i + batch_size]
        chosen = cand[np.arange(len(cand)), np.argmax(
            np.take_along_axis(logits, cand, axis=1), axis=1)]
        right += list(chosen == answers[i:i + batch_size])
    return float(np.mean(right))


def run(*, seeds=(0,), steps: int = STUDY_STEPS, learning_rates=(3e-3,), models=STUDY_MODELS,
        shots=SHOTS, num_tasks: int = 64, output: str | None = None,
        log=print) -> list[dict]:
    """Pretrain each model with each seed and measure its accuracy at each number of shots,
    with semantic and anonymised labels. Rows (:mod:`mmjax.eval.studies`) name the model and
    the label kind (``"v2, anonymised"``); with ``output`` writes ``icl_anonymized.json`` and
    ``.png`` there after every model."""
    rows = []
    for seed in seeds:
        for model in studies.trained_models(models, corpus="episodes", steps=steps,
                                            seed=seed, learning_rates=learning_rates):
            name = model.name
            for kind in KINDS:
                for k in shots:
                    value = accuracy(model.model, model.params,
                                     *tasks(seed, k, num_tasks, anonymised=kind == KINDS[1]))
                    rows.append({"model": f"{name}, {kind}", "seed": seed, "x": k,
                                 "value": value, **studies.describe(model)})
                log(f"seed {seed} {name} ({model.num_params:,} parameters, trained in "
                    f"{model.seconds:.0f} s), {kind} labels: accuracy "
                    + " ".join(f"{r['value']:.2f}" for r in rows[-len(shots):])
                    + f" at {list(shots)} shots")
            if output is not None:  # after every model: a stopped run keeps what it measured
                studies.write(rows, output, "icl_anonymized", x_label="shots",
                              y_label="accuracy",
                              title=f"{WAYS}-way classification of held-out classes, "
                                    f"trained at {STUDY_CONTEXT} tokens")
    return rows
