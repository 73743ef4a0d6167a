"""Key and value feature extraction of v1 and v2 memories, as pure functions.

Leaky averages (fixed per head for v1, gated per step for v2), the unit-norm keys built on
them, the value extractor shared by both versions (peek one step ahead, normalise, scale), and
``l2_normalize``. All functions are O(T) in time and memory: recurrences run as
``jax.lax.associative_scan`` (log-depth on accelerators; one step per token on CPU, where
that is faster), never as a ``T x T`` matrix.
Layout ``[batch, time, heads, dim]``. The equations are listed in ``docs/architecture.md``.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from mmjax.ops.masks import target_platform

Array = jax.Array

# The official code stores the per-head scalars (``leaky_key_beta``, ``kernel_beta``,
# ``value_beta``) divided by 10, and clamps the key scale at e^5 so that scores stay below
# fp16's maximum. v1 and v2 share the value scale ``exp(10 * value_beta)``.
EXP_PARAM_SCALE = 10.0
KERNEL_BETA_MAX = 5.0


def linear_recurrence(decay_BxTxHx1: Array, inputs_BxTxHxK: Array,
                      initial_BxHxK: Array | None = None) -> Array:
    """``h_t = decay_t * h_{t-1} + inputs_t`` along axis 1, with ``h_{-1} = initial`` (0).

    Args:
      decay_BxTxHx1: per-step multipliers, broadcastable to ``inputs`` (e.g. ``[1, T, H, 1]``
        or ``[B, T, H, 1]``).
      inputs_BxTxHxK: the driving terms.
      initial_BxHxK: the state before the first step (decoding carries it from one chunk to
        the next); ``None`` is 0.
    Returns:
      ``[batch, time, heads, dim]`` in fp32 (the scan runs in fp32 whatever the input dtype).
    """
    chex.assert_rank([decay_BxTxHx1, inputs_BxTxHxK], 4)
    b = inputs_BxTxHxK.astype(jnp.float32)
    # the decay keeps its own last axis (1 for a per-head decay): never a [B, T, H, K] copy
    a = jnp.broadcast_to(decay_BxTxHx1.astype(jnp.float32),
                         b.shape[:-1] + decay_BxTxHx1.shape[-1:])
    if initial_BxHxK is not None:
        chex.assert_shape(initial_BxHxK, (b.shape[0],) + b.shape[2:])
        b = b.at[:, 0].add(a[:, 0] * initial_BxHxK.astype(jnp.float32))

    return _recurrence(a, b, target_platform() == "cpu")


def _scan(a_BxTxHx1: Array, b_BxTxHxK: Array, sequential: bool, reverse: bool) -> Array:
    """``h_t = a_t h_{t-1} + b_t`` from 0 (``reverse``: ``h_t = a_t h_{t+1} + b_t``); the
    last axis of ``a`` is 1 (a per-head decay, broadcast) or ``K``.

    ``sequential``: one ``lax.scan`` step per token, the form for CPU (measured on the
    2-core machine with this VJP, forward + backward, batch 8 x 4 heads, ms at T=64 with
    heads of 16 / T=512 / T=2048 with heads of 64: 0.2 / 5.5 / 48, against 0.4 / 5.4 / 66
    for the log-depth ``associative_scan`` that wins where steps run in parallel; a two-level
    scan of sqrt(T) chunks was no faster, nor is unrolling).
    """
    if not sequential:
        combine = lambda left, right: (left[0] * right[0], right[0] * left[1] + right[1])
        return jax.lax.associative_scan(combine, (a_BxTxHx1, b_BxTxHxK), axis=1,
                                        reverse=reverse)[1]

    def step(h_BxHxK, ab):
        h_BxHxK = ab[0] * h_BxHxK + ab[1]
        return h_BxHxK, h_BxHxK

    time_major = lambda x: jnp.moveaxis(x, 1, 0)
    _, h_TxBxHxK = jax.lax.scan(step, jnp.zeros_like(b_BxTxHxK[:, 0]),
                                (time_major(a_BxTxHx1), time_major(b_BxTxHxK)),
                                reverse=reverse)
    return jnp.moveaxis(h_TxBxHxK, 0, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _recurrence(a_BxTxHx1: Array, b_BxTxHxK: Array, sequential: bool) -> Array:
    return _scan(a_BxTxHx1, b_BxTxHxK, sequential, reverse=False)


def _recurrence_fwd(a_BxTxHx1, b_BxTxHxK, sequential):
    h_BxTxHxK = _scan(a_BxTxHx1, b_BxTxHxK, sequential, reverse=False)
    return h_BxTxHxK, (a_BxTxHx1, h_BxTxHxK)


def _recurrence_bwd(sequential, residuals, dh_BxTxHxK):
    """The adjoint recurrence, backward in time: ``g_t = dh_t + a_{t+1} g_{t+1}``; then
    ``db_t = g_t`` and ``da_t = g_t h_{t-1}``. Only the decays and the states are kept
    from the forward, not the scan's intermediates."""
    a_BxTxHx1, h_BxTxHxK = residuals
    g_BxTxHxK = _scan(_next_step(a_BxTxHx1), dh_BxTxHxK.astype(jnp.float32), sequential,
                      reverse=True)
    da_BxTxHxK = g_BxTxHxK * _previous_step(h_BxTxHxK)
    if a_BxTxHx1.shape[-1] != da_BxTxHxK.shape[-1]:  # a per-head decay
        da_BxTxHxK = jnp.sum(da_BxTxHxK, axis=-1, keepdims=True)
    return da_BxTxHxK, g_BxTxHxK


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def _next_step(x: Array) -> Array:
    """``x_{t+1}`` along the time axis of ``[B, T, ...]``, 0 after the last step."""
    return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)


def _previous_step(x: Array) -> Array:
    """``x_{t-1}`` along the time axis of ``[B, T, ...]``, 0 before the first step."""
    return jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)


def leaky_average(x_BxTxHxK: Array, decay_H: Array,
                  initial_BxHxK: Array | None = None) -> Array:
    """Per-head exponential moving average (v1 key extractor).

    ``kbar_t = decay_h * kbar_{t-1} + (1 - decay_h) * x_t`` with ``decay_h = exp(-lam_h)``.
    This is the official Library's ``M @ k`` with ``M[i, j] = e^{-(i-j) lam} (1 - e^{-lam})``.

    Args:
      x_BxTxHxK: ``[batch, time, heads, dim]``.
      decay_H: ``[heads]`` in (0, 1].
      initial_BxHxK: ``kbar_{-1}`` (default 0).
    Returns:
      fp32 ``[batch, time, heads, dim]``.
    """
    chex.assert_rank(x_BxTxHxK, 4)
    chex.assert_shape(decay_H, (x_BxTxHxK.shape[2],))
    decay_H = decay_H.astype(jnp.float32)
    gain_1x1xHx1 = (1.0 - decay_H)[None, None, :, None]
    return linear_recurrence(decay_H[None, None, :, None], gain_1x1xHx1 * x_BxTxHxK,
                             initial_BxHxK)


def gated_leaky_average(x_BxTxHxK: Array, gate_BxTxH: Array, decay_BxTxH: Array,
                        initial_BxHxK: Array | None = None) -> Array:
    """Time-varying leaky average (v2 key extractor): ``kbar_t = g_t x_t + lam_t kbar_{t-1}``.

    Args:
      x_BxTxHxK: ``[batch, time, heads, dim]``.
      gate_BxTxH: input gates ``g_t`` (one per head and step).
      decay_BxTxH: forget factors ``lam_t`` in (0, 1].
      initial_BxHxK: ``kbar_{-1}`` (default 0).
    Returns:
      fp32 ``[batch, time, heads, dim]``.
    """
    chex.assert_rank(x_BxTxHxK, 4)
    chex.assert_shape([gate_BxTxH, decay_BxTxH], x_BxTxHxK.shape[:3])
    inputs = gate_BxTxH.astype(jnp.float32)[..., None] * x_BxTxHxK.astype(jnp.float32)
    return linear_recurrence(decay_BxTxH[..., None], inputs, initial_BxHxK)


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
    chex.assert_rank(u_BxTxHxV, 4)
    chex.assert_shape(mix_H, (u_BxTxHxV.shape[2],))
    ahead = _next_step(u_BxTxHxV)
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


def key_scale(kernel_beta_H: Array, power: int) -> Array:
    """v1 key scale ``exp(min(10 kernel_beta, 5)) ** power`` in fp32 (clamp before power).

    ``power`` is 1 for the contextual memory and 2 for the persistent memory.
    """
    s = jnp.exp(jnp.minimum(EXP_PARAM_SCALE * kernel_beta_H.astype(jnp.float32),
                            KERNEL_BETA_MAX))
    return s**power


def leaky_key_average(k_BxTxHxK: Array, leaky_key_beta_H: Array,
                      initial_BxHxK: Array | None = None) -> Array:
    """The v1 key state ``kbar_t = e^{-lam_h} kbar_{t-1} + (1 - e^{-lam_h}) k~_t`` with
    ``lam_h = 10 |leaky_key_beta_h|``, from ``kbar_{-1} = initial`` (default 0); fp32."""
    chex.assert_shape(leaky_key_beta_H, (k_BxTxHxK.shape[2],))
    decay_H = jnp.exp(-EXP_PARAM_SCALE * jnp.abs(leaky_key_beta_H.astype(jnp.float32)))
    return leaky_average(k_BxTxHxK, decay_H, initial_BxHxK)


def scaled_unit_keys(kbar_BxTxHxK: Array, kernel_beta_H: Array, power: int) -> Array:
    """v1 keys from the key state: ``k_t = kbar_t / |kbar_t| * key_scale`` (fp32)."""
    chex.assert_shape(kernel_beta_H, (kbar_BxTxHxK.shape[2],))
    return l2_normalize(kbar_BxTxHxK) * key_scale(kernel_beta_H, power)[:, None]


def leaky_keys(k_BxTxHxK: Array, leaky_key_beta_H: Array, kernel_beta_H: Array,
               power: int) -> Array:
    """v1 keys from projected inputs ``k~_t = W_k x_t``: leaky average, unit norm, key scale
    (:func:`leaky_key_average` then :func:`scaled_unit_keys`).

    Returns:
      fp32 ``[batch, time, heads, dim]``.
    """
    chex.assert_rank(k_BxTxHxK, 4)
    return scaled_unit_keys(leaky_key_average(k_BxTxHxK, leaky_key_beta_H), kernel_beta_H,
                            power)


def gated_key_average(k_BxTxHxK: Array, gate_logit_BxTxH: Array, decay_logit_BxTxH: Array,
                      gate_cap: float, initial_BxHxK: Array | None = None) -> Array:
    """The v2 key state ``kbar_t = g_t k~_t + lam_t kbar_{t-1}`` from ``kbar_{-1} = initial``.

    Args:
      k_BxTxHxK: projected keys ``k~_t = W_k x_t``.
      gate_logit_BxTxH: ``W_g x_t``; ``g_t = exp(gate_cap * tanh(W_g x_t / gate_cap))``
        (the soft cap keeps ``e^-cap <= g_t <= e^cap``, see ``docs/architecture.md``).
      decay_logit_BxTxH: ``W_lam x_t``; ``lam_t = exp(-|W_lam x_t|)``.
      gate_cap: bound on ``|log g_t|`` (> 0).
      initial_BxHxK: the state before the first step (default 0).
    Returns:
      fp32 ``[B, T, H, K]``.
    """
    if gate_cap <= 0:
        raise ValueError(f"gate_cap must be > 0, got {gate_cap}")
    z = gate_logit_BxTxH.astype(jnp.float32)
    gate_BxTxH = jnp.exp(gate_cap * jnp.tanh(z / gate_cap))
    decay_BxTxH = jnp.exp(-jnp.abs(decay_logit_BxTxH.astype(jnp.float32)))
    return gated_leaky_average(k_BxTxHxK, gate_BxTxH, decay_BxTxH, initial_BxHxK)


def gated_keys(k_BxTxHxK: Array, gate_logit_BxTxH: Array, decay_logit_BxTxH: Array,
               gate_cap: float) -> Array:
    """v2 unit keys ``k_t = kbar_t / |kbar_t|`` of :func:`gated_key_average` (0 where
    ``kbar_t = 0``); fp32 ``[B, T, H, K]``."""
    return l2_normalize(gated_key_average(k_BxTxHxK, gate_logit_BxTxH, decay_logit_BxTxH,
                                          gate_cap))


def extract_values(u_BxTxHxV: Array, mix_H: Array, value_beta_H: Array) -> Array:
    """The value extractor of v1 and v2: ``v_t = normalize((1 - c_h) u_{t+1} + c_h u_t)
    * exp(10 value_beta_h)`` with ``u_t = W_v x_t`` and ``u_T = 0``.

    Args:
      u_BxTxHxV: projected inputs (compute dtype).
      mix_H: ``c_h`` per head (unconstrained).
      value_beta_H: log value scale per head, stored divided by 10.
    Returns:
      ``[batch, time, heads, dv]`` in the dtype of ``u`` (the scale is applied in fp32).
    """
    chex.assert_rank(u_BxTxHxV, 4)
    chex.assert_shape([mix_H, value_beta_H], (u_BxTxHxV.shape[2],))
    v_BxTxHxV = l2_normalize(peek_ahead_values(u_BxTxHxV, mix_H.astype(u_BxTxHxV.dtype)))
    scale_H = jnp.exp(EXP_PARAM_SCALE * value_beta_H.astype(jnp.float32))
    return (v_BxTxHxV * scale_H[:, None]).astype(u_BxTxHxV.dtype)
