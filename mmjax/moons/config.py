"""The official three-moons recipe as an ``ml_collections.ConfigDict``.

``configs/moons.py`` wraps :func:`default_config` with presets; the notebook, which may run
without the repository's ``configs/`` folder (pip install in Colab), calls it directly.
"""

from __future__ import annotations

from mmjax.moons.data import DT, GRID_SIZE, TRAIN_PERIODS, VALIDATION_PERIODS
from mmjax.train.config_lib import make_config


def default_config(num_heads: int = 3, steps: int = 500, seed: int = 100):
    """Official recipe: batch 64, ``steps`` Adam steps (no bias correction), learning rate
    linear 1e-2 -> 5e-6, loss clipped at 0.5, bandwidth 50, sequences of 800; evaluation on
    512 sequences of the validation periods, 25-step rollouts, every context length 1..775."""
    if num_heads not in (1, 3):
        raise ValueError(f"num_heads must be 1 or 3, got {num_heads}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return make_config(
        seed=seed,
        model=dict(
            num_moons=3,
            num_heads=num_heads,
            bandwidth=50.0,
            impl="xla",
            block_size=64,  # tiles of the blocked retrieval: 64 is fastest on CPU
        ),
        data=dict(
            train_periods=[list(p) for p in TRAIN_PERIODS],
            validation_periods=[list(p) for p in VALIDATION_PERIODS],
            length=800,
            dt=DT,
            grid_size=GRID_SIZE,
        ),
        # The arguments of mmjax.train.make_optimizer (total_steps is train.steps): MLX's
        # AdamW with weight decay 0 is Adam without bias correction, on a linear schedule.
        optimizer=dict(
            learning_rate=1e-2,
            schedule="linear",
            min_lr=5e-6,
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
        train=dict(steps=steps, batch_size=64, clip=0.5),
        eval=dict(
            num_sequences=512,
            horizon=25,
            max_context=775,  # context + horizon fits in the 800 observations
            context_stride=1,
            seed=100,
        ),
    )
