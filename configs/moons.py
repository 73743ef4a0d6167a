"""Three moons: the toy experiment of Memory Mosaics (arXiv 2405.06394, section 5, appendix A).

Command (CPU; on 2 shared cores training took 49-94 s for 1 head and 82-143 s for 3 heads,
the evaluation at every context length 86-253 s)::

    python -m mmjax.moons --config configs/moons.py:heads=3 --workdir /tmp/moons3
    python -m mmjax.moons --config configs/moons.py:heads=1 --workdir /tmp/moons1

The net is trained by mmjax's trainer (``config.task = "moons"``): Orbax checkpoints in
``WORKDIR/checkpoints`` every 50 steps, so the same command resumes an interrupted run.

Presets (the arg after ``:``, comma-separated): ``heads=1`` or ``heads=3`` (default 3),
``steps=N`` (training steps, default 500), ``seed=N`` (``train.seed``, default 100), and
``tiny`` (a CPU smoke run: sequences of 60, batch 8, 20 steps, the error at 5 contexts of 4
sequences). Any field can also be overridden with ``--config.train.num_steps=50`` etc. (the
optimiser's arguments are in ``config.optimizer``; its schedule follows ``train.num_steps``).

Expected result (validation periods [1, 2, 3] = 44.4, 88.9, 133.3 steps, lcm 266.7 steps;
error = mean absolute error of 25 autoregressive predictions, aligned):

* 3 heads: the error drops at each period (44.4, 88.9, 133.3 steps; again at 177.8 = 4 x 44.4)
  to 0.063 on contexts 175-250; mean on contexts 150-250: 0.067-0.087 (5 seeds), 0.12-0.16
  times the 1-head value. Learned |W_k|, |W_v|, |W_z| are permutation matrices up to scale
  (every row's largest entry holds >= 99.9 % of its squared mass) in 5/5 seeds.
* 1 head: error 0.54 until the lcm (266.7 steps), then a sharp fall to 0.23-0.25 (0.26 after
  two lcms). Not below 0.1, and neither is the official code's own net (0.24 here, 0.37 with
  its one-step-off metric; ``tests/fixtures/moons_official_mlx.json``). The training loss
  prefers extrapolating from the most recent pairs over the sharper kernel that would reach
  0.02 (``benchmarks/moons_one_head.py``).

Reproduce over 5 seeds: ``python benchmarks/moons_seeds.py --seeds 5 --workdir DIR``.
"""

from __future__ import annotations

from mmjax.config import parse_presets
from mmjax.moons.config import default_config

PRESETS = ("tiny",)
VALUES = ("heads", "steps", "seed")


def get_config(arg: str | None = None):
    presets = parse_presets(arg, PRESETS, VALUES)
    tiny = "tiny" in presets
    config = default_config(num_heads=presets.get("heads", 3),
                            steps=presets.get("steps", 20 if tiny else 500),
                            seed=presets.get("seed", 100))
    if tiny:
        config.data.update(context_length=60, batch_size=8)
        config.train.log_every = 5
        config.checkpoint.save_every = 10
        config.eval.update(num_sequences=4, max_context=30, context_stride=7)
    return config
