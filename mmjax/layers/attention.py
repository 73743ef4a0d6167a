"""Causal multi-head attention over :func:`mmjax.ops.retrieve`, with optional RoPE.

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

from mmjax.ops.retrieval import MaskSpec, retrieve

Array = jax.Array


def normal_init(std: float, names: tuple):
    """``N(0, std^2)`` initializer annotated with logical axis ``names``."""
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


def rope_angles(positions_T: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """Cosines and sines ``[T, head_dim // 2]`` of the rotary embedding (fp32)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    freqs_F = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_TxF = positions_T.astype(jnp.float32)[:, None] * freqs_F[None, :]
    return jnp.cos(angles_TxF), jnp.sin(angles_TxF)


def apply_rope(x_BxTxHxK: Array, positions_T: Array, theta: float) -> Array:
    """Rotary position embedding (rotate-half pairing: dim ``j`` pairs with ``j + K/2``).

    Rotates each pair by ``position * theta^(-2j/K)``; scores then depend on positions only
    through their difference. Computed in fp32, returned in the input dtype.
    """
    k = x_BxTxHxK.shape[-1]
    cos_TxF, sin_TxF = rope_angles(positions_T, k, theta)
    cos_1xTx1xF, sin_1xTx1xF = cos_TxF[None, :, None, :], sin_TxF[None, :, None, :]
    x = x_BxTxHxK.astype(jnp.float32)
    x1, x2 = x[..., : k // 2], x[..., k // 2:]
    out = jnp.concatenate(
        [x1 * cos_1xTx1xF - x2 * sin_1xTx1xF, x2 * cos_1xTx1xF + x1 * sin_1xTx1xF], axis=-1
    )
    return out.astype(x_BxTxHxK.dtype)


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
    h, dk = q_BxTxHxK.shape[2], q_BxTxHxK.shape[3]
    bandwidth_H = jnp.full((h,), 1.0 / jnp.sqrt(dk), jnp.float32)
    return retrieve(
        k_BxTxHxK,
        v_BxTxHxV,
        queries=q_BxTxHxK,
        bandwidth=bandwidth_H,
        mask=MaskSpec(window=window, skip=skip),
        query_offset=1,
        impl=impl,
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
    """

    num_heads: int
    head_dim: int
    window: int | None = None
    rope_theta: float | None = None
    use_bias: bool = False
    init_std: float = 0.02
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x_BxTxD: Array, *, skip=0) -> Array:
        d = x_BxTxD.shape[-1]
        shape = (d, self.num_heads, self.head_dim)
        names = ("embed", "heads", "head_dim")
        x = x_BxTxD.astype(self.dtype)
        qkv = []
        for name in ("query", "key", "value"):
            w_DxHxK = self.param(name, normal_init(self.init_std, names), shape)
            y_BxTxHxK = jnp.einsum("btd,dhk->bthk", x, jnp.asarray(w_DxHxK, self.dtype))
            if self.use_bias:
                b_HxK = self.param(
                    f"{name}_bias",
                    nn.with_logical_partitioning(nn.initializers.zeros, names[1:]),
                    shape[1:],
                )
                y_BxTxHxK = y_BxTxHxK + jnp.asarray(b_HxK, self.dtype)
            qkv.append(y_BxTxHxK)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = qkv
        if self.rope_theta is not None:
            positions_T = jnp.arange(x.shape[1], dtype=jnp.int32)
            q_BxTxHxK = apply_rope(q_BxTxHxK, positions_T, self.rope_theta)
            k_BxTxHxK = apply_rope(k_BxTxHxK, positions_T, self.rope_theta)
        return causal_attention(
            q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, window=self.window, skip=skip, impl=self.impl
        )


class HeadOutput(nn.Module):
    """Output projection fusing head outputs: ``[B,T,H,V] -> [B,T,D]`` (``c_proj`` / ``W_o``).

    Used by attention and by the v2 memories (whose short- and long-term heads are
    concatenated along the head axis before this projection).
    """

    features: int
    use_bias: bool = False
    init_std: float = 0.02
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y_BxTxHxV: Array) -> Array:
        h, v = y_BxTxHxV.shape[-2:]
        w_HxVxD = self.param(
            "kernel", normal_init(self.init_std, ("heads", "head_dim", "embed")),
            (h, v, self.features),
        )
        out_BxTxD = jnp.einsum(
            "bthv,hvd->btd", y_BxTxHxV.astype(self.dtype), jnp.asarray(w_HxVxD, self.dtype)
        )
        if self.use_bias:
            b_D = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                (self.features,),
            )
            out_BxTxD = out_BxTxD + jnp.asarray(b_D, self.dtype)
        return out_BxTxD


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
    impl: str = "auto"

    @nn.compact
    def __call__(self, x_BxTxD: Array, *, deterministic: bool = True, skip=0) -> Array:
        d = x_BxTxD.shape[-1]
        head_dim = self.head_dim or split_heads(d, self.num_heads)
        y_BxTxHxK = AttentionHeads(
            self.num_heads, head_dim, window=self.window, rope_theta=self.rope_theta,
            use_bias=self.use_bias, init_std=self.init_std, dtype=self.dtype, impl=self.impl,
            name="heads",
        )(x_BxTxD, skip=skip)
        y_BxTxHxK = nn.Dropout(self.attention_dropout)(y_BxTxHxK, deterministic=deterministic)
        out_BxTxD = HeadOutput(d, use_bias=self.use_bias, init_std=self.out_init_std,
                               dtype=self.dtype, name="out")(y_BxTxHxK)
        return nn.Dropout(self.residual_dropout)(out_BxTxD, deterministic=deterministic)


def split_heads(embed_dim: int, num_heads: int) -> int:
    """``embed_dim // num_heads``, raising when it does not divide."""
    if num_heads < 1 or embed_dim % num_heads:
        raise ValueError(
            f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})"
        )
    return embed_dim // num_heads
