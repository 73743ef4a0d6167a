"""Training of the three-moons memory: clipped squared loss, Adam as in the official recipe.

The official code (MLX) trains with ``AdamW(lr=linear 1e-2 -> 5e-6 over 500 steps,
weight_decay=0)``; MLX's Adam has **no bias correction**: ``m`` and ``v`` start at 0 and the
update ``lr * m / (sqrt(v) + eps)`` is used as is. The optimiser is mmjax's one factory,
:func:`mmjax.train.make_optimizer`, called with ``config.optimizer`` (``schedule="linear"``,
``bias_correction=False``: :func:`mmjax.train.optimizer.scale_by_adam_uncorrected`) and
``total_steps=config.train.steps``.
With ``eps = 2e-8`` (see ``mmjax/moons/config.py``) three steps from the same weights on
the same batch match the official MLX code to 2e-7 (``tests/test_moons_official.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.moons.data import sample_batch
from mmjax.moons.model import MoonsMemory
from mmjax.train.optimizer import make_optimizer

Array = jax.Array


def clipped_loss(pred_BxTxD: Array, target_BxTxD: Array, clip: float) -> Array:
    """``mean(clip(pred - target, -clip, clip)^2)``: errors beyond ``clip`` give no gradient,
    so the net does not chase the large errors of a nearly empty memory."""
    diff = jnp.clip(pred_BxTxD - target_BxTxD, -clip, clip)
    return jnp.mean(jnp.square(diff))


def make_model(model_config) -> MoonsMemory:
    known = {"num_moons", "num_heads", "bandwidth", "impl", "block_size", "skip"}
    unknown = set(model_config.keys()) - known
    if unknown:
        raise ValueError(f"config.model has unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return MoonsMemory(**dict(model_config))


def make_train_step(model: MoonsMemory, optimizer: optax.GradientTransformation,
                    clip: float) -> Callable:
    """A jitted ``(params, opt_state, x, y) -> (params, opt_state, loss)``."""

    def loss_fn(params, x_BxTxD, y_BxTxD):
        return clipped_loss(model.apply({"params": params}, x_BxTxD), y_BxTxD, clip)

    @jax.jit
    def step(params, opt_state, x_BxTxD, y_BxTxD):
        loss, grads = jax.value_and_grad(loss_fn)(params, x_BxTxD, y_BxTxD)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def train(config, *, progress: bool = True, log: Callable[[int, float], None] | None = None):
    """Train one net from ``config`` (see ``configs/moons.py``).

    Returns:
      ``(model, params, losses)``: unboxed parameters and the loss of every step.
    """
    model = make_model(config.model)
    rng = np.random.default_rng(config.seed)
    sample = functools.partial(sample_batch, rng, config.data.train_periods,
                               length=config.data.length, dt=config.data.dt,
                               grid_size=config.data.grid_size)
    x_BxTxD, _ = sample(batch_size=1)
    params = nn.meta.unbox(model.init(jax.random.key(config.seed), x_BxTxD)["params"])
    optimizer = make_optimizer(**config.optimizer, total_steps=config.train.steps)
    opt_state = optimizer.init(params)
    step_fn = make_train_step(model, optimizer, config.train.clip)
    losses = []
    steps = range(config.train.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"train {config.model.num_heads} head(s)")
    pending = None
    for i in steps:
        x_BxTxD, y_BxTxD = sample(batch_size=config.train.batch_size)
        params, opt_state, loss = step_fn(params, opt_state, x_BxTxD, y_BxTxD)
        if pending is not None:  # read the previous loss: no host sync on the current step
            losses.append(float(pending))
            if log is not None:
                log(i - 1, losses[-1])
        pending = loss
    if pending is not None:
        losses.append(float(pending))
    return model, params, losses
