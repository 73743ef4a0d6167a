"""How fast fine-tuning teaches a pretrained model a new domain (the v2 paper's fine-tuning
efficiency): ``python -m mmjax.eval finetune_speed``.

MM v2, LLaMA and MM v2 without long-term memory (equal in parameters) are pretrained on
episodes of the training classes (:func:`mmjax.config.study_config`, as in
``icl_anonymized``), then fine-tuned on episodes of the held-out classes with their
semantic labels (:mod:`mmjax.data.episodes`, ``domain="new"``; AdamW at a constant 1e-3,
mini-batches of 4 x 512 tokens).
After 0, 1, 2, 8, 32 and 800 fine-tuning mini-batches each model answers zero-shot queries
of the new classes (the input alone, then ``LABEL``): only what fine-tuning put in the
weights can answer them. The v2 paper: one mini-batch gives MM v2 +22%, two reach its best,
and a transformer after 800 stays below; what is and is not comparable:
``docs/results.md``.
"""

from __future__ import annotations

import jax

from mmjax.config import STUDY_STEPS, study_config
from mmjax.eval import icl_anonymized, studies

BATCHES = (0, 1, 2, 8, 32, 800)
MODELS = ("v2", "llama", "v2_no_long_term")
LEARNING_RATE = 1e-3
# Rows of 512 tokens per fine-tuning mini-batch: the claim counts mini-batches, and 800 of
# 4 x 512 tokens (a quarter of pretraining's) keep the study within 30 minutes per seed.
FINETUNE_ROWS = 4


def finetune_config(model: str, *, steps: int, seed: int = 0):
    """The fine-tuning run: the pretraining config on the new domain, a constant rate,
    mini-batches of :data:`FINETUNE_ROWS` rows (rounded up to a multiple of the devices)."""
    config = study_config(model, corpus="episodes", steps=steps, seed=seed)
    config.data.corpus_options = dict(domain="new", anonymised=0.0)
    devices = jax.device_count()
    config.data.batch_size = -(-FINETUNE_ROWS // devices) * devices
    config.optimizer.update(learning_rate=LEARNING_RATE, min_lr=LEARNING_RATE,
                            warmup_steps=0, total_steps=steps)
    return config


def zero_shot_accuracy(model, params, seed: int, num_tasks: int) -> float:
    """Accuracy on queries of the new classes with no shot before them."""
    return icl_anonymized.accuracy(model, params, *icl_anonymized.tasks(
        seed, 0, num_tasks, anonymised=False))


def finetune_curve(pretrained: studies.TrainedModel, config, batches, *, seed: int,
                   num_tasks: int) -> dict:
    """``{mini-batches: zero-shot accuracy}`` along one fine-tuning run from the pretrained
    parameters (the accuracy after ``k`` batches is that of the run's step ``k``)."""
    from mmjax.train.loop import Trainer

    trainer = Trainer(config)
    try:
        state = trainer.init_state()
        state = state.replace(params=jax.tree.map(  # the pretrained weights, laid out
            lambda p, s: jax.device_put(p, s.sharding), pretrained.params, state.params))
        curve, step = {}, 0
        for target in sorted(batches):
            while step < target:
                state, _ = trainer.train_step(state, trainer.batch(step))
                step += 1
            curve[target] = zero_shot_accuracy(pretrained.model, state.params, seed,
                                               num_tasks)
        return curve
    finally:
        trainer.close()


def run(*, seeds=(0,), pretrain_steps: int = STUDY_STEPS, learning_rates=(3e-3,), batches=BATCHES,
        models=MODELS, num_tasks: int = 64, output: str | None = None, log=print) -> list[dict]:
    """Pretrain each model with each seed, fine-tune it and measure the zero-shot accuracy on
    the new domain after each number of ``batches``. Rows: :mod:`mmjax.eval.studies`; with
    ``output`` writes ``finetune_speed.json`` and ``.png`` there after every model."""
    rows = []
    for seed in seeds:
        for model in studies.trained_models(models, corpus="episodes",
                                            steps=pretrain_steps, seed=seed,
                                            learning_rates=learning_rates):
            name = model.name
            curve = finetune_curve(model, finetune_config(name, steps=max(max(batches), 1),
                                                          seed=seed),
                                   batches, seed=seed, num_tasks=num_tasks)
            for k, value in curve.items():
                rows.append({"model": name, "seed": seed, "x": k, "value": value,
                             **studies.describe(model)})
            log(f"seed {seed} {name} ({model.num_params:,} parameters): zero-shot accuracy "
                + " ".join(f"{v:.2f}" for v in curve.values())
                + f" after {list(curve)} fine-tuning batches")
            if output is not None:  # after every model: a stopped run keeps what it measured
                studies.write(rows, output, "finetune_speed", x_label="fine-tuning mini-batches",
                              y_label="zero-shot accuracy, new classes",
                              title="fine-tuning on held-out classes", x_scale="symlog")
    return rows
