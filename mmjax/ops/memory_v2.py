"""The v2 ("Memory Mosaics at Scale") math as pure functions: bandwidth, tiers, skip schedule.

* Adaptive bandwidth per head, ``beta_t = beta1 * n_t^alpha + beta0`` with ``n_t`` the number
  of pairs visible at ``t`` (:func:`adaptive_bandwidth`; its parametrisation and init are
  explained in ``docs/architecture.md``, section 6).
* Tier masks: the short-term memory sees a window of ``h`` pairs, the long-term memory every
  pair but the ``m`` most recent (:func:`tier_masks`).
* The long-term skip schedule: ``m ~ U{low..high}`` per training step, a fixed ``m`` at
  inference (:func:`select_long_term_skip`), shared by MM v2 and the short/long attention ablation.

The gated key extractor lives in :mod:`mmjax.ops.features` (:func:`gated_keys`).
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

from mmjax.ops.masks import MaskSpec, visible_count

Array = jax.Array

# The floors of alpha and beta1 (why: docs/architecture.md, section 6).
ALPHA_MARGIN = 1e-4
BETA1_FLOOR = 1e-6


def bandwidth_parameters(p0_H: Array, p1_H: Array, pa_H: Array) -> tuple[Array, Array, Array]:
    """Unconstrained ``(p0, p1, pa)`` -> ``(beta0 >= 0, beta1 > 0, 0 < alpha < 1)``, for any
    finite input in fp32 (the mapping: ``docs/architecture.md``, section 6)."""
    alpha_H = ALPHA_MARGIN + (1.0 - 2.0 * ALPHA_MARGIN) * jax.nn.sigmoid(pa_H)
    return jax.nn.softplus(p0_H), jax.nn.softplus(p1_H) + BETA1_FLOOR, alpha_H


def inverse_bandwidth_parameters(beta0: float, beta1: float, alpha: float):
    """Raw parameters giving ``(beta0, beta1, alpha)``; raises on out-of-range values."""
    if not (beta0 > 0 and beta1 > BETA1_FLOOR and ALPHA_MARGIN < alpha < 1 - ALPHA_MARGIN):
        raise ValueError(
            f"bandwidth_init must be (beta0 > 0, beta1 > {BETA1_FLOOR}, {ALPHA_MARGIN} < alpha "
            f"< {1 - ALPHA_MARGIN}), got {(beta0, beta1, alpha)}")
    softplus_inv = lambda y: math.log(math.expm1(y))
    a = (alpha - ALPHA_MARGIN) / (1.0 - 2.0 * ALPHA_MARGIN)
    return softplus_inv(beta0), softplus_inv(beta1 - BETA1_FLOOR), math.log(a / (1.0 - a))


def adaptive_bandwidth(count: Array, beta0_H: Array, beta1_H: Array, alpha_H: Array) -> Array:
    """``beta_t = beta1 * n_t^alpha + beta0`` as fp32 ``[..., H]`` (``n^alpha = 0`` at ``n = 0``).

    Args:
      count: visible counts ``n_t`` (integers >= 0, any shape, e.g. ``[Q]`` or ``[B, Q]``),
        e.g. from :func:`visible_count`.
      beta0_H, beta1_H, alpha_H: per-head constrained parameters
        (:func:`bandwidth_parameters`).
    Returns:
      fp32 ``count.shape + [H]``, ready for ``retrieve(..., bandwidth=...)``.
    """
    chex.assert_equal_shape([beta0_H, beta1_H, alpha_H])
    chex.assert_rank(beta0_H, 1)
    n_x1 = jnp.asarray(count).astype(jnp.float32)[..., None]
    log_n_x1 = jnp.log(jnp.maximum(n_x1, 1.0))  # safe: no -inf * 0 in the gradient
    power = jnp.where(n_x1 > 0, jnp.exp(alpha_H * log_n_x1), 0.0)
    return beta1_H * power + beta0_H


def tier_bandwidth(query_positions: Array, mask: MaskSpec, beta0_H: Array, beta1_H: Array,
                   alpha_H: Array) -> Array:
    """The adaptive bandwidth ``query_positions.shape + [H]`` of a memory whose queries sit at
    the absolute positions ``query_positions`` (``arange(T)`` in training; a chunk or one
    step per row when decoding) and see the pairs ``mask`` lets through."""
    count = visible_count(query_positions, window=mask.window, skip=mask.skip)
    return adaptive_bandwidth(count, beta0_H, beta1_H, alpha_H)


def tier_masks(short_term_window: int, long_term_skip) -> tuple[MaskSpec, MaskSpec]:
    """``(short-term mask, long-term mask)``: a window of ``h`` pairs, and every pair but the
    ``m`` most recent (``m`` may be a traced scalar)."""
    return MaskSpec(window=short_term_window), MaskSpec(skip=long_term_skip)


def validate_skip_schedule(window: int, skip_range, inference_skip: int) -> None:
    """Raise a ``ValueError`` for a bad short-term window or long-term skip schedule."""
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"short_term_window must be an integer >= 1, got {window!r}")
    if (len(tuple(skip_range)) != 2 or not all(isinstance(s, int) for s in skip_range)
            or not 0 <= skip_range[0] <= skip_range[1]):
        raise ValueError(
            f"long_term_skip_range must be (low, high) integers with 0 <= low <= high, "
            f"got {skip_range!r}")
    if not isinstance(inference_skip, int) or inference_skip < 0:
        raise ValueError(
            f"inference_long_term_skip must be an integer >= 0, got {inference_skip!r}")


def select_long_term_skip(explicit, *, deterministic: bool, rng: Array | None, skip_range,
                   inference_skip: int):
    """The long-term skip ``m`` of one forward pass.

    An ``explicit`` skip wins; otherwise training (``deterministic=False``) draws
    ``m ~ U{low..high}`` (both ends included) from ``rng`` as a traced int32 scalar, so a new
    ``m`` needs no recompilation; inference uses ``inference_skip``.
    """
    if explicit is not None:
        return explicit
    if deterministic:
        return inference_skip
    if rng is None:
        raise ValueError("drawing the long-term skip needs an rng (the 'skip' stream)")
    low, high = skip_range
    return jax.random.randint(rng, (), low, high + 1, dtype=jnp.int32)
