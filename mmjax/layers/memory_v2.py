"""Memory Mosaics v2 layers: gated key extractor, adaptive bandwidth, three-tier memory.

"Memory Mosaics at Scale" (Zhang & Bottou, arXiv 2507.03285) has no public code; this is
its reference implementation in mmjax. Formulas from the paper (DESIGN.md section 5), then
every choice the paper leaves open, marked CHOICE.

Key extractor, per memory and head (``x_t`` the normalised block input)::

    k~_t   = W_k x_t
    g_t    = exp(W_g x_t)          (one input gate per head)
    lam_t  = exp(-|W_lam x_t|)     (one forget factor per head, in (0, 1])
    kbar_t = g_t * k~_t + lam_t * kbar_{t-1},   kbar_{-1} = 0
    k_t    = kbar_t / |kbar_t|

computed in O(T) with ``jax.lax.associative_scan`` (:func:`mmjax.ops.features.
gated_leaky_average`, fp32 whatever the compute dtype).

* CHOICE (overflow bound): ``exp`` of an unbounded linear form overflows (fp32 and bf16 share
  the 8-bit exponent: ``exp(z)`` is ``inf`` past ``z ~ 88.7``, and a sum of many large terms
  overflows earlier). The gate exponent is soft-capped, ``g_t = exp(c * tanh(W_g x_t / c))``
  with ``c = gate_cap`` (default 10), so ``e^-10 <= g_t <= e^10``: the identity for
  ``|W_g x| << c``, smooth with a nonzero gradient everywhere. With ``lam_t <= 1`` the
  recurrence is bounded by ``sum_t g_t |k~_t| <= T e^10 max|k~|``: about ``7e8 max|k~|``
  at ``T = 32768``, far inside fp32 (the scan's dtype). ``lam_t = exp(-|.|)`` needs no bound.
  The key is normalised afterwards, so a common scale of the gates has no effect.
* CHOICE: no biases in ``W_g`` / ``W_lam``; init ``N(0, 1/D)`` for ``W_g``, ``W_lam`` (so
  ``W x ~ N(0, 1)`` on RMS-normalised inputs: ``g ~ 1``, ``lam ~ e^-0.8`` at init) and for
  ``W_k``/``W_v`` ``N(0, init_std^2)`` like the transformer projections.

Values, as in v1 (the official Library's two-tap extractor): ``u_t = W_v x_t``,
``v_t = normalize((1 - c_h) u_{t+1} + c_h u_t) * exp(10 * value_beta_h)``, ``u_T = 0``,
``c_h ~ U(0, 1)``, ``value_beta_h = -0.05`` at init.

Adaptive bandwidth, per memory and head::

    beta_t = beta1 * n_t^alpha + beta0,  n_t = |visible pairs at t| (mmjax.ops.visible_count)

parametrised as ``beta0 = softplus(p0) >= 0``, ``beta1 = softplus(p1) + 1e-6 > 0``,
``alpha = 1e-4 + (1 - 2e-4) sigmoid(pa) in (0, 1)`` (the floors keep the bounds strict in
fp32, where ``sigmoid`` rounds to 1 and ``softplus`` underflows to 0 for large inputs);
``n_t^alpha`` is taken as 0 where ``n_t = 0`` (an empty row returns 0 anyway) with a
gradient-safe log. It is a ``[q_time, heads]`` array passed to ``retrieve`` as
``bandwidth``; the keys are unit vectors, so ``beta_t`` is the whole scale.

* CHOICE (init): ``beta0 = 1``, ``beta1 = 1``, ``alpha = 0.25`` (``beta ~ 5`` at ``n = 256``,
  ``~9`` at 4096, ``~14`` at 32768); kernel density theory gives ``alpha = 2 / (d + 4)`` for
  an intrinsic dimension ``d``, hence a small value.

Three tiers per layer:

* short-term memory: ``H`` heads, window ``h`` (default 256): pairs ``t-h <= i <= t-1``;
* long-term memory: ``H`` heads, skip ``m``: pairs ``i <= t-1-m``. During training ``m`` is
  drawn uniformly from ``[64, 256]`` (both ends included, CHOICE) once per forward pass and
  shared by all layers (CHOICE), as a traced scalar so no recompilation; ``m = 64`` at
  inference. The two tiers see overlapping pairs whenever ``m < h`` (pairs
  ``t-h .. t-1-m``), i.e. always for the default ranges except ``m = 256``;
* the ``2 H`` head outputs are concatenated and fused by ``W_o`` (``2 H * K -> D``);
* persistent memory: a SwiGLU FFN (:class:`mmjax.layers.mlp.SwiGLU`).

* CHOICE: head dimension ``K = D / H`` for keys and values of both tiers; dropout on the
  concatenated head outputs before ``W_o`` (paper App. C: "attention heads output (before
  combining layer)"), none on retrieval probabilities (fused in ``retrieve``).
* No position encoding anywhere: nothing depends on the absolute position but ``n_t``, so a
  model trained at ``T`` runs unchanged at any length.

Logical axis names: ``embed``, ``heads``, ``head_dim``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.attention import HeadOutput, normal_init
from mmjax.ops.features import gated_leaky_average, l2_normalize, peek_ahead_values
from mmjax.ops.retrieval import MaskSpec, retrieve, visible_count

Array = jax.Array


# ----------------------------------------------------------------------------- pure functions


def gated_keys(x_BxTxHxK: Array, gate_logit_BxTxH: Array, decay_logit_BxTxH: Array,
               gate_cap: float) -> Array:
    """Unit keys from the gated recurrence ``kbar_t = g_t k~_t + lam_t kbar_{t-1}``.

    Args:
      x_BxTxHxK: projected keys ``k~_t = W_k x_t``.
      gate_logit_BxTxH: ``W_g x_t``; ``g_t = exp(gate_cap * tanh(W_g x_t / gate_cap))``.
      decay_logit_BxTxH: ``W_lam x_t``; ``lam_t = exp(-|W_lam x_t|)``.
      gate_cap: bound on ``|log g_t|`` (> 0).
    Returns:
      fp32 ``[B, T, H, K]``, unit norm (0 where ``kbar_t = 0``).
    """
    z = gate_logit_BxTxH.astype(jnp.float32)
    gate_BxTxH = jnp.exp(gate_cap * jnp.tanh(z / gate_cap))
    decay_BxTxH = jnp.exp(-jnp.abs(decay_logit_BxTxH.astype(jnp.float32)))
    return l2_normalize(gated_leaky_average(x_BxTxHxK, gate_BxTxH, decay_BxTxH))


# Floors that keep the constraints strict in floating point (sigmoid saturates to exactly 0
# or 1 in fp32 past |x| ~ 17, softplus underflows to 0 past x ~ -104).
ALPHA_MARGIN = 1e-4
BETA1_FLOOR = 1e-6


def bandwidth_parameters(p0_H: Array, p1_H: Array, pa_H: Array) -> tuple[Array, Array, Array]:
    """Unconstrained ``(p0, p1, pa)`` -> ``(beta0 >= 0, beta1 > 0, 0 < alpha < 1)``.

    ``beta0 = softplus(p0)``, ``beta1 = softplus(p1) + 1e-6``,
    ``alpha = 1e-4 + (1 - 2e-4) sigmoid(pa)``: the bounds hold for any finite input, in fp32.
    """
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


def adaptive_bandwidth(count_Q: Array, beta0_H: Array, beta1_H: Array, alpha_H: Array) -> Array:
    """``beta_t = beta1 * n_t^alpha + beta0`` as fp32 ``[Q, H]`` (``n^alpha = 0`` at ``n = 0``).

    Args:
      count_Q: visible counts ``n_t`` (integers >= 0).
      beta0_H, beta1_H, alpha_H: per-head constrained parameters.
    """
    n_Qx1 = count_Q.astype(jnp.float32)[:, None]
    log_n_Qx1 = jnp.log(jnp.maximum(n_Qx1, 1.0))  # safe: no -inf * 0 in the gradient
    power_QxH = jnp.where(n_Qx1 > 0, jnp.exp(alpha_H[None, :] * log_n_Qx1), 0.0)
    return beta1_H[None, :] * power_QxH + beta0_H[None, :]


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


def resolve_long_term_skip(module: nn.Module, long_term_skip, deterministic: bool,
                           skip_range, inference_skip: int):
    """The long-term skip ``m`` of one forward pass.

    An explicit ``long_term_skip`` wins; otherwise training (``deterministic=False``) draws
    ``m ~ U{low..high}`` from the module's ``"skip"`` rng as a traced int32 scalar, and
    inference uses ``inference_skip``.
    """
    if long_term_skip is not None:
        return long_term_skip
    if deterministic:
        return inference_skip
    low, high = skip_range
    return jax.random.randint(module.make_rng("skip"), (), low, high + 1, dtype=jnp.int32)


# ----------------------------------------------------------------------------- modules


class MemoryTier(nn.Module):
    """One associative-memory tier of ``H`` heads: ``[B, T, D] -> [B, T, H, K]`` head outputs.

    Attributes:
      num_heads, head_dim: ``H`` and ``K``.
      window: ``None`` (long-term) or the short-term window ``h``; the skip comes at call time.
      gate_cap: bound on ``|log g_t|``.
      bandwidth_init: ``(beta0, beta1, alpha)`` at init.
    """

    num_heads: int
    head_dim: int
    window: int | None = None
    gate_cap: float = 10.0
    bandwidth_init: tuple = (1.0, 1.0, 0.25)
    init_std: float = 0.02
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x_BxTxD: Array, *, skip=0) -> Array:
        if self.gate_cap <= 0:
            raise ValueError(f"gate_cap must be > 0, got {self.gate_cap}")
        d, h, k = x_BxTxD.shape[-1], self.num_heads, self.head_dim
        x = x_BxTxD.astype(self.dtype)

        def weight(name, shape, names, std):
            return jnp.asarray(self.param(name, normal_init(std, names), shape), self.dtype)

        dhk, dh = ("embed", "heads", "head_dim"), ("embed", "heads")
        xk_BxTxHxK = jnp.einsum("btd,dhk->bthk", x, weight("key", (d, h, k), dhk, self.init_std))
        u_BxTxHxK = jnp.einsum("btd,dhk->bthk", x, weight("value", (d, h, k), dhk, self.init_std))
        gate_BxTxH = jnp.einsum("btd,dh->bth", x, weight("gate", (d, h), dh, d ** -0.5))
        decay_BxTxH = jnp.einsum("btd,dh->bth", x, weight("decay", (d, h), dh, d ** -0.5))

        k_BxTxHxK = gated_keys(xk_BxTxHxK, gate_BxTxH, decay_BxTxH, self.gate_cap)

        per_head = lambda name, init: self.param(
            name, nn.with_logical_partitioning(init, ("heads",)), (h,))
        mix_H = per_head("value_mix", nn.initializers.uniform(1.0))
        value_beta_H = per_head("value_beta", nn.initializers.constant(-0.05))
        v_BxTxHxK = l2_normalize(peek_ahead_values(u_BxTxHxK, mix_H.astype(self.dtype)))
        v_BxTxHxK = v_BxTxHxK * jnp.exp(10.0 * value_beta_H).astype(self.dtype)[None, None, :, None]

        raw = inverse_bandwidth_parameters(*self.bandwidth_init)
        p0_H, p1_H, pa_H = (per_head(name, nn.initializers.constant(value)) for name, value in
                            zip(("beta0", "beta1", "alpha"), raw, strict=True))
        count_T = visible_count(jnp.arange(x.shape[1]), window=self.window, skip=skip)
        beta_TxH = adaptive_bandwidth(count_T, *bandwidth_parameters(p0_H, p1_H, pa_H))

        return retrieve(k_BxTxHxK.astype(self.dtype), v_BxTxHxK, bandwidth=beta_TxH,
                        mask=MaskSpec(window=self.window, skip=skip), impl=self.impl)


class ThreeTierMemory(nn.Module):
    """Short-term and (optionally) long-term memories, concatenated and fused by ``W_o``.

    ``[B, T, D] -> [B, T, D]``; the persistent tier (SwiGLU) lives in the block.
    """

    num_heads: int
    head_dim: int
    short_term_window: int = 256
    long_term: bool = True
    gate_cap: float = 10.0
    bandwidth_init: tuple = (1.0, 1.0, 0.25)
    dropout_rate: float = 0.0
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x_BxTxD: Array, *, deterministic: bool, long_term_skip) -> Array:
        def tier(window, name):
            return MemoryTier(self.num_heads, self.head_dim, window=window,
                              gate_cap=self.gate_cap, bandwidth_init=tuple(self.bandwidth_init),
                              init_std=self.init_std, dtype=self.dtype, impl=self.impl,
                              name=name)

        heads = [tier(self.short_term_window, "short_term")(x_BxTxD)]
        if self.long_term:
            heads.append(tier(None, "long_term")(x_BxTxD, skip=long_term_skip))
        y_BxTxGxK = jnp.concatenate(heads, axis=2)
        y_BxTxGxK = nn.Dropout(self.dropout_rate)(y_BxTxGxK, deterministic=deterministic)
        return HeadOutput(x_BxTxD.shape[-1], init_std=self.out_init_std, dtype=self.dtype,
                          name="out")(y_BxTxGxK)
