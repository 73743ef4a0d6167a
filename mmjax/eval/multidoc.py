"""New-knowledge storage past the training length (the v2 paper's multi-document question
answering): ``python -m mmjax.eval multidoc``.

Each model of :data:`mmjax.config.STUDY_MODELS` is trained at context 512
(:func:`mmjax.config.study_config`, ``configs/studies.py``) on the
``multidoc`` corpus (:mod:`mmjax.data.multidoc`: documents of facts about entities, and
questions about earlier documents of the row), then asked questions at the end of prompts
of 512, 1k, 2k and 4k tokens (:func:`mmjax.data.multidoc.multidoc_task`, up to 8x the
training length). A task counts when the greedy continuation is the asked value (exact
match). The v2 paper reports the same kind of curve on real documents at 4k-64k; what is and
is not comparable: ``docs/results.md``.
"""

from __future__ import annotations

import numpy as np

from mmjax.config import STUDY_CONTEXT, STUDY_MODELS, STUDY_STEPS
from mmjax.data.multidoc import Documents, multidoc_task
from mmjax.eval import studies
from mmjax.eval.needles import continue_greedily

CONTEXTS = (512, 1024, 2048, 4096)
# The v2 paper's multi-document QA (exact match at 4k / 8k / 16k / 32k / 64k tokens; the
# transformer fails at 64k). Real documents and 1.5B-8B models: the shape of the curve is
# what compares, not the numbers.
PAPER = {"memory_mosaic_v2": {4096: 0.589, 8192: 0.555, 16384: 0.549, 32768: 0.534,
                              65536: 0.464},
         "transformer": {4096: 0.512, 8192: 0.488, 16384: 0.447, 32768: 0.411, 65536: None}}


def tasks(seed: int, context: int, num: int) -> list[tuple[list[int], tuple]]:
    """``num`` questions at the end of ``context`` tokens of documents (seeded; the same for
    every model)."""
    rng = np.random.default_rng([seed, context])
    return [multidoc_task(rng, context=context) for _ in range(num)]


def exact_match(model, params, questions) -> float:
    """The fraction of ``questions`` whose greedy continuation is the answer."""
    length = Documents().value_length
    got = continue_greedily(model, params, [p for p, _ in questions], length, batch_size=8)
    return float(np.mean([tuple(g[:length]) == a for g, (_, a) in zip(got, questions,
                                                                        strict=True)]))


def run(*, seeds=(0,), steps: int = STUDY_STEPS, learning_rates=(3e-3,), models=STUDY_MODELS,
        contexts=CONTEXTS, num_tasks: int = 32, output: str | None = None,
        log=print) -> list[dict]:
    """Train each model with each seed and measure its exact match at each context.

    Returns one row per (model, seed, context) (:mod:`mmjax.eval.studies`); with ``output``
    writes ``multidoc.json`` and ``multidoc.png`` there after every model."""
    rows = []
    for seed in seeds:
        for model in studies.trained_models(models, corpus="multidoc", steps=steps,
                                            seed=seed, learning_rates=learning_rates):
            name = model.name
            for context in contexts:
                value = exact_match(model.model, model.params, tasks(seed, context, num_tasks))
                rows.append({"model": name, "seed": seed, "x": context, "value": value,
                             **studies.describe(model)})
                log(f"seed {seed} {name} ({model.num_params:,} parameters, trained in "
                    f"{model.seconds:.0f} s): exact match {value:.3f} at {context}")
            if output is not None:  # after every model: a stopped run keeps what it measured
                studies.write(rows, output, "multidoc", x_label="context (tokens)",
                              y_label="exact match",
                              title=f"multi-document QA, trained at {STUDY_CONTEXT} tokens")
    return rows
