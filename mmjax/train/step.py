"""The training and evaluation steps: pure functions of (state, batch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from mmjax.train.state import TrainState

IGNORE = -1
# Rng streams a model may draw from in training: dropout, and v2's long-term skip.
RNG_STREAMS = ("dropout", "skip")


def cross_entropy(logits_BxTxN: jax.Array, targets_BxT: jax.Array):
    """Mean next-token cross-entropy over positions whose target is not ``-1``.

    Returns:
      ``(loss, loss_per_position_T, tokens)``: the scalar mean, the mean over the batch at
      each position (for in-context-learning curves), and the number of counted targets.
    """
    logits = logits_BxTxN.astype(jnp.float32)
    valid_BxT = targets_BxT != IGNORE
    safe = jnp.where(valid_BxT, targets_BxT, 0)
    nll_BxT = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    nll_BxT = jnp.where(valid_BxT, nll_BxT, 0.0)
    tokens = jnp.sum(valid_BxT)
    loss = jnp.sum(nll_BxT) / jnp.maximum(tokens, 1)
    per_position_T = jnp.sum(nll_BxT, 0) / jnp.maximum(jnp.sum(valid_BxT, 0), 1)
    return loss, per_position_T, tokens


def split_batch(tokens_BxT1: jax.Array):
    """``[batch, time + 1]`` tokens -> inputs ``[batch, time]`` and shifted targets."""
    return tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]


def train_step(state: TrainState, tokens_BxT1: jax.Array, *, model: nn.Module,
               optimizer: optax.GradientTransformation):
    """One optimiser step on a ``[batch, time + 1]`` token batch. Returns (state, metrics)."""
    inputs, targets = split_batch(tokens_BxT1)
    rng, step_rng = jax.random.split(state.rng)
    rngs = dict(zip(RNG_STREAMS, jax.random.split(step_rng, len(RNG_STREAMS))))

    def loss_fn(params):
        logits = model.apply({"params": params}, inputs, deterministic=False, rngs=rngs)
        return cross_entropy(logits, targets)[0]

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics


def eval_step(params, tokens_BxT1: jax.Array, *, model: nn.Module):
    """Loss and per-position loss of a batch, in inference mode."""
    inputs, targets = split_batch(tokens_BxT1)
    logits = model.apply({"params": params}, inputs, deterministic=True)
    loss, per_position, tokens = cross_entropy(logits, targets)
    return {"loss": loss, "loss_per_position": per_position, "tokens": tokens}
