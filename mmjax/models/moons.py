"""The three-moons memory: one associative memory with complex projections (54 parameters).

Observations ``x_t`` hold ``M`` complex numbers stored as interleaved ``(re, im)`` reals
(``D = 2 M``). Three complex ``M x M`` matrices, each kept as a real parameter of shape
``[2, M, M]`` (real part, imaginary part), make the whole network::

    k_t = W_k x_t          v_t = W_v x_{t+1}          z_t = W_z y_t
    y_t = sum_{i <= t-1} softmax_i(beta <k_t, k_i>) v_i          (beta = 50, per head)

``<., .>`` is the real dot product of the interleaved reals, i.e. ``Re(conj(k_t) . k_i)``. The
``M`` complex key (and value) components are split into ``H`` heads of ``M / H`` components
each: 1 head of dimension 3 or 3 heads of dimension 1 for three moons. ``z_t`` predicts
``x_{t+1}``; ``z_0 = 0`` (an empty memory). No key normalisation, no bias.

Decoding keeps a :class:`MoonsCache` of past keys and values in fixed-size buffers: each step
writes one key and completes one value, then runs one retrieval query over the buffer (O(T)).

Logical axis names of the parameters: ``("complex", "moons_out", "moons_in")`` where
``complex`` indexes (real, imaginary) and the other two the matrix rows and columns.

Not a language model: registered as ``"moons_memory"`` so that ``build_model`` makes it from a
config like the others, and trained by ``mmjax.train``'s Trainer on the three-moons task
(``mmjax.moons.train``).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import register
from mmjax.ops import MaskSpec, retrieve

Array = jax.Array

MATRIX_NAMES = ("W_k", "W_v", "W_z")
LOGICAL_AXES = ("complex", "moons_out", "moons_in")


# ----------------------------------------------------------------------------- pure functions


def complex_matmul(w_2xMxM: Array, x_BxTxD: Array) -> Array:
    """Multiply interleaved complex vectors by a complex matrix held as (real, imag).

    Args:
      w_2xMxM: ``w[0] + i w[1]``.
      x_BxTxD: ``[..., 2 M]`` interleaved ``(re, im)`` reals.
    Returns:
      ``[..., 2 M]`` interleaved reals of ``W x``.
    """
    m = w_2xMxM.shape[-1]
    if x_BxTxD.shape[-1] != 2 * m:
        raise ValueError(
            f"x must have last dimension 2 * {m} = {2 * m} to match a {m}x{m} complex matrix, "
            f"got shape {x_BxTxD.shape}"
        )
    x_BxTxMx2 = x_BxTxD.reshape(*x_BxTxD.shape[:-1], m, 2)
    re, im = x_BxTxMx2[..., 0], x_BxTxMx2[..., 1]
    a, b = w_2xMxM[0], w_2xMxM[1]
    out_re = jnp.einsum("om,...m->...o", a, re) - jnp.einsum("om,...m->...o", b, im)
    out_im = jnp.einsum("om,...m->...o", a, im) + jnp.einsum("om,...m->...o", b, re)
    return jnp.stack([out_re, out_im], axis=-1).reshape(x_BxTxD.shape)


def split_heads(x_BxTxD: Array, num_heads: int) -> Array:
    """``[..., 2 M]`` -> ``[..., H, 2 M / H]`` (each head gets ``M / H`` whole complex numbers)."""
    return x_BxTxD.reshape(*x_BxTxD.shape[:-1], num_heads, x_BxTxD.shape[-1] // num_heads)


def merge_heads(x_BxTxHxK: Array) -> Array:
    return x_BxTxHxK.reshape(*x_BxTxHxK.shape[:-2], -1)


def complex_init(key: Array, shape, dtype=jnp.float32) -> Array:
    """The official init seen through its complex projection: each real 6x6 weight is
    ``U(+-1/sqrt(2M))`` and a complex entry averages two of them, in both parts."""
    if len(shape) != 3 or shape[0] != 2:
        raise ValueError(f"complex_init expects shape [2, M, M], got {shape}")
    limit = 1.0 / jnp.sqrt(2.0 * shape[-1])
    u_2x2xMxM = jax.random.uniform(key, (2, *shape), dtype, -limit, limit)
    return u_2x2xMxM.mean(axis=0)


class MoonsCache(NamedTuple):
    """Decoding state. ``length`` observations ``x_0..x_{length-1}`` have been seen: keys
    ``0..length-1`` and values ``0..length-2`` are filled; later slots are never visible to
    the queries made so far (strict-causal mask) and get overwritten before they are."""

    keys_BxTxHxK: Array
    values_BxTxHxK: Array
    length: Array  # int32 scalar


# ----------------------------------------------------------------------------- Flax module


@register("moons_memory")
class MoonsMemory(nn.Module):
    """One memory unit with complex key, value and output projections.

    Attributes:
      num_moons: ``M`` complex inputs (``D = 2 M`` reals).
      num_heads: ``H``; must divide ``num_moons``.
      bandwidth: the fixed ``beta`` of every head.
      impl: retrieval implementation for full sequences (see :func:`mmjax.ops.retrieve`).
      block_size: with ``impl="xla"``, the query and key tile size of the blocked retrieval
        (``block_size`` of :func:`mmjax.ops.retrieve`); ``None`` keeps its default. With head
        dimensions of 2 to 6 reals, tiles of 64 make a training step about 4 times cheaper
        on CPU than tiles of 256.
      skip: hide the ``skip`` most recent pairs from every query (``MaskSpec(skip=...)``);
        0 is the paper's model. A diagnostic knob: the trained nets lean on their most recent
        pairs, and the identity solution predicts almost perfectly once they are hidden.
    """

    num_moons: int = 3
    num_heads: int = 1
    bandwidth: float = 50.0
    impl: str = "xla"
    block_size: int | None = 64
    skip: int = 0

    def setup(self):
        if self.num_moons < 1 or self.num_heads < 1 or self.num_moons % self.num_heads:
            raise ValueError(
                f"num_heads must divide num_moons, got num_heads={self.num_heads}, "
                f"num_moons={self.num_moons}"
            )
        shape = (2, self.num_moons, self.num_moons)
        init = nn.with_logical_partitioning(complex_init, LOGICAL_AXES)
        self.W_k = self.param("W_k", init, shape)
        self.W_v = self.param("W_v", init, shape)
        self.W_z = self.param("W_z", init, shape)

    def _mask(self):
        return MaskSpec(skip=self.skip)

    def _beta_H(self):
        return jnp.full((self.num_heads,), self.bandwidth, jnp.float32)

    def _check_input(self, x):
        if x.ndim != 3 or x.shape[-1] != 2 * self.num_moons:
            raise ValueError(
                f"x must be [batch, time, 2 * num_moons = {2 * self.num_moons}], got {x.shape}"
            )

    def __call__(self, x_BxTxD: Array) -> Array:
        """Predictions ``z_t`` of ``x_{t+1}``, ``[batch, time, 2 M]``."""
        self._check_input(x_BxTxD)
        k_BxTxHxK = split_heads(complex_matmul(self.W_k, x_BxTxD), self.num_heads)
        # v_t = W_v x_{t+1}; the last value is never visible to a query of this sequence.
        x_next_BxTxD = jnp.pad(x_BxTxD[:, 1:], ((0, 0), (0, 1), (0, 0)))
        v_BxTxHxK = split_heads(complex_matmul(self.W_v, x_next_BxTxD), self.num_heads)
        y_BxTxHxK = retrieve(k_BxTxHxK, v_BxTxHxK, bandwidth=self._beta_H(), mask=self._mask(),
                             impl=self.impl, block_size=self.block_size)
        return complex_matmul(self.W_z, merge_heads(y_BxTxHxK))

    def _predict_at(self, cache: MoonsCache, k_BxHxK: Array, position: Array) -> Array:
        y_Bx1xHxK = retrieve(cache.keys_BxTxHxK, cache.values_BxTxHxK, bandwidth=self._beta_H(),
                             queries=k_BxHxK[:, None], query_offset=position, mask=self._mask(),
                             impl="reference")
        return complex_matmul(self.W_z, merge_heads(y_Bx1xHxK[:, 0]))

    def prefill(self, x_BxTxD: Array, length) -> tuple[MoonsCache, Array]:
        """Memorise the first ``length`` observations of ``x`` and predict the next one.

        Args:
          x_BxTxD: a buffer whose first ``length`` positions are the prompt; its size ``T``
            is the cache size (at least ``length`` + the number of decode steps).
          length: ``n >= 1`` observations (int, may be traced).
        Returns:
          ``(cache, pred_BxD)``: the prediction of ``x_n`` from ``x_0..x_{n-1}``.
        """
        self._check_input(x_BxTxD)
        length = jnp.asarray(length, jnp.int32)
        pos_T = jnp.arange(x_BxTxD.shape[1])
        k_BxTxHxK = split_heads(complex_matmul(self.W_k, x_BxTxD), self.num_heads)
        x_next_BxTxD = jnp.pad(x_BxTxD[:, 1:], ((0, 0), (0, 1), (0, 0)))
        v_BxTxHxK = split_heads(complex_matmul(self.W_v, x_next_BxTxD), self.num_heads)
        k_BxTxHxK = jnp.where((pos_T < length)[None, :, None, None], k_BxTxHxK, 0.0)
        v_BxTxHxK = jnp.where((pos_T < length - 1)[None, :, None, None], v_BxTxHxK, 0.0)
        cache = MoonsCache(keys_BxTxHxK=k_BxTxHxK, values_BxTxHxK=v_BxTxHxK, length=length)
        k_last_BxHxK = jax.lax.dynamic_index_in_dim(k_BxTxHxK, length - 1, axis=1,
                                                     keepdims=False)
        return cache, self._predict_at(cache, k_last_BxHxK, length - 1)

    def decode(self, cache: MoonsCache, x_new_BxD: Array) -> tuple[MoonsCache, Array]:
        """Observe ``x_n`` (``n = cache.length``) and predict ``x_{n+1}``.

        ``x_n`` completes the pair ``n-1`` (value ``W_v x_n``) and brings the key ``k_n``,
        which queries the pairs ``0..n-1``.
        """
        t = cache.length
        v_BxHxK = split_heads(complex_matmul(self.W_v, x_new_BxD), self.num_heads)
        k_BxHxK = split_heads(complex_matmul(self.W_k, x_new_BxD), self.num_heads)
        values = jax.lax.dynamic_update_index_in_dim(cache.values_BxTxHxK, v_BxHxK, t - 1, 1)
        keys = jax.lax.dynamic_update_index_in_dim(cache.keys_BxTxHxK, k_BxHxK, t, 1)
        cache = MoonsCache(keys_BxTxHxK=keys, values_BxTxHxK=values, length=t + 1)
        return cache, self._predict_at(cache, k_BxHxK, t)

    def rollout(self, x_BxTxD: Array, length, steps: int) -> Array:
        """Autoregressive predictions of ``x_n .. x_{n+steps-1}`` from the first ``n = length``
        observations, each prediction fed back as the next observation.

        ``x_BxTxD`` must have ``T >= n + steps - 1`` positions (only the first ``n`` are read).
        Returns ``[batch, steps, 2 M]``.
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        cache, pred_BxD = self.prefill(x_BxTxD, length)

        def step(carry, _):
            cache, pred_BxD = carry
            cache, nxt_BxD = self.decode(cache, pred_BxD)
            return (cache, nxt_BxD), pred_BxD

        (_, last_BxD), preds_JxBxD = jax.lax.scan(step, (cache, pred_BxD), None,
                                                  length=steps - 1)
        preds_JxBxD = jnp.concatenate([preds_JxBxD, last_BxD[None]], axis=0)
        return jnp.swapaxes(preds_JxBxD, 0, 1)


def complex_weights(params) -> dict[str, Array]:
    """``{"W_k": complex [M, M], ...}`` from a (possibly boxed) parameter dict."""
    params = nn.meta.unbox(params)
    return {name: params[name][0] + 1j * params[name][1] for name in MATRIX_NAMES}


def from_official_real(weight_DxD) -> Array:
    """The official code's real ``[2M, 2M]`` weight -> a ``[2, M, M]`` (real, imag) parameter.

    The official ``ComplexLinear`` (MLX) keeps a real matrix of 2x2 blocks and multiplies by
    its projection ``[[A, B], [-B, A]]`` with ``A = (w00 + w11) / 2``, ``B = (w01 - w10) / 2``
    per block: on interleaved ``(re, im)`` inputs that is the complex entry ``A - i B``. Any
    real matrix is accepted and projected the same way.
    """
    w = jnp.asarray(weight_DxD, jnp.float32)
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] % 2:
        raise ValueError(f"official weight must be a square [2M, 2M] matrix, got {w.shape}")
    real = 0.5 * (w[0::2, 0::2] + w[1::2, 1::2])
    imag = -0.5 * (w[0::2, 1::2] - w[1::2, 0::2])
    return jnp.stack([real, imag])


def to_official_real(w_2xMxM) -> Array:
    """Inverse of :func:`from_official_real`: the real ``[2M, 2M]`` block matrix."""
    w = jnp.asarray(w_2xMxM, jnp.float32)
    if w.ndim != 3 or w.shape[0] != 2 or w.shape[1] != w.shape[2]:
        raise ValueError(f"expected a [2, M, M] complex parameter, got {w.shape}")
    a, b = w[0], w[1]
    m = a.shape[0]
    blocks_Mx2xMx2 = jnp.stack([jnp.stack([a, -b], -1), jnp.stack([b, a], -1)], 1)
    return blocks_Mx2xMx2.reshape(2 * m, 2 * m)


def params_from_official(k_lin, v_lin, out_proj) -> dict[str, Array]:
    """Parameters from the official ``k_lin.weight``, ``v_lin.weight``, ``out_proj.weight``."""
    return {"W_k": from_official_real(k_lin), "W_v": from_official_real(v_lin),
            "W_z": from_official_real(out_proj)}


def identity_params(num_moons: int = 3) -> dict[str, Array]:
    """The analytic solution: all three matrices the identity."""
    eye_2xMxM = jnp.stack([jnp.eye(num_moons), jnp.zeros((num_moons, num_moons))])
    return {name: eye_2xMxM for name in MATRIX_NAMES}
