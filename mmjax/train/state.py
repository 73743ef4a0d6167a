"""The train state: a pytree of step, parameters, optimiser state and rng, and its layout on
a mesh (:func:`state_layout`, shared by the trainer and the ahead-of-time compiler)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from mmjax.train import sharding as sharding_lib


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


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Where a train state lives on a mesh, and how to make one there.

    Attributes:
      init_params: jitted ``rng -> params``, laid out by the parameters' logical axes.
      create_state: compiled ``(params, rng=...) -> TrainState`` (optimiser state included).
      shardings: the ``TrainState`` of shardings of ``create_state``'s output.
      abstract: the ``TrainState`` of ``jax.ShapeDtypeStruct``s with those shardings.
    """

    init_params: Any
    create_state: Any
    shardings: TrainState
    abstract: TrainState


def state_layout(model: nn.Module, optimizer: optax.GradientTransformation, mesh, rules, *,
                 length: int, init_rng: jax.Array, state_rng: jax.Array,
                 init_variables=init_variables) -> StateLayout:
    """Shardings of the parameters (from their logical axes) and of the whole train state.

    Nothing is allocated: parameters are traced with ``jax.eval_shape`` and the state's
    creation is compiled for ``mesh`` (any mesh, a TPU topology described on a CPU host too).
    Call with the mesh's logical-axis rules in effect (``nn.logical_axis_rules``).
    ``init_variables``: ``(model, rng, batch_size, length) -> boxed variables``, by default on
    token ids (a model with other inputs brings its own, e.g. the three moons).
    """
    init = functools.partial(init_variables, model, batch_size=1, length=length)
    with jax.set_mesh(mesh):
        abstract = jax.eval_shape(init, init_rng)
        shardings = sharding_lib.param_shardings(abstract, mesh, rules)["params"]
        init_params = jax.jit(lambda r: nn.meta.unbox(init(r))["params"],
                              out_shardings=shardings)
    # (outside the mesh: unboxing there would constrain abstract values)
    abstract_params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(abstract["params"]), shardings)
    # The optimiser's copies of the parameters (Adam's moments) are laid out like the
    # parameters; anything else (counts) is replicated. Left to XLA, zeros_like moments come
    # out replicated, which would cost every chip the whole optimiser state.
    replicated = sharding_lib.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, jax.eval_shape(optimizer.init, abstract_params),
        shardings, transform_non_params=lambda _: replicated)
    state_shardings = TrainState(step=replicated, params=shardings, opt_state=opt_shardings,
                                 rng=replicated)
    with jax.set_mesh(mesh):
        create = jax.jit(functools.partial(create_train_state, optimizer=optimizer),
                         out_shardings=state_shardings)
        create_state = create.lower(abstract_params, rng=state_rng).compile()
        abstract_state = jax.eval_shape(create, abstract_params, rng=state_rng)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
        state_shardings)
    return StateLayout(init_params, create_state, state_shardings, abstract_state)
