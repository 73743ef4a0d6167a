"""Causal multi-head attention over :func:`mmjax.ops.retrieve`, with optional RoPE, and the
separate short-term/long-term attention of the v2 paper's ablation (:class:`ShortLongAttention`).

The transformer baselines (GPT2, LLaMA, the separate short/long attention ablation) share the
retrieval core with Memory Mosaics: attention is ``retrieve`` with separate queries,
``query_offset=1`` (query ``t`` sits at absolute position ``t + 1`` in the mask arithmetic, so
it sees keys ``i <= t``: the diagonal is included) and bandwidth ``1/sqrt(head_dim)``.
With ``query_offset=1`` a ``MaskSpec(window=w, skip=s)`` lets query ``t`` see
``t + 1 - w <= i <= t - s``: the ``w`` most recent tokens including itself, minus the ``s``
most recent.

Attention-probability dropout cannot go through ``retrieve`` (the softmax is fused and never
materialised). ``attention_dropout`` is therefore applied to the per-head outputs before the
output projection, the position "attention heads output (before combining layer)" named in
Appendix C of "Memory Mosaics at Scale"; GPT2's dropout after ``c_proj`` is kept as is.

Parameters carry logical axis names: ``embed``, ``heads``, ``head_dim``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.cache import DecodeStep, retrieve_with_cache
from mmjax.layers.common import (
    HeadOutput,
    head_projection,
    per_head_dim,
    retrieval_sharding,
    sow_retrieval,
)
from mmjax.ops import MaskSpec, retrieve, tier_masks

Array = jax.Array


def rope_angles(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """Cosines and sines ``positions.shape + [head_dim // 2]`` of the rotary embedding (fp32)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    freqs_R = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * freqs_R
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BxTxHxK: Array, positions: Array, theta: float) -> Array:
    """Rotary position embedding (rotate-half pairing: dim ``j`` pairs with ``j + K/2``).

    Rotates each pair by ``position * theta^(-2j/K)``; scores then depend on positions only
    through their difference. ``positions``: ``[T]``, or ``[B, T]`` (one row per batch row,
    when decoding). Computed in fp32, returned in the input dtype.
    """
    k = x_BxTxHxK.shape[-1]
    cos, sin = rope_angles(positions, k, theta)
    cos_1xTx1xR = jnp.expand_dims(cos, -2) if cos.ndim == 3 else cos[None, :, None, :]
    sin_1xTx1xR = jnp.expand_dims(sin, -2) if sin.ndim == 3 else sin[None, :, None, :]
    x = x_BxTxHxK.astype(jnp.float32)
    x1, x2 = x[..., : k // 2], x[..., k // 2:]
    out = jnp.concatenate(
        [x1 * cos_1xTx1xR - x2 * sin_1xTx1xR, x2 * cos_1xTx1xR + x1 * sin_1xTx1xR], axis=-1
    )
    return out.astype(x_BxTxHxK.dtype)


def attention_bandwidth(num_heads: int, head_dim: int) -> Array:
    """The scale ``1/sqrt(head_dim)`` of attention scores as a ``[heads]`` bandwidth."""
    return jnp.full((num_heads,), 1.0 / jnp.sqrt(head_dim), jnp.float32)


def causal_attention(
    q_BxTxHxK: Array,
    k_BxTxHxK: Array,
    v_BxTxHxV: Array,
    *,
    window=None,
    skip=0,
    impl: str = "auto",
) -> Array:
    """Softmax attention including the diagonal: ``retrieve`` with ``query_offset=1``.

    Query ``t`` sees keys ``max(0, t + 1 - window) <= i <= t - skip`` with scores scaled by
    ``1/sqrt(K)``. Returns ``[B, T, H, V]``.
    """
    bandwidth_H = attention_bandwidth(q_BxTxHxK.shape[2], q_BxTxHxK.shape[3])
    return retrieve(
        k_BxTxHxK,
        v_BxTxHxV,
        queries=q_BxTxHxK,
        bandwidth=bandwidth_H,
        mask=MaskSpec(window=window, skip=skip),
        query_offset=1,
        impl=impl,
        sharding=retrieval_sharding(),
    )


class AttentionHeads(nn.Module):
    """Query/key/value projections (+ RoPE) and causal attention: ``[B,T,D] -> [B,T,H,K]``.

    Attributes:
      num_heads, head_dim: ``H`` and ``K``.
      window: ``None`` (full causal) or the number of most recent tokens (diagonal included)
        a query may see.
      rope_theta: ``None`` (no rotary embedding) or the RoPE base.
      use_bias: biases on the projections.
      init_std: std of the ``N(0, std^2)`` projection init.
      dtype, param_dtype: compute and storage dtypes.
    """

    num_heads: int
    head_dim: int
    window: int | None = None
    rope_theta: float | None = None
    use_bias: bool = False
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x_BxTxD: Array, *, skip=0, step: DecodeStep | None = None) -> Array:
        """``[B, T, D] -> [B, T, H, K]``; with ``step`` a cached call (an ordinary KV cache,
        :mod:`mmjax.layers.cache`)."""
        x = x_BxTxD.astype(self.dtype)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (
            head_projection(self, name, x, num_heads=self.num_heads, head_dim=self.head_dim,
                            init_std=self.init_std, use_bias=self.use_bias, dtype=self.dtype,
                            param_dtype=self.param_dtype)
            for name in ("query", "key", "value"))
        t = x.shape[1]
        positions = jnp.arange(t, dtype=jnp.int32) if step is None else step.query_positions(t)
        if self.rope_theta is not None:
            q_BxTxHxK = apply_rope(q_BxTxHxK, positions, self.rope_theta)
            k_BxTxHxK = apply_rope(k_BxTxHxK, positions, self.rope_theta)
        if step is not None:
            bandwidth_H = attention_bandwidth(self.num_heads, self.head_dim)
            return retrieve_with_cache(self, step, k_BxTxHxK, v_BxTxHxK, q_BxTxHxK,
                                       query_offset=1, mask=MaskSpec(window=self.window,
                                                                     skip=skip),
                                       bandwidth=lambda _: bandwidth_H, ring=None,
                                       impl=self.impl)
        sow_retrieval(self, q_BxTxHxK, k_BxTxHxK,
                      bandwidth=attention_bandwidth(self.num_heads, self.head_dim),
                      mask=MaskSpec(window=self.window, skip=skip), query_offset=1)
        return causal_attention(
            q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, window=self.window, skip=skip, impl=self.impl
        )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: heads, dropout on head outputs, ``c_proj``, dropout.

    Attributes:
      num_heads: ``H``; ``head_dim`` defaults to ``D / H``.
      attention_dropout: dropout on per-head outputs (stands in for attention-probability
        dropout, see the module docstring).
      residual_dropout: dropout after the output projection.
      out_init_std: std of the output projection init (GPT2: ``0.02 / sqrt(2 L)``).
    """

    num_heads: int
    head_dim: int | None = None
    window: int | None = None
    rope_theta: float | None = None
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    use_bias: bool = False
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x_BxTxD: Array, *, deterministic: bool = True, skip=0,
                 step: DecodeStep | None = None) -> Array:
        d = x_BxTxD.shape[-1]
        head_dim = self.head_dim or per_head_dim(d, self.num_heads)
        y_BxTxHxK = AttentionHeads(
            num_heads=self.num_heads, head_dim=head_dim, window=self.window,
            rope_theta=self.rope_theta,
            use_bias=self.use_bias, init_std=self.init_std, dtype=self.dtype,
            param_dtype=self.param_dtype, impl=self.impl, name="heads",
        )(x_BxTxD, skip=skip, step=step)
        y_BxTxHxK = nn.Dropout(self.attention_dropout)(y_BxTxHxK, deterministic=deterministic)
        out_BxTxD = HeadOutput(features=d, use_bias=self.use_bias, init_std=self.out_init_std,
                               dtype=self.dtype, param_dtype=self.param_dtype,
                               name="out")(y_BxTxHxK)
        return nn.Dropout(self.residual_dropout)(out_BxTxD, deterministic=deterministic)


class ShortLongAttention(nn.Module):
    """Separate short-term (window) and long-term (skip) attention heads fused by ``W_o``.

    Query ``t``'s short-term heads see tokens ``t - window + 1 .. t``; its long-term heads see
    ``0 .. t - long_term_skip``. ``[B, T, D] -> [B, T, D]``; dropout on the ``2 H``
    concatenated head outputs before ``W_o`` (``out``).
    """

    num_heads: int
    head_dim: int
    short_term_window: int
    rope_theta: float | None
    dropout_rate: float = 0.0
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x_BxTxD: Array, *, deterministic: bool, long_term_skip,
                 step: DecodeStep | None = None) -> Array:
        short_mask, long_mask = tier_masks(self.short_term_window, long_term_skip)

        def heads(mask, name):
            return AttentionHeads(num_heads=self.num_heads, head_dim=self.head_dim,
                                  window=mask.window, rope_theta=self.rope_theta,
                                  init_std=self.init_std, dtype=self.dtype,
                                  param_dtype=self.param_dtype, impl=self.impl, name=name)

        short_BxTxHxK = heads(short_mask, "short_term")(x_BxTxD, step=step)
        long_BxTxHxK = heads(long_mask, "long_term")(x_BxTxD, skip=long_mask.skip, step=step)
        y_BxTxGxK = jnp.concatenate([short_BxTxHxK, long_BxTxHxK], axis=2)
        y_BxTxGxK = nn.Dropout(self.dropout_rate)(y_BxTxGxK, deterministic=deterministic)
        return HeadOutput(features=x_BxTxD.shape[-1], init_std=self.out_init_std,
                          dtype=self.dtype, param_dtype=self.param_dtype, name="out")(y_BxTxGxK)

