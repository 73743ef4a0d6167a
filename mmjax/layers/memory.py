"""v1 memory units (official Library ``StackAssoMem``, non-EFT): contextual and persistent.

Both are thin shells over :mod:`mmjax.ops`. Per head ``h`` (``H`` heads of width ``K = D/H``):

* keys: ``k~_t = W_k x_t (+ b_k)``; leaky average ``kbar_t = e^{-lam_h} kbar_{t-1} +
  (1 - e^{-lam_h}) k~_t`` with ``lam_h = 10 |leaky_key_beta_h|`` (an O(T) scan);
  ``k_t = kbar_t / |kbar_t| * s_h^p`` with ``s_h = exp(min(10 kernel_beta_h, 5))`` (clamped
  before the power) and ``p = 1`` (contextual) or ``p = 2`` (persistent). No epsilon in norms.
  The key scale is the retrieval bandwidth folded into the keys (retrieval bandwidth is 1).
* values (contextual only): ``u_t = W_v x_t (+ b_v)``, ``v_t = normalize((1 - c_h) u_{t+1} +
  c_h u_t) * exp(10 value_beta_h)`` with ``u_T = 0`` and ``c_h`` unconstrained.
* contextual retrieval: strict-causal (``i <= t - 1``), so row ``t = 0`` is exactly 0.
* persistent retrieval: every one of ``pmem_size`` learned slots per head is visible; the
  outputs of ``pmem_count`` banks are averaged, then scaled by ``exp(10 value_beta_h)``.
* output: ``c_proj`` (``[H, V, D]`` kernel, optional bias), then dropout ``hd_dropout``.

Dropout on the attention probabilities (the Library's ``ic_dropout``):

* :class:`PersistentMemory` applies it, as the official code does, when ``ic_dropout > 0``
  and ``deterministic=False``; the probabilities are then materialised densely
  (:func:`mmjax.ops.retrieval_weights`, ``[B, H, T, S]``) because the fused retrieval
  never forms them. Without dropout it calls :func:`mmjax.ops.retrieve`.
* :class:`ContextualMemory` does NOT apply it: dense ``T x T`` probabilities would defeat the
  O(T)-memory retrieval. This matches the official EFT variant (the one the official training
  script uses), which never applies ``ic_dropout`` to contextual attention; the non-EFT
  Library class does. In evaluation (dropout off) both agree exactly.

With ``mutable=["intermediates"]`` both units sow ``keys`` and ``retrieved`` (the input of
``c_proj``, ``[B, T, H, V]``); the contextual memory also sows ``values``.

Logical axis names of the parameters: ``embed`` (model width), ``heads``, ``head_dim``,
``slots`` (persistent-memory slots) and ``banks`` (the ``pmem_count`` independent banks).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.ops import (
    MaskSpec,
    l2_normalize,
    leaky_average,
    peek_ahead_values,
    retrieval_weights,
    retrieve,
)

Array = jax.Array

# Official constants: scalars are stored divided by 10, and the key scale is clamped to e^5
# (so that scores stay below fp16's maximum).
EXP_PARAM_SCALE = 10.0
KERNEL_BETA_MAX = 5.0


def leaky_key_beta_init(key, shape, dtype=jnp.float32):
    """Official init of the per-head leaky-average rates: ``linspace(0.5, 5, H) / 10``."""
    del key
    return (jnp.linspace(0.5, 5.0, shape[0]) / EXP_PARAM_SCALE).astype(dtype)


def _param(module: nn.Module, name: str, init, names: tuple[str, ...], shape, dtype):
    return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


def _constant(value: float):
    return nn.initializers.constant(value)


def key_scale(kernel_beta_H: Array, power: int) -> Array:
    """``exp(min(10 * kernel_beta, 5)) ** power`` in fp32 (the clamp comes before the power)."""
    s = jnp.exp(jnp.minimum(EXP_PARAM_SCALE * kernel_beta_H.astype(jnp.float32),
                            KERNEL_BETA_MAX))
    return s**power


def leaky_keys(x_BxTxD, kernel_DxHxK, bias_HxK, leaky_key_beta_H, kernel_beta_H, power):
    """Keys of a v1 memory unit: projection, leaky average, unit norm, key scale.

    Returns fp32 ``[batch, time, heads, head_dim]``.
    """
    k_BxTxHxK = jnp.einsum("btd,dhk->bthk", x_BxTxD, kernel_DxHxK)
    if bias_HxK is not None:
        k_BxTxHxK = k_BxTxHxK + bias_HxK
    decay_H = jnp.exp(-EXP_PARAM_SCALE * jnp.abs(leaky_key_beta_H.astype(jnp.float32)))
    kbar_BxTxHxK = leaky_average(k_BxTxHxK, decay_H)
    return l2_normalize(kbar_BxTxHxK) * key_scale(kernel_beta_H, power)[:, None]


class _MemoryUnit(nn.Module):
    """Parameters and code shared by both memory units (keys and the output projection)."""

    num_heads: int
    use_bias: bool = False
    hd_dropout: float = 0.0
    output_init_scale: float = 1.0
    impl: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _check_input(self, x_BxTxD: Array) -> tuple[int, int]:
        if x_BxTxD.ndim != 3:
            raise ValueError(f"x must be [batch, time, embed], got shape {x_BxTxD.shape}")
        d = x_BxTxD.shape[-1]
        if d % self.num_heads:
            raise ValueError(
                f"embed width {d} must be divisible by num_heads={self.num_heads}"
            )
        return d, d // self.num_heads

    def _heads_param(self, name: str, init) -> Array:
        return _param(self, name, init, ("heads",), (self.num_heads,), self.param_dtype)

    def _keys(self, x_BxTxD: Array, power: int) -> Array:
        d, k = self._check_input(x_BxTxD)
        h = self.num_heads
        kernel = _param(self, "key_kernel", nn.initializers.normal(d**-0.5),
                        ("embed", "heads", "head_dim"), (d, h, k), self.param_dtype)
        bias = None
        if self.use_bias:
            bias = _param(self, "key_bias", nn.initializers.zeros, ("heads", "head_dim"),
                          (h, k), self.param_dtype)
            bias = bias.astype(self.dtype)
        leaky_key_beta = self._heads_param("leaky_key_beta", leaky_key_beta_init)
        kernel_beta = self._heads_param("kernel_beta", _constant(1.0 / EXP_PARAM_SCALE))
        x_BxTxD = x_BxTxD.astype(self.dtype)
        return leaky_keys(x_BxTxD, kernel.astype(self.dtype), bias, leaky_key_beta,
                          kernel_beta, power)

    def _output(self, y_BxTxHxV: Array, deterministic: bool) -> Array:
        b, t, h, v = y_BxTxHxV.shape
        d = h * v
        std = d**-0.5 * self.output_init_scale
        kernel = _param(self, "output_kernel", nn.initializers.normal(std),
                        ("heads", "head_dim", "embed"), (h, v, d), self.param_dtype)
        out_BxTxD = jnp.einsum("bthv,hvd->btd", y_BxTxHxV.astype(self.dtype),
                               kernel.astype(self.dtype))
        if self.use_bias:
            bias = _param(self, "output_bias", nn.initializers.zeros, ("embed",), (d,),
                          self.param_dtype)
            out_BxTxD = out_BxTxD + bias.astype(self.dtype)
        return nn.Dropout(self.hd_dropout)(out_BxTxD, deterministic=deterministic)


class ContextualMemory(_MemoryUnit):
    """Contextual (in-context) associative memory, official ``InContextAssoMemBlock``.

    Attributes:
      num_heads: ``H``; the input width must be a multiple.
      use_bias: biases on the key/value projections and ``c_proj`` (official ``bias``).
      hd_dropout: dropout rate after ``c_proj``.
      output_init_scale: ``c_proj`` init std is ``output_init_scale / sqrt(D)``
        (the model passes ``1/sqrt(num_layers)``).
      impl: retrieval implementation (see :func:`mmjax.ops.retrieve`).
      dtype: compute dtype; param_dtype: storage dtype of the parameters.

    ``ic_dropout`` is not applied here (see the module docstring).
    """

    @nn.compact
    def __call__(self, x_BxTxD: Array, *, deterministic: bool = True) -> Array:
        """``[batch, time, embed] -> [batch, time, embed]``."""
        d, kdim = self._check_input(x_BxTxD)
        h = self.num_heads
        k_BxTxHxK = self._keys(x_BxTxD, power=1).astype(self.dtype)
        value_kernel = _param(self, "value_kernel", nn.initializers.normal(d**-0.5),
                              ("embed", "heads", "head_dim"), (d, h, kdim), self.param_dtype)
        u_BxTxHxV = jnp.einsum("btd,dhv->bthv", x_BxTxD.astype(self.dtype),
                               value_kernel.astype(self.dtype))
        if self.use_bias:
            value_bias = _param(self, "value_bias", nn.initializers.zeros,
                                ("heads", "head_dim"), (h, kdim), self.param_dtype)
            u_BxTxHxV = u_BxTxHxV + value_bias.astype(self.dtype)
        value_mix = self._heads_param("value_mix", nn.initializers.uniform(1.0))
        value_beta = self._heads_param("value_beta", _constant(-0.5 / EXP_PARAM_SCALE))
        v_BxTxHxV = l2_normalize(peek_ahead_values(u_BxTxHxV, value_mix.astype(self.dtype)))
        v_scale_H = jnp.exp(EXP_PARAM_SCALE * value_beta.astype(jnp.float32))
        v_BxTxHxV = (v_BxTxHxV * v_scale_H[:, None]).astype(self.dtype)
        y_BxTxHxV = retrieve(k_BxTxHxK, v_BxTxHxV, mask=MaskSpec(), impl=self.impl)
        self.sow("intermediates", "keys", k_BxTxHxK)
        self.sow("intermediates", "values", v_BxTxHxV)
        self.sow("intermediates", "retrieved", y_BxTxHxV)
        return self._output(y_BxTxHxV, deterministic)


class PersistentMemory(_MemoryUnit):
    """Persistent associative memory, official ``PersistentAssoMemBlock`` + ``Pmem``.

    Attributes (besides those of :class:`ContextualMemory`):
      pmem_size: ``S``, learned key/value slots per head and bank.
      pmem_count: number of banks; their retrieval outputs are averaged.
      ic_dropout: dropout rate on the retrieval probabilities (training only).

    Parameters ``memory_keys`` / ``memory_values``: ``[banks, slots, heads, head_dim]``,
    init ``N(0, 1/sqrt(head_dim))``.
    """

    pmem_size: int = 2688
    pmem_count: int = 1
    ic_dropout: float = 0.0

    @nn.compact
    def __call__(self, x_BxTxD: Array, *, deterministic: bool = True) -> Array:
        """``[batch, time, embed] -> [batch, time, embed]``."""
        _, kdim = self._check_input(x_BxTxD)
        if self.pmem_size < 1 or self.pmem_count < 1:
            raise ValueError(
                f"pmem_size and pmem_count must be >= 1, got {self.pmem_size}, "
                f"{self.pmem_count}"
            )
        b, t, _ = x_BxTxD.shape
        h, s, p = self.num_heads, self.pmem_size, self.pmem_count
        k_BxTxHxK = self._keys(x_BxTxD, power=2).astype(self.dtype)
        shape = (p, s, h, kdim)
        names = ("banks", "slots", "heads", "head_dim")
        init = nn.initializers.normal(kdim**-0.5)
        mk_PxSxHxK = _param(self, "memory_keys", init, names, shape, self.param_dtype)
        mv_PxSxHxV = _param(self, "memory_values", init, names, shape, self.param_dtype)
        mk_PxSxHxK = mk_PxSxHxK.astype(self.dtype)
        mv_PxSxHxV = mv_PxSxHxV.astype(self.dtype)
        value_beta = self._heads_param("value_beta", _constant(-0.5 / EXP_PARAM_SCALE))
        # Banks ride on the batch axis, batch and time on the query axis: queries at absolute
        # positions >= S see every slot under the strict-causal mask.
        q_PxQxHxK = jnp.broadcast_to(k_BxTxHxK.reshape(1, b * t, h, kdim), (p, b * t, h, kdim))
        if self.ic_dropout > 0.0 and not deterministic:
            beta_QxH = jnp.ones((b * t, h), jnp.float32)
            w_PxHxQxS = retrieval_weights(q_PxQxHxK, mk_PxSxHxK, beta_QxH, MaskSpec(),
                                          jnp.asarray(s, jnp.int32))
            w_PxHxQxS = nn.Dropout(self.ic_dropout)(w_PxHxQxS, deterministic=False)
            y_PxQxHxV = jnp.einsum("phqs,pshv->pqhv", w_PxHxQxS.astype(self.dtype),
                                   mv_PxSxHxV, preferred_element_type=jnp.float32)
        else:
            y_PxQxHxV = retrieve(mk_PxSxHxK, mv_PxSxHxV, queries=q_PxQxHxK, mask=MaskSpec(),
                                 query_offset=s, impl=self.impl)
        y_BxTxHxV = jnp.mean(y_PxQxHxV.astype(jnp.float32), axis=0).reshape(b, t, h, kdim)
        v_scale_H = jnp.exp(EXP_PARAM_SCALE * value_beta.astype(jnp.float32))
        y_BxTxHxV = y_BxTxHxV * v_scale_H[:, None]
        self.sow("intermediates", "keys", k_BxTxHxK)
        self.sow("intermediates", "retrieved", y_BxTxHxV)
        return self._output(y_BxTxHxV, deterministic)
