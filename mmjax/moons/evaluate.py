"""Evaluation: autoregressive error against context length, and a disentanglement score.

For a context length ``T`` the memory holds observations ``x_0..x_{T-1}``; the net predicts
``x_T``, the prediction is fed back as the next observation, and so on for ``horizon`` steps.
The error is the mean absolute difference between the predictions of ``x_{T+j}`` and the true
``x_{T+j}``, ``j = 0..horizon-1`` (aligned; the official evaluation compares each prediction
with the truth one step earlier, which raised the curves of our trained nets by 0.05-0.07 after
the lcm).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models.moons import MATRIX_NAMES, MoonsMemory, complex_weights
from mmjax.moons.data import period_lcm, periods_in_steps, sample_batch

Array = jax.Array


def rollout_errors(model: MoonsMemory, params, x_BxTxD: Array, contexts_E: Array,
                   horizon: int) -> Array:
    """Mean absolute ``horizon``-step rollout error for each context length.

    Args:
      x_BxTxD: true sequences with ``T >= max(contexts) + horizon``.
      contexts_E: int context lengths ``>= 1``.
    Returns:
      ``[E]`` errors averaged over batch, steps and coordinates.
    """
    contexts_E = np.asarray(contexts_E)
    if contexts_E.min() < 1 or contexts_E.max() + horizon > x_BxTxD.shape[1]:
        raise ValueError(
            f"contexts must lie in [1, {x_BxTxD.shape[1] - horizon}] for sequences of length "
            f"{x_BxTxD.shape[1]} and horizon {horizon}, got [{contexts_E.min()}, "
            f"{contexts_E.max()}]"
        )
    return _rollout_errors(model, params, jnp.asarray(x_BxTxD), jnp.asarray(contexts_E),
                           horizon)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _rollout_errors(model, params, x_BxTxD, contexts_E, horizon):
    def one(length):
        preds_BxJxD = model.apply({"params": params}, x_BxTxD, length, horizon,
                                  method=MoonsMemory.rollout)
        truth_BxJxD = jax.lax.dynamic_slice_in_dim(x_BxTxD, length, horizon, axis=1)
        return jnp.mean(jnp.abs(preds_BxJxD - truth_BxJxD))

    return jax.vmap(one)(contexts_E)


def error_curve(model: MoonsMemory, params, eval_config, data_config, *,
                progress: bool = True, chunk: int = 8) -> dict:
    """The error-vs-context curve on the validation periods, as a JSON-ready dict:
    ``{"context", "error", "periods_in_steps", "lcm_in_steps", "periods"}``."""
    if len(data_config.validation_periods) != 1:
        raise ValueError("data.validation_periods must hold exactly one period set, got "
                         f"{data_config.validation_periods}")
    periods = list(data_config.validation_periods[0])
    rng = np.random.default_rng(eval_config.seed)
    length = eval_config.max_context + eval_config.horizon
    x_BxTxD, _ = sample_batch(rng, [periods], eval_config.num_sequences, length,
                              dt=data_config.dt, grid_size=data_config.grid_size)
    contexts = np.arange(1, eval_config.max_context + 1, eval_config.context_stride)
    chunks = [contexts[i:i + chunk] for i in range(0, len(contexts), chunk)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"evaluate {model.num_heads} head(s)")
    errors = []
    for c in chunks:
        padded = np.concatenate([c, np.full(chunk - len(c), c[-1])])  # one compiled shape
        errors.append(np.asarray(rollout_errors(model, params, x_BxTxD, padded,
                                                eval_config.horizon))[:len(c)])
    return {
        "context": contexts.tolist(),
        "error": np.concatenate(errors).astype(float).tolist(),
        "periods": periods,
        "periods_in_steps": periods_in_steps(periods, data_config.dt),
        "lcm_in_steps": period_lcm(periods) / data_config.dt,
    }


def mean_error(curve: dict, lo: float, hi: float) -> float:
    """Mean of the curve's errors over contexts in ``[lo, hi]``."""
    context, error = np.asarray(curve["context"]), np.asarray(curve["error"])
    sel = (context >= lo) & (context <= hi)
    if not sel.any():
        raise ValueError(f"no context length in [{lo}, {hi}]")
    return float(error[sel].mean())


def row_dominance(params) -> dict[str, np.ndarray]:
    """For each matrix, the share of each row's squared modulus held by its largest entry
    (1 for a permutation-like row, ``1/M`` for a uniform one)."""
    out = {}
    for name, w in complex_weights(params).items():
        sq_MxM = np.abs(np.asarray(w)) ** 2
        out[name] = sq_MxM.max(axis=1) / np.maximum(sq_MxM.sum(axis=1), 1e-30)
    return out


def is_disentangled(params, threshold: float = 0.9) -> bool:
    """Every row of ``|W_k|``, ``|W_v|`` and ``|W_z|`` has an entry holding ``>= threshold`` of
    its squared mass."""
    dominance = row_dominance(params)
    return all(bool((dominance[name] >= threshold).all()) for name in MATRIX_NAMES)
