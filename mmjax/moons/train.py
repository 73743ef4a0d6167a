"""The three-moons task on mmjax's Trainer: batches, clipped squared loss, initialisation.

:func:`train` runs :class:`mmjax.train.loop.Trainer` on :func:`moons_task` (a config with
``task="moons"``): batches of observations from :class:`mmjax.moons.data.MoonsBatches` (the
training period triples; the trainer's evaluation reads the validation triple), the clipped
loss, and the memory initialised on observations. Checkpoints, resume and metrics are the
trainer's.

The official code (MLX) trains with ``AdamW(lr=linear 1e-2 -> 5e-6 over 500 steps,
weight_decay=0)``; MLX's Adam has **no bias correction**: ``m`` and ``v`` start at 0 and the
update ``lr * m / (sqrt(v) + eps)`` is used as is. The optimiser is mmjax's one factory,
:func:`mmjax.train.make_optimizer`, called with ``config.optimizer`` (``schedule="linear"``,
``bias_correction=False``: :func:`mmjax.train.optimizer.scale_by_adam_uncorrected`).
With ``eps = 2e-8`` (see ``mmjax/moons/config.py``) three steps from the same weights on
the same batch match the official MLX code to 2e-7 (``tests/test_moons_official.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mmjax.models import build_model
from mmjax.models.moons import identity_params
from mmjax.moons.data import MoonsBatches
from mmjax.train.checkpoint import load_params
from mmjax.train.loop import Task, train_and_evaluate

Array = jax.Array


def clipped_squares(pred_BxTxD: Array, target_BxTxD: Array, clip: float) -> Array:
    """``clip(pred - target, -clip, clip)^2``, elementwise."""
    return jnp.square(jnp.clip(pred_BxTxD - target_BxTxD, -clip, clip))


def clipped_loss(pred_BxTxD: Array, target_BxTxD: Array, clip: float) -> Array:
    """``mean(clip(pred - target, -clip, clip)^2)``: errors beyond ``clip`` give no gradient,
    so the net does not chase the large errors of a nearly empty memory."""
    return jnp.mean(clipped_squares(pred_BxTxD, target_BxTxD, clip))


def moons_loss(model, params, obs_BxT1xD: Array, *, clip: float, deterministic: bool = True,
               rngs=None):
    """The task's batch loss (``mmjax.train.step``): the memory's predictions of
    ``x_1..x_T`` from ``x_0..x_{T-1}`` against the observations, :func:`clipped_loss`.

    Returns ``(loss, loss_per_position_T, 1)``: a batch counts once (every batch has the same
    size), so the trainer's step is exactly ``grad(clipped_loss)``.
    """
    del deterministic, rngs  # the memory has no dropout and draws nothing
    x_BxTxD, y_BxTxD = obs_BxT1xD[:, :-1], obs_BxT1xD[:, 1:]
    squares_BxTxD = clipped_squares(model.apply({"params": params}, x_BxTxD), y_BxTxD, clip)
    return (jnp.mean(squares_BxTxD), jnp.mean(squares_BxTxD, axis=(0, 2)),
            jnp.ones((), jnp.int32))


def init_variables(model, rng: Array, batch_size: int, length: int):
    """Boxed variables of the memory, initialised on ``[batch, length, 2 M]`` observations
    (the values do not matter: only the shapes)."""
    return model.init(rng, jnp.zeros((batch_size, length, 2 * model.num_moons), jnp.float32))


def seed_keys(seed: int) -> tuple[Array, Array]:
    """``(init_rng, state_rng)``: the parameters from ``jax.random.key(seed)`` itself, as the
    runs reported in ``configs/moons.py`` were initialised; the state's key is never drawn
    from (no dropout)."""
    key = jax.random.key(seed)
    return key, jax.random.fold_in(key, 1)


def moons_task(config) -> Task:
    """The three-moons :class:`~mmjax.train.loop.Task` of ``config`` (``configs/moons.py``).

    Training batches: ``data.train_periods`` from ``default_rng(train.seed)``, whose first
    sequence is dropped (the loop before the trainer initialised the net on it: dropping it
    keeps the reported runs' batches). Validation batches (the trainer's evaluation):
    ``data.validation_periods`` from ``default_rng(eval.seed)``.
    """
    data = config.data

    def make_batches(split: str, sharding=None) -> MoonsBatches:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        train = split == "train"
        return MoonsBatches(data.train_periods if train else data.validation_periods,
                            batch_size=data.batch_size, length=data.context_length,
                            seed=config.train.seed if train else config.eval.seed,
                            dt=data.dt, grid_size=data.grid_size, sharding=sharding,
                            skip_sequences=1 if train else 0)

    return Task(name="moons",
                batch_loss=functools.partial(moons_loss, clip=config.train.clip),
                make_batches=make_batches, init_variables=init_variables, rngs=seed_keys)


def train(config, workdir=None, *, progress: bool = True) -> dict:
    """Train one net from ``config`` (``configs/moons.py``) with
    :func:`mmjax.train.loop.train_and_evaluate`.

    With ``workdir``, checkpoints go to ``WORKDIR/checkpoints`` (Orbax) and the same call
    resumes from them: the same net as an uninterrupted run, bit for bit.

    Returns ``train_and_evaluate``'s dict plus ``model``, ``params`` (host arrays) and
    ``losses`` (the training loss of each step run by this call).
    """
    out = train_and_evaluate(config, workdir, progress=progress, task=moons_task(config))
    return dict(out, model=build_model(config.model), params=jax.device_get(out["state"].params),
                losses=[h["loss"] for h in out["history"]])


def load_trained_params(workdir, num_moons: int = 3) -> dict:
    """The parameters of the latest checkpoint in a run's ``workdir`` (host arrays)."""
    params, _ = load_params(workdir, identity_params(num_moons), source="workdir")
    return jax.device_get(params)
