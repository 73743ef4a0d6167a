"""The train state: a pytree of step, parameters, optimiser state and rng."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def init_variables(model: nn.Module, rng: jax.Array, batch_size: int, length: int):
    """Boxed (logically annotated) variables of ``model`` for ``[batch, length]`` token ids."""
    ids = jnp.zeros((batch_size, length), jnp.int32)
    return model.init({"params": rng}, ids, deterministic=True)


def create_train_state(params, optimizer: optax.GradientTransformation, rng) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=rng)
