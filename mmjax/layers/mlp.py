"""Feed-forward blocks: the GPT2 GELU MLP and the SwiGLU FFN (v2 persistent memory, LLaMA).

Parameters carry logical axis names ``embed`` and ``mlp``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.common import Linear

Array = jax.Array


def _dense(features, std, names, use_bias, dtype, name, param_dtype=jnp.float32):
    return Linear(features=features, names=names, use_bias=use_bias, init_std=std, dtype=dtype,
                  param_dtype=param_dtype, name=name)


class MLP(nn.Module):
    """GPT2 MLP: ``c_proj(gelu_tanh(c_fc(x)))`` then dropout (the Library's ``new_gelu``).

    Attributes:
      hidden_dim: width of the hidden layer (GPT2: ``4 D``).
      dropout_rate: dropout after ``c_proj``.
      init_std, out_init_std: init std of ``c_fc`` and ``c_proj`` (GPT2: 0.02 and
        ``0.02 / sqrt(2 L)``).
      dtype, param_dtype: compute and storage dtypes.
    """

    hidden_dim: int
    dropout_rate: float = 0.0
    use_bias: bool = False
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: Array, *, deterministic: bool = True) -> Array:
        d = x_BxTxD.shape[-1]
        h_BxTxF = _dense(self.hidden_dim, self.init_std, ("embed", "mlp"), self.use_bias,
                         self.dtype, "c_fc", self.param_dtype)(x_BxTxD)
        h_BxTxF = nn.gelu(h_BxTxF, approximate=True)
        y_BxTxD = _dense(d, self.out_init_std, ("mlp", "embed"), self.use_bias, self.dtype,
                         "c_proj", self.param_dtype)(h_BxTxF)
        return nn.Dropout(self.dropout_rate)(y_BxTxD, deterministic=deterministic)


class SwiGLU(nn.Module):
    """SwiGLU FFN: ``w_down(silu(w_gate x) * w_up x)`` then dropout. No biases.

    In Memory Mosaics v2 this is the persistent memory (``docs/architecture.md``).
    """

    hidden_dim: int
    dropout_rate: float = 0.0
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: Array, *, deterministic: bool = True) -> Array:
        d = x_BxTxD.shape[-1]
        gate_BxTxF = _dense(self.hidden_dim, self.init_std, ("embed", "mlp"), False,
                            self.dtype, "w_gate", self.param_dtype)(x_BxTxD)
        up_BxTxF = _dense(self.hidden_dim, self.init_std, ("embed", "mlp"), False,
                          self.dtype, "w_up", self.param_dtype)(x_BxTxD)
        y_BxTxD = _dense(d, self.out_init_std, ("mlp", "embed"), False, self.dtype,
                         "w_down", self.param_dtype)(nn.silu(gate_BxTxF) * up_BxTxF)
        return nn.Dropout(self.dropout_rate)(y_BxTxD, deterministic=deterministic)
