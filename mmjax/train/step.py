"""The training and evaluation steps: pure functions of (state, batch), and the guarded
step the trainer jits (the train step plus its NaN/inf and token-id checks).

A batch is one array ``[batch, time + 1, ...]``: token ids for a language model, observations
for the three moons. The steps read it through a *batch loss*
``(model, params, batch, **apply_kwargs) -> (loss, loss_per_position_T, count)`` (``count``:
what ``loss`` averages over); the default is the language model's, :func:`lm_batch_loss`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from mmjax.ops.loss import lm_head_loss
from mmjax.train.state import TrainState

# Rng streams a model may draw from in training: dropout, and v2's long-term skip.
RNG_STREAMS = ("dropout", "skip")


def lm_loss(model: nn.Module, variables, inputs_BxT, targets_BxT, *, loss_chunk: int,
            **apply_kwargs):
    """The model's next-token loss ``(loss, loss_per_position_T, tokens)``: the LM head and
    the cross-entropy fused, ``loss_chunk`` positions at a time
    (:func:`mmjax.ops.lm_head_loss`; 0: dense logits)."""
    hidden, head, scale = model.apply(variables, inputs_BxT, return_head=True, **apply_kwargs)
    return lm_head_loss(hidden, head, targets_BxT, logit_scale=scale, chunk=loss_chunk)


def split_batch(tokens_BxT1: jax.Array, ignore_targets: tuple = ()):
    """``[batch, time + 1]`` tokens -> inputs ``[batch, time]`` and shifted targets; targets
    whose id is in ``ignore_targets`` become -1 (not trained on, not counted)."""
    inputs, targets = tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]
    if ignore_targets:
        targets = jnp.where(jnp.isin(targets, jnp.asarray(ignore_targets)), -1, targets)
    return inputs, targets


def lm_batch_loss(model: nn.Module, params, tokens_BxT1: jax.Array, *, loss_chunk: int = 0,
                  ignore_targets: tuple = (), **apply_kwargs):
    """The language model's batch loss: ``[batch, time + 1]`` tokens split into inputs and
    targets (:func:`split_batch`), then :func:`lm_loss`. Returns ``(loss,
    loss_per_position_T, tokens)``."""
    inputs, targets = split_batch(tokens_BxT1, ignore_targets)
    return lm_loss(model, {"params": params}, inputs, targets, loss_chunk=loss_chunk,
                   **apply_kwargs)


def train_step(state: TrainState, tokens_BxT1: jax.Array, *, model: nn.Module,
               optimizer: optax.GradientTransformation, grad_accum_steps: int = 1,
               loss_chunk: int = 0, ignore_targets: tuple = (), batch_loss=None):
    """One optimiser step on a ``[batch, time + 1, ...]`` batch. Returns (state, metrics).

    ``batch_loss``: the task's loss (module docstring); default: :func:`lm_batch_loss` with
    ``loss_chunk`` (positions per chunk of the fused LM head + cross-entropy) and
    ``ignore_targets`` (target ids that are not trained on, :func:`split_batch`).

    With ``grad_accum_steps = k > 1`` the batch is cut into ``k`` micro-batches of
    ``batch / k`` rows (rows ``i, i + k, i + 2k, ..``, so each micro-batch stays spread over
    the data-parallel devices), run one after the other in a ``lax.scan`` with fp32 gradient
    sums, and the step is that of the whole batch: the loss and gradients are the sums over
    micro-batches divided by the total count of targets (equal to one large batch up to float
    rounding; only the activations of one micro-batch are alive at a time). Every micro-batch
    sees the step's long-term skip (v2 draws one per step) and its own dropout masks.
    """
    rng, step_rng = jax.random.split(state.rng)
    batch = tokens_BxT1.shape[0]
    if grad_accum_steps < 1 or batch % grad_accum_steps:
        raise ValueError(f"grad_accum_steps={grad_accum_steps} must be >= 1 and divide the "
                         f"batch of {batch} rows")

    rngs = dict(zip(RNG_STREAMS, jax.random.split(step_rng, len(RNG_STREAMS))))
    batch_loss = _default_loss(batch_loss, loss_chunk, ignore_targets)

    def summed_loss(params, tokens_MxT1, micro_index):
        micro_rngs = dict(rngs)
        if grad_accum_steps > 1:  # fresh dropout per micro-batch; one long-term skip per step
            micro_rngs["dropout"] = jax.random.fold_in(rngs["dropout"], micro_index)
        loss, _, tokens = batch_loss(model, params, tokens_MxT1, deterministic=False,
                                     rngs=micro_rngs)
        return loss * tokens, tokens

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)
    if grad_accum_steps == 1:
        (loss_sum, tokens), grads = grad_fn(state.params, tokens_BxT1, 0)
    else:
        k = grad_accum_steps
        micro_KxMxT1 = jnp.swapaxes(
            tokens_BxT1.reshape(batch // k, k, *tokens_BxT1.shape[1:]), 0, 1)

        def accumulate(carry, xs):
            loss_sum, tokens, grads = carry
            (micro_loss, micro_tokens), micro_grads = grad_fn(state.params, *xs)
            grads = jax.tree.map(lambda g, m: g + m.astype(jnp.float32), grads, micro_grads)
            return (loss_sum + micro_loss, tokens + micro_tokens, grads), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), zeros)
        (loss_sum, tokens, grads), _ = jax.lax.scan(
            accumulate, init, (micro_KxMxT1, jnp.arange(k)))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    scale = 1.0 / jnp.maximum(tokens, 1).astype(jnp.float32)
    loss = loss_sum * scale
    grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics


def eval_step(params, tokens_BxT1: jax.Array, *, model: nn.Module, loss_chunk: int = 0,
              ignore_targets: tuple = (), batch_loss=None):
    """Loss and per-position loss of a batch, in inference mode (``batch_loss`` as in
    :func:`train_step`)."""
    batch_loss = _default_loss(batch_loss, loss_chunk, ignore_targets)
    loss, per_position, tokens = batch_loss(model, params, tokens_BxT1, deterministic=True)
    return {"loss": loss, "loss_per_position": per_position, "tokens": tokens}


def _default_loss(batch_loss, loss_chunk: int, ignore_targets: tuple):
    if batch_loss is not None:
        return batch_loss
    return functools.partial(lm_batch_loss, loss_chunk=loss_chunk, ignore_targets=ignore_targets)


def guarded_train_step(state, tokens, *, vocab_size: int | None, skip_nonfinite: bool,
                       **kwargs):
    """:func:`train_step` plus the NaN/inf guard's metrics.

    ``finite`` (loss, gradient norm and the new parameters all finite) and ``bad_token_ids``
    (ids outside ``[0, vocab)``; ``-1`` is allowed as an ignored target only; not counted
    when ``vocab_size`` is None: a batch of observations, not token ids). With
    ``skip_nonfinite`` a non-finite step returns the old parameters and optimiser state (the
    step counter and rng move on, the batch is consumed) and ``skipped`` = 1.
    """
    new_state, metrics = train_step(state, tokens, **kwargs)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    for leaf in jax.tree.leaves(new_state.params):
        finite &= jnp.all(jnp.isfinite(leaf))
    metrics = dict(metrics, finite=finite)
    if vocab_size is not None:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        metrics["bad_token_ids"] = (jnp.sum((inputs < 0) | (inputs >= vocab_size))
                                    + jnp.sum((targets < -1) | (targets >= vocab_size)))
    if skip_nonfinite:
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                            (new_state.params, new_state.opt_state),
                            (state.params, state.opt_state))
        new_state = new_state.replace(params=kept[0], opt_state=kept[1])
        metrics["skipped"] = (~finite).astype(jnp.int32)
    return new_state, metrics
