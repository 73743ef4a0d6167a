"""Memory Mosaics v2 layers: gated key extractor, adaptive bandwidth, three-tier memory.

"Memory Mosaics at Scale" (Zhang & Bottou, arXiv 2507.03285) has no public code; this is
its reference implementation in mmjax. Formulas from the paper (``docs/architecture.md``),
then every choice the paper leaves open, marked CHOICE. The math is pure functions in
:mod:`mmjax.ops` (:func:`~mmjax.ops.gated_key_average`, :func:`~mmjax.ops.extract_values`,
:func:`~mmjax.ops.tier_bandwidth`, :func:`~mmjax.ops.tier_masks`); the modules here own the
parameters.

Key extractor, per memory and head (``x_t`` the normalised block input)::

    k~_t   = W_k x_t
    g_t    = exp(W_g x_t)          (one input gate per head)
    lam_t  = exp(-|W_lam x_t|)     (one forget factor per head, in (0, 1])
    kbar_t = g_t * k~_t + lam_t * kbar_{t-1},   kbar_{-1} = 0
    k_t    = kbar_t / |kbar_t|

computed in O(T) with ``jax.lax.associative_scan`` (:func:`mmjax.ops.gated_leaky_average`,
fp32 whatever the compute dtype).

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

Values, as in v1 (the official Library's two-tap extractor, one shared implementation:
:func:`mmjax.layers.memory.value_extractor`): ``u_t = W_v x_t``,
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

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.cache import DecodeStep, key_state, memory_step
from mmjax.layers.common import (
    HeadOutput,
    head_projection,
    projection,
    retrieval_sharding,
    sow_retrieval,
)
from mmjax.layers.memory import per_head_param, value_extractor
from mmjax.ops import (
    bandwidth_parameters,
    gated_key_average,
    inverse_bandwidth_parameters,
    l2_normalize,
    retrieve,
    tier_bandwidth,
    tier_masks,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """Settings of a v2 associative memory (a tier, or the three-tier mixer of a block).

    Attributes:
      num_heads, head_dim: ``H`` and ``K`` of each tier.
      short_term_window: the short-term window ``h``.
      long_term: whether the long-term tier exists (the paper's ablation drops it).
      gate_cap: bound on ``|log g_t|``.
      bandwidth_init: ``(beta0, beta1, alpha)`` at init.
      dropout_rate: dropout on the concatenated head outputs before ``W_o``.
      init_std: std of ``W_k``, ``W_v``; out_init_std: std of ``W_o``.
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


class MemoryTier(nn.Module):
    """One associative-memory tier of ``H`` heads: ``[B, T, D] -> [B, T, H, K]`` head outputs.

    ``mask`` (a :class:`mmjax.ops.MaskSpec`, from :func:`mmjax.ops.tier_masks`) says which
    pairs the tier sees; its skip may be a traced scalar. With ``step`` (a cached call,
    :mod:`mmjax.layers.cache`) a windowed tier keeps its pairs in a ring buffer of ``window``
    slots, the others in a linear buffer.
    """

    config: MemoryConfig

    @nn.compact
    def __call__(self, x_BxTxD: Array, *, mask, step: DecodeStep | None = None) -> Array:
        c = self.config
        if c.gate_cap <= 0:
            raise ValueError(f"gate_cap must be > 0, got {c.gate_cap}")
        d, h, k = x_BxTxD.shape[-1], c.num_heads, c.head_dim
        x = x_BxTxD.astype(c.dtype)
        by_head = lambda name: head_projection(self, name, x, num_heads=h, head_dim=k,
                                                init_std=c.init_std, use_bias=False,
                                                dtype=c.dtype, param_dtype=jnp.float32)

        def gate(name):  # [B, T, H]
            return projection(self, x, out_shape=(h,), names=("embed", "heads"),
                              init_std=d ** -0.5, use_bias=False, dtype=c.dtype,
                              param_dtype=jnp.float32, kernel=name)

        k_proj, gate_logit, decay_logit = by_head("key"), gate("gate"), gate("decay")
        kbar_BxTxHxK = key_state(
            self, step,
            lambda init: gated_key_average(k_proj, gate_logit, decay_logit, c.gate_cap, init),
            (x.shape[0], h, k))
        k_BxTxHxK = l2_normalize(kbar_BxTxHxK).astype(c.dtype)
        u_BxTxHxK, extract = value_extractor(self, x, num_heads=h, head_dim=k,
                                             init_std=c.init_std, dtype=c.dtype)
        raw = inverse_bandwidth_parameters(*c.bandwidth_init)
        p0_H, p1_H, pa_H = (per_head_param(self, name, nn.initializers.constant(value), h,
                                           jnp.float32)
                            for name, value in zip(("beta0", "beta1", "alpha"), raw, strict=True))
        beta = bandwidth_parameters(p0_H, p1_H, pa_H)
        if step is not None:
            return memory_step(self, step, keys_BxTxHxK=k_BxTxHxK, u_BxTxHxV=u_BxTxHxK,
                               extract=extract, mask=mask,
                               bandwidth=lambda pos: tier_bandwidth(pos, mask, *beta),
                               ring=mask.window, impl=c.impl)
        beta_TxH = tier_bandwidth(jnp.arange(x.shape[1]), mask, *beta)
        sow_retrieval(self, k_BxTxHxK, k_BxTxHxK, bandwidth=beta_TxH, mask=mask)
        return retrieve(k_BxTxHxK, extract(u_BxTxHxK), bandwidth=beta_TxH, mask=mask,
                        impl=c.impl, sharding=retrieval_sharding())


class ThreeTierMemory(nn.Module):
    """Short-term and (optionally) long-term memories, concatenated and fused by ``W_o``.

    ``[B, T, D] -> [B, T, D]``; the persistent tier (SwiGLU) lives in the block.
    """

    config: MemoryConfig

    @nn.compact
    def __call__(self, x_BxTxD: Array, *, deterministic: bool, long_term_skip,
                 step: DecodeStep | None = None) -> Array:
        c = self.config
        short_mask, long_mask = tier_masks(c.short_term_window, long_term_skip)
        heads = [MemoryTier(config=c, name="short_term")(x_BxTxD, mask=short_mask, step=step)]
        if c.long_term:
            heads.append(MemoryTier(config=c, name="long_term")(x_BxTxD, mask=long_mask,
                                                                step=step))
        y_BxTxGxK = jnp.concatenate(heads, axis=2)
        y_BxTxGxK = nn.Dropout(c.dropout_rate)(y_BxTxGxK, deterministic=deterministic)
        return HeadOutput(features=x_BxTxD.shape[-1], init_std=c.out_init_std, dtype=c.dtype,
                          name="out")(y_BxTxGxK)
