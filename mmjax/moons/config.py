"""The official three-moons recipe as an ``ml_collections.ConfigDict``.

``configs/moons.py`` wraps :func:`default_config` with presets; the notebook, which may run
without the repository's ``configs/`` folder (pip install in Colab), calls it directly.
The keys are the language-model configs' (``train.num_steps``, ``train.seed``,
``data.batch_size``, ``data.context_length``, ``optimizer.*``) plus ``task="moons"``, which
makes the trainer build the three-moons task (``mmjax.moons.train``).
"""

from __future__ import annotations

import ml_collections

from mmjax.config import make_config
from mmjax.moons.data import DT, GRID_SIZE, TRAIN_PERIODS, VALIDATION_PERIODS


def default_config(num_heads: int = 3, steps: int = 500, seed: int = 100):
    """Official recipe: batch 64, ``steps`` Adam steps (no bias correction), learning rate
    linear 1e-2 -> 5e-6, loss clipped at 0.5, bandwidth 50, sequences of 800; evaluation on
    512 sequences of the validation periods, 25-step rollouts, every context length 1..775."""
    if num_heads not in (1, 3):
        raise ValueError(f"num_heads must be 1 or 3, got {num_heads}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    # one value: the schedule decays over the run, also when --config.train.num_steps changes
    num_steps = ml_collections.FieldReference(steps)
    return make_config(
        task="moons",
        model=dict(
            name="moons_memory",
            num_moons=3,
            num_heads=num_heads,
            bandwidth=50.0,
            impl="xla",
            block_size=64,  # tiles of the blocked retrieval: 64 is fastest on CPU
        ),
        data=dict(
            train_periods=[list(p) for p in TRAIN_PERIODS],
            validation_periods=[list(p) for p in VALIDATION_PERIODS],
            context_length=800,
            batch_size=64,
            dt=DT,
            grid_size=GRID_SIZE,
        ),
        # The arguments of mmjax.train.make_optimizer: MLX's AdamW with weight decay 0 is Adam
        # without bias correction, on a linear schedule.
        optimizer=dict(
            learning_rate=1e-2,
            schedule="linear",
            min_lr=5e-6,
            total_steps=num_steps,
            b1=0.9,
            b2=0.999,
            # The official MLX code uses eps 1e-8, but on a real [2M, 2M] matrix whose 2x2
            # blocks hold each complex entry twice, each copy receiving half its gradient: on
            # the complex parameters that is eps 2e-8 (three steps then match the official
            # ones to 2e-7).
            eps=2e-8,
            weight_decay=0.0,
            grad_clip=0.0,  # none
            bias_correction=False,  # MLX Adam, as in the official code
        ),
        train=dict(num_steps=num_steps, seed=seed, clip=0.5, log_every=50),
        # A 54-parameter net: no data parallelism, every device runs the whole step, so a
        # run is the same on any number of devices.
        sharding=dict(mesh=(1, 1, -1)),
        checkpoint=dict(save_every=50),  # with a workdir (a few seconds of CPU between saves)
        eval=dict(
            num_sequences=512,
            horizon=25,
            max_context=775,  # context + horizon fits in the 800 observations
            context_stride=1,
            seed=100,
        ),
    )
