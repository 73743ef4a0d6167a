"""Three moons: the toy experiment of Memory Mosaics (arXiv 2405.06394, section 5, appendix A).

Command (CPU, about TIME_PLACEHOLDER per net)::

    python -m mmjax.moons --config configs/moons.py:heads=3 --workdir /tmp/moons3
    python -m mmjax.moons --config configs/moons.py:heads=1 --workdir /tmp/moons1

Presets (the arg after ``:``, comma-separated ``key=value``): ``heads=1`` or ``heads=3``
(default 3), ``steps=N`` (training steps), ``seed=N``. Any field can also be overridden with
``--config.train.steps=50`` etc.

Expected result (validation periods [1, 2, 3] = 44.4, 88.9, 133.3 steps, lcm 266.7 steps;
error = mean absolute error of 25 autoregressive predictions, aligned):
RESULTS_PLACEHOLDER
"""

from __future__ import annotations

import ml_collections

from mmjax.moons.data import DT, GRID_SIZE, TRAIN_PERIODS, VALIDATION_PERIODS

PRESET_KEYS = ("heads", "steps", "seed")


def parse_preset(arg: str | None) -> dict[str, int]:
    """``"heads=3,steps=10"`` -> ``{"heads": 3, "steps": 10}``."""
    out: dict[str, int] = {}
    if not arg:
        return out
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in PRESET_KEYS:
            raise ValueError(f"config arg items must be KEY=INT with KEY in {PRESET_KEYS}, "
                             f"got {item!r}")
        try:
            out[key] = int(value)
        except ValueError:
            raise ValueError(f"config arg {key} must be an integer, got {value!r}") from None
    if out.get("heads", 3) not in (1, 3):
        raise ValueError(f"config arg heads must be 1 or 3, got {out['heads']}")
    return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = parse_preset(arg)
    config = ml_collections.ConfigDict()
    config.seed = preset.get("seed", 100)

    config.model = ml_collections.ConfigDict()
    config.model.num_moons = 3
    config.model.num_heads = preset.get("heads", 3)
    config.model.bandwidth = 50.0
    config.model.impl = "xla"
    config.model.block_size = 64  # tiles of the blocked retrieval: 64 is fastest on CPU

    config.data = ml_collections.ConfigDict()
    config.data.train_periods = [list(p) for p in TRAIN_PERIODS]
    config.data.validation_periods = [list(p) for p in VALIDATION_PERIODS]
    config.data.length = 800
    config.data.dt = DT
    config.data.grid_size = GRID_SIZE

    config.train = ml_collections.ConfigDict()
    config.train.steps = preset.get("steps", 500)
    config.train.batch_size = 64
    config.train.learning_rate = 1e-2
    config.train.final_learning_rate = 5e-6
    config.train.b1 = 0.9
    config.train.b2 = 0.999
    config.train.eps = 1e-8
    config.train.bias_correction = False  # MLX Adam, as in the official code
    config.train.clip = 0.5

    config.eval = ml_collections.ConfigDict()
    config.eval.num_sequences = 512
    config.eval.horizon = 25
    config.eval.max_context = 775  # context + horizon fits in the 800 observations
    config.eval.context_stride = 1
    config.eval.seed = 100
    return config
