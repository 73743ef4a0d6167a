"""v1 memory units (official Library ``StackAssoMem``, non-EFT), and the value extractor
that v1 and v2 share.

Both units are thin shells over :mod:`mmjax.ops`: keys from :func:`mmjax.ops.leaky_keys`
(unit norm times the key scale, the retrieval bandwidth folded into the keys), values from
:func:`value_extractor`, :func:`mmjax.ops.retrieve` (strict causal for
:class:`ContextualMemory`, every learned slot for :class:`PersistentMemory`), then
``HeadOutput`` (``out``, the official ``c_proj``) and ``dropout_rate``. Only the persistent
memory applies ``pmem_attention_dropout`` (the official ``ic_dropout``), densely
(``docs/official_code.md`` says why). The equations: ``docs/architecture.md``, section 5;
decoding: :mod:`mmjax.layers.cache`.

With ``mutable=["intermediates"]`` both units sow ``keys`` and ``retrieved`` (the input of
``out``, ``[B, T, H, V]``); the contextual memory also sows ``values``. Logical axes:
``embed``, ``heads``, ``head_dim``, ``slots``, ``banks``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.cache import DecodeStep, key_state, memory_step
from mmjax.layers.common import (
    HeadOutput,
    head_projection,
    normal_init,
    retrieval_sharding,
    sow_retrieval,
)
from mmjax.ops import (
    EXP_PARAM_SCALE,
    MaskSpec,
    extract_values,
    leaky_key_average,
    retrieval_weights,
    retrieve,
    scaled_unit_keys,
)

Array = jax.Array

VALUE_BETA_INIT = -0.5 / EXP_PARAM_SCALE

# Cached calls with at most this many tokens (batch x time) retrieve from the persistent
# memory densely (``impl="reference"``).
DENSE_DECODE_QUERIES = 256


def leaky_key_beta_init(key, shape, dtype=jnp.float32):
    """Official init of the per-head leaky-average rates: ``linspace(0.5, 5, H) / 10``."""
    del key
    return (jnp.linspace(0.5, 5.0, shape[0]) / EXP_PARAM_SCALE).astype(dtype)


def per_head_param(module: nn.Module, name: str, init, num_heads: int, param_dtype) -> Array:
    """A ``[heads]`` parameter (logical axis ``heads``)."""
    return module.param(name, nn.with_logical_partitioning(init, ("heads",)), (num_heads,),
                        param_dtype)


def value_extractor(module: nn.Module, x_BxTxD: Array, *, num_heads: int, head_dim: int,
                    init_std: float, use_bias: bool = False, dtype=jnp.float32,
                    param_dtype=jnp.float32) -> tuple[Array, Any]:
    """The value extractor of a v1 contextual memory or a v2 tier, with the parameters
    ``value``, ``value_bias``, ``value_mix`` (``c_h ~ U(0, 1)``) and ``value_beta``
    (``-0.05``) declared on ``module``.

    Returns:
      ``(u, extract)``: the value inputs ``u_t = W_v x_t (+ b_v)`` ``[B, T, H, V]`` and
      ``extract(u) -> values``, :func:`mmjax.ops.extract_values` with the parameters (apart,
      because decoding completes a value with the next call's first input).
    """
    u_BxTxHxV = head_projection(module, "value", x_BxTxD, num_heads=num_heads,
                                head_dim=head_dim, init_std=init_std, use_bias=use_bias,
                                dtype=dtype, param_dtype=param_dtype)
    mix_H = per_head_param(module, "value_mix", nn.initializers.uniform(1.0), num_heads,
                           param_dtype)
    value_beta_H = per_head_param(module, "value_beta", nn.initializers.constant(VALUE_BETA_INIT),
                                  num_heads, param_dtype)
    return u_BxTxHxV, lambda u: extract_values(u, mix_H, value_beta_H)


@dataclasses.dataclass(frozen=True)
class MemoryUnitConfig:
    """Settings of a v1 memory unit, shared by :class:`ContextualMemory` and
    :class:`PersistentMemory` (and built once per model by :class:`mmjax.models.memory_mosaic.
    MemoryMosaic`).

    Attributes:
      num_heads: ``H``; the input width must be a multiple.
      use_bias: biases on the key/value projections and ``out`` (official ``bias``).
      dropout_rate: dropout rate after ``out`` (official ``hd_dropout``).
      init_std: std of the key/value projection init (official: ``1/sqrt(D)``).
      out_init_std: std of the ``out`` init (official: ``1/sqrt(D)/sqrt(num_layers)``).
      impl: retrieval implementation (see :func:`mmjax.ops.retrieve`).
      dtype: compute dtype; param_dtype: storage dtype of the parameters.
      pmem_size, pmem_count, pmem_attention_dropout: persistent memory only (slots per head
        and bank, banks averaged, dropout on the retrieval probabilities: official
        ``ic_dropout``).
    """

    num_heads: int
    use_bias: bool = False
    dropout_rate: float = 0.0
    init_std: float | None = None  # None: 1/sqrt(D)
    out_init_std: float | None = None  # None: 1/sqrt(D)
    impl: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    pmem_size: int = 2688
    pmem_count: int = 1
    pmem_attention_dropout: float = 0.0


class _MemoryUnit(nn.Module):
    """Keys and the output projection, shared by both v1 memory units."""

    config: MemoryUnitConfig

    def _check_input(self, x_BxTxD: Array) -> tuple[int, int]:
        if x_BxTxD.ndim != 3:
            raise ValueError(f"x must be [batch, time, embed], got shape {x_BxTxD.shape}")
        d = x_BxTxD.shape[-1]
        if d % self.config.num_heads:
            raise ValueError(
                f"embed width {d} must be divisible by num_heads={self.config.num_heads}"
            )
        return d, d // self.config.num_heads

    def _init_std(self, d: int, std: float | None) -> float:
        return d**-0.5 if std is None else std

    def _heads_param(self, name: str, init) -> Array:
        c = self.config
        return per_head_param(self, name, init, c.num_heads, c.param_dtype)

    def _keys(self, x_BxTxD: Array, power: int, step: DecodeStep | None) -> Array:
        c = self.config
        d, k = self._check_input(x_BxTxD)
        k_BxTxHxK = head_projection(self, "key", x_BxTxD, num_heads=c.num_heads, head_dim=k,
                                    init_std=self._init_std(d, c.init_std),
                                    use_bias=c.use_bias, dtype=c.dtype,
                                    param_dtype=c.param_dtype)
        leaky_key_beta = self._heads_param("leaky_key_beta", leaky_key_beta_init)
        kernel_beta = self._heads_param("kernel_beta",
                                        nn.initializers.constant(1.0 / EXP_PARAM_SCALE))
        kbar_BxTxHxK = key_state(
            self, step, lambda init: leaky_key_average(k_BxTxHxK, leaky_key_beta, init),
            (x_BxTxD.shape[0], c.num_heads, k))
        return scaled_unit_keys(kbar_BxTxHxK, kernel_beta, power).astype(c.dtype)

    def _output(self, y_BxTxHxV: Array, deterministic: bool) -> Array:
        c = self.config
        d = y_BxTxHxV.shape[2] * y_BxTxHxV.shape[3]
        out_BxTxD = HeadOutput(features=d, use_bias=c.use_bias,
                               init_std=self._init_std(d, c.out_init_std), dtype=c.dtype,
                               param_dtype=c.param_dtype, name="out")(y_BxTxHxV)
        return nn.Dropout(c.dropout_rate)(out_BxTxD, deterministic=deterministic)


class ContextualMemory(_MemoryUnit):
    """Contextual (in-context) associative memory, official ``InContextAssoMemBlock``.

    ``pmem_attention_dropout`` is not applied here (see the module docstring).
    """

    @nn.compact
    def __call__(self, x_BxTxD: Array, *, deterministic: bool = True,
                 step: DecodeStep | None = None) -> Array:
        """``[batch, time, embed] -> [batch, time, embed]`` (with ``step``: a cached call,
        :mod:`mmjax.layers.cache`)."""
        c = self.config
        d, kdim = self._check_input(x_BxTxD)
        k_BxTxHxK = self._keys(x_BxTxD, power=1, step=step)
        u_BxTxHxV, extract = value_extractor(self, x_BxTxD, num_heads=c.num_heads,
                                             head_dim=kdim,
                                             init_std=self._init_std(d, c.init_std),
                                             use_bias=c.use_bias, dtype=c.dtype,
                                             param_dtype=c.param_dtype)
        if step is not None:
            y_BxTxHxV = memory_step(self, step, keys_BxTxHxK=k_BxTxHxK, u_BxTxHxV=u_BxTxHxV,
                                    extract=extract, mask=MaskSpec(),
                                    bandwidth=lambda _: None, ring=None, impl=c.impl)
            return self._output(y_BxTxHxV, deterministic)
        v_BxTxHxV = extract(u_BxTxHxV)
        y_BxTxHxV = retrieve(k_BxTxHxK, v_BxTxHxV, mask=MaskSpec(), impl=c.impl,
                             sharding=retrieval_sharding())
        self.sow("intermediates", "keys", k_BxTxHxK)
        self.sow("intermediates", "values", v_BxTxHxV)
        self.sow("intermediates", "retrieved", y_BxTxHxV)
        sow_retrieval(self, k_BxTxHxK, k_BxTxHxK, mask=MaskSpec())
        return self._output(y_BxTxHxV, deterministic)


class PersistentMemory(_MemoryUnit):
    """Persistent associative memory, official ``PersistentAssoMemBlock`` + ``Pmem``.

    Uses ``pmem_size`` (``S``), ``pmem_count`` (``P`` banks, averaged) and
    ``pmem_attention_dropout`` of its config. Parameters ``memory_keys`` /
    ``memory_values``: ``[banks, slots, heads, head_dim]``, init ``N(0, 1/sqrt(head_dim))``.
    """

    @nn.compact
    def __call__(self, x_BxTxD: Array, *, deterministic: bool = True,
                 step: DecodeStep | None = None) -> Array:
        """``[batch, time, embed] -> [batch, time, embed]`` (with ``step``: a cached call;
        only the key state is cached, the slots are parameters)."""
        c = self.config
        _, kdim = self._check_input(x_BxTxD)
        if c.pmem_size < 1 or c.pmem_count < 1:
            raise ValueError(
                f"pmem_size and pmem_count must be >= 1, got {c.pmem_size}, {c.pmem_count}"
            )
        b, t, _ = x_BxTxD.shape
        h, s, p = c.num_heads, c.pmem_size, c.pmem_count
        k_BxTxHxK = self._keys(x_BxTxD, power=2, step=step)
        shape = (p, s, h, kdim)
        names = ("banks", "slots", "heads", "head_dim")
        mk_PxSxHxK = self.param("memory_keys", normal_init(kdim**-0.5, names), shape,
                                c.param_dtype).astype(c.dtype)
        mv_PxSxHxV = self.param("memory_values", normal_init(kdim**-0.5, names), shape,
                                c.param_dtype).astype(c.dtype)
        value_beta = self._heads_param("value_beta", nn.initializers.constant(VALUE_BETA_INIT))
        # Banks ride on the batch axis, batch and time on the query axis: queries at absolute
        # positions >= S see every slot under the strict-causal mask.
        q_PxQxHxK = jnp.broadcast_to(k_BxTxHxK.reshape(1, b * t, h, kdim), (p, b * t, h, kdim))
        if c.pmem_attention_dropout > 0.0 and not deterministic:
            beta_QxH = jnp.ones((b * t, h), jnp.float32)
            w_PxHxQxS = retrieval_weights(q_PxQxHxK, mk_PxSxHxK, beta_QxH, MaskSpec(),
                                          jnp.asarray(s, jnp.int32))
            w_PxHxQxS = nn.Dropout(c.pmem_attention_dropout)(w_PxHxQxS, deterministic=False)
            y_PxQxHxV = jnp.einsum("phqs,pshv->pqhv", w_PxHxQxS.astype(c.dtype),
                                   mv_PxSxHxV, preferred_element_type=jnp.float32)
        else:
            # A decoding step has a handful of queries: two small matmuls beat the blocked loop.
            impl = "reference" if step is not None and b * t <= DENSE_DECODE_QUERIES else c.impl
            y_PxQxHxV = retrieve(mk_PxSxHxK, mv_PxSxHxV, queries=q_PxQxHxK, mask=MaskSpec(),
                                 query_offset=s, impl=impl,
                                 sharding=retrieval_sharding(queries_are_tokens=True))
        y_BxTxHxV = jnp.mean(y_PxQxHxV.astype(jnp.float32), axis=0).reshape(b, t, h, kdim)
        v_scale_H = jnp.exp(EXP_PARAM_SCALE * value_beta.astype(jnp.float32))
        y_BxTxHxV = y_BxTxHxV * v_scale_H[:, None]
        chex.assert_shape(y_BxTxHxV, (b, t, h, kdim))
        self.sow("intermediates", "keys", k_BxTxHxK)
        self.sow("intermediates", "retrieved", y_BxTxHxV)
        return self._output(y_BxTxHxV, deterministic)
