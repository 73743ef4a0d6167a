"""Key and value feature extraction: leaky averages, the value peek-ahead, normalisation.

All functions are O(T) in time and memory: recurrences run as ``jax.lax.associative_scan``
(log-depth on accelerators), never as a ``T x T`` matrix. Layout ``[batch, time, heads, dim]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def linear_recurrence(decay_BxTxHx1: Array, inputs_BxTxHxK: Array) -> Array:
    """``h_t = decay_t * h_{t-1} + inputs_t`` along axis 1, with ``h_{-1} = 0``.

    Args:
      decay_BxTxHx1: per-step multipliers, broadcastable to ``inputs`` (e.g. ``[1, T, H, 1]``
        or ``[B, T, H, 1]``).
      inputs_BxTxHxK: the driving terms.
    Returns:
      ``[batch, time, heads, dim]`` in fp32 (the scan runs in fp32 whatever the input dtype).
    """
    b = inputs_BxTxHxK.astype(jnp.float32)
    a = jnp.broadcast_to(decay_BxTxHx1.astype(jnp.float32), b.shape)

    def combine(left, right):
        a_l, b_l = left
        a_r, b_r = right
        return a_l * a_r, a_r * b_l + b_r

    return jax.lax.associative_scan(combine, (a, b), axis=1)[1]


def leaky_average(x_BxTxHxK: Array, decay_H: Array) -> Array:
    """Per-head exponential moving average (v1 key extractor).

    ``kbar_t = decay_h * kbar_{t-1} + (1 - decay_h) * x_t`` with ``decay_h = exp(-lam_h)``.
    This is the official Library's ``M @ k`` with ``M[i, j] = e^{-(i-j) lam} (1 - e^{-lam})``.

    Args:
      x_BxTxHxK: ``[batch, time, heads, dim]``.
      decay_H: ``[heads]`` in (0, 1].
    Returns:
      fp32 ``[batch, time, heads, dim]``.
    """
    decay_H = decay_H.astype(jnp.float32)
    gain_1x1xHx1 = (1.0 - decay_H)[None, None, :, None]
    return linear_recurrence(decay_H[None, None, :, None], gain_1x1xHx1 * x_BxTxHxK)


def gated_leaky_average(x_BxTxHxK: Array, gate_BxTxH: Array, decay_BxTxH: Array) -> Array:
    """Time-varying leaky average (v2 key extractor): ``kbar_t = g_t x_t + lam_t kbar_{t-1}``.

    Args:
      x_BxTxHxK: ``[batch, time, heads, dim]``.
      gate_BxTxH: input gates ``g_t`` (one per head and step).
      decay_BxTxH: forget factors ``lam_t`` in (0, 1].
    Returns:
      fp32 ``[batch, time, heads, dim]``.
    """
    inputs = gate_BxTxH.astype(jnp.float32)[..., None] * x_BxTxHxK.astype(jnp.float32)
    return linear_recurrence(decay_BxTxH[..., None], inputs)


def peek_ahead_values(u_BxTxHxV: Array, mix_H: Array) -> Array:
    """Values that peek one step ahead: ``v_t = (1 - c_h) u_{t+1} + c_h u_t``, ``u_T = 0``.

    This is the official two-tap ``lowrlinearconv`` extractor (shift 1); ``c_h`` is an
    unconstrained per-head coefficient.

    Args:
      u_BxTxHxV: projected inputs ``W_v x_t``.
      mix_H: ``[heads]`` coefficients ``c_h``.
    Returns:
      ``[batch, time, heads, dv]`` in the promoted dtype of the inputs.
    """
    ahead = jnp.concatenate([u_BxTxHxV[:, 1:], jnp.zeros_like(u_BxTxHxV[:, :1])], axis=1)
    c_1x1xHx1 = mix_H[None, None, :, None]
    return (1.0 - c_1x1xHx1) * ahead + c_1x1xHx1 * u_BxTxHxV


def l2_normalize(x: Array, axis: int = -1) -> Array:
    """``x / |x|`` with no epsilon (the official Library numerics); zero vectors map to 0.

    The guard only touches exact zeros, so results elsewhere are bit-for-bit ``x / |x|``,
    and gradients stay finite at zero.
    """
    sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True)
    nonzero = sq > 0
    norm = jnp.sqrt(jnp.where(nonzero, sq, 1.0))
    return jnp.where(nonzero, x / norm, 0.0).astype(x.dtype)
