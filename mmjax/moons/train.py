"""Training of the three-moons memory: clipped squared loss, Adam as in the official recipe.

The official code (MLX) trains with ``AdamW(lr=linear 1e-2 -> 5e-6 over 500 steps,
weight_decay=0)``; MLX's Adam has **no bias correction**: ``m`` and ``v`` start at 0 and the
update ``lr * m / (sqrt(v) + eps)`` is used as is. Compared with bias-corrected Adam the
step is ``(1 - b1^t) / sqrt(1 - b2^t)`` times larger: 3.2 at step 1, 6.6 at step 12, still
1.6 at step 500. ``bias_correction=False`` (the default of ``configs/moons.py``)
reproduces that with :func:`scale_by_adam_uncorrected`; ``True`` uses ``optax.adam``.
With ``eps = 2e-8`` (see ``mmjax/moons/config.py``) three steps from the same weights on
the same batch match the official MLX code to 2e-7 (``tests/test_moons_official.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.moons.data import sample_batch
from mmjax.moons.model import MoonsMemory

Array = jax.Array


class AdamState(NamedTuple):
    mu: Any
    nu: Any


def scale_by_adam_uncorrected(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """Adam's scaling without bias correction (as MLX's ``optim.Adam``):
    ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``, update ``m / (sqrt(v) + eps)``."""

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return AdamState(mu=zeros, nu=zeros)

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
        return updates, AdamState(mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(train_config) -> optax.GradientTransformation:
    """Linear learning rate ``learning_rate -> final_learning_rate`` over ``steps``."""
    schedule = optax.linear_schedule(train_config.learning_rate,
                                     train_config.final_learning_rate, train_config.steps)
    if train_config.bias_correction:
        scale = optax.scale_by_adam(b1=train_config.b1, b2=train_config.b2, eps=train_config.eps)
    else:
        scale = scale_by_adam_uncorrected(b1=train_config.b1, b2=train_config.b2,
                                          eps=train_config.eps)
    return optax.chain(scale, optax.scale_by_learning_rate(schedule))


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
    optimizer = make_optimizer(config.train)
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
