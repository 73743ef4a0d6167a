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
import json
import os
import pathlib
import zipfile
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


# Steps between two saves of the training state by :func:`train` (a few seconds on CPU).
SAVE_EVERY = 50


def save_state(path: pathlib.Path, step: int, params, opt_state, losses: list[float],
               rng: np.random.Generator, config_json: str) -> None:
    """Write the training state after ``step`` steps to ``path`` atomically (a temporary
    file, then a rename): a run killed mid-write keeps the previous state."""
    leaves = jax.tree.leaves((params, opt_state))
    arrays = {f"leaf_{i}": np.asarray(x) for i, x in enumerate(leaves)}
    arrays.update(step=np.int64(step), losses=np.asarray(losses, np.float64),
                  rng=np.array(json.dumps(rng.bit_generator.state)),
                  config=np.array(config_json))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_state(path: pathlib.Path, params, opt_state, rng: np.random.Generator,
               config_json: str):
    """The state saved by :func:`save_state`, shaped like ``(params, opt_state)``; ``rng`` is
    set to the saved position. Returns ``(step, params, opt_state, losses)``."""
    try:
        with np.load(path) as saved:
            if str(saved["config"]) != config_json:
                raise ValueError(f"{path} was saved by a run with another config; use another "
                                 "--workdir or delete the file")
            treedef = jax.tree.structure((params, opt_state))
            leaves = [jnp.asarray(saved[f"leaf_{i}"]) for i in range(treedef.num_leaves)]
            step, losses = int(saved["step"]), saved["losses"].tolist()
            rng.bit_generator.state = json.loads(str(saved["rng"]))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, ValueError) and "another config" in str(e):
            raise
        raise ValueError(f"cannot read the training state {path}: {e}") from None
    params, opt_state = jax.tree.unflatten(treedef, leaves)
    return step, params, opt_state, losses


def train(config, *, progress: bool = True, log: Callable[[int, float], None] | None = None,
          state_path: str | pathlib.Path | None = None, save_every: int = SAVE_EVERY):
    """Train one net from ``config`` (see ``configs/moons.py``).

    With ``state_path``, the training state (parameters, Adam's moments, the data sampler's
    position, the losses) is saved there every ``save_every`` steps and at the end, and a
    run that finds it resumes from it: the same net as an uninterrupted run, bit for bit.
    ``log(step, loss)`` is called for every step (one step late: no host sync).

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
    losses: list[float] = []
    first = 0
    config_json = config.to_json_best_effort(sort_keys=True)
    state_path = pathlib.Path(state_path) if state_path is not None else None
    if state_path is not None and state_path.exists():
        first, params, opt_state, losses = load_state(state_path, params, opt_state, rng,
                                                      config_json)
    steps = range(first, config.train.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"train {config.model.num_heads} head(s)",
                     initial=first, total=config.train.steps)
    pending = None
    for i in steps:
        x_BxTxD, y_BxTxD = sample(batch_size=config.train.batch_size)
        params, opt_state, loss = step_fn(params, opt_state, x_BxTxD, y_BxTxD)
        if pending is not None:  # read the previous loss: no host sync on the current step
            losses.append(float(pending))
            if log is not None:
                log(i - 1, losses[-1])
        pending = loss
        if state_path is not None and (i + 1) % save_every == 0 and i + 1 < config.train.steps:
            losses.append(float(pending))
            if log is not None:
                log(i, losses[-1])
            pending = None
            save_state(state_path, i + 1, params, opt_state, losses, rng, config_json)
    if pending is not None:
        losses.append(float(pending))
        if log is not None:
            log(config.train.steps - 1, losses[-1])
    if state_path is not None and first < config.train.steps:
        save_state(state_path, config.train.steps, params, opt_state, losses, rng, config_json)
    return model, params, losses
