"""v1 Memory Mosaic language model (official Library ``StackAssoMem``, non-EFT, pre-LN).

    x = E[input_ids]                                  (no position embedding)
    for each layer:  x += ContextualMemory(LN1(x));  x += PersistentMemory(LN2(x))
    logits = LN_out(x) @ E^T / sqrt(D)                (output head tied to the embedding)

Init (the Library's): the shared embedding/head matrix ``N(0, 1/sqrt(D))``, projections
``N(0, 1/sqrt(fan_in))``, each ``c_proj`` ``N(0, 1/sqrt(fan_in)/sqrt(num_layers))``,
persistent slots ``N(0, 1/sqrt(head_dim))``, LayerNorm weight 1 and bias 0 (eps 1e-5).
Official parameters map onto these with :func:`mmjax.convert.from_official_library`.

Parameter tree (``params``)::

    embedding            [vocab, embed]                      ("vocab", "embed")
    block_{i}/ln1, ln2   scale [embed] (+ bias)              ("embed",)
    block_{i}/context    ContextualMemory (key/value/output kernels, per-head scalars)
    block_{i}/persistent PersistentMemory (key/output kernels, slots, per-head scalars)
    ln_out               scale [embed] (+ bias)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.memory import ContextualMemory, PersistentMemory
from mmjax.models import register

Array = jax.Array

LAYER_NORM_EPSILON = 1e-5


def _layer_norm(name: str, use_bias: bool, dtype, param_dtype) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=LAYER_NORM_EPSILON,
        use_bias=use_bias,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class MemoryMosaicBlock(nn.Module):
    """One pre-LN block: contextual memory then persistent memory, each on a residual."""

    num_heads: int
    pmem_size: int
    pmem_count: int = 1
    use_bias: bool = False
    ic_dropout: float = 0.0
    hd_dropout: float = 0.0
    output_init_scale: float = 1.0
    retrieval_impl: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxTxD: Array, *, deterministic: bool = True) -> Array:
        common = dict(
            num_heads=self.num_heads,
            use_bias=self.use_bias,
            hd_dropout=self.hd_dropout,
            output_init_scale=self.output_init_scale,
            impl=self.retrieval_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        ln = lambda name: _layer_norm(name, self.use_bias, self.dtype, self.param_dtype)
        x_BxTxD = x_BxTxD + ContextualMemory(**common, name="context")(
            ln("ln1")(x_BxTxD), deterministic=deterministic
        )
        persistent = PersistentMemory(
            **common,
            pmem_size=self.pmem_size,
            pmem_count=self.pmem_count,
            ic_dropout=self.ic_dropout,
            name="persistent",
        )
        return x_BxTxD + persistent(ln("ln2")(x_BxTxD), deterministic=deterministic)


@register("memory_mosaic")
class MemoryMosaic(nn.Module):
    """The v1 Memory Mosaic language model.

    Attributes:
      vocab_size: ``N``.
      num_layers, num_heads, embed_dim: depth, heads per memory, model width ``D``.
      pmem_size: persistent-memory slots per head (the Library's default 2688 = 3.5 * 768).
      pmem_count: persistent-memory banks averaged.
      use_bias: biases in projections and LayerNorms (official ``bias``, default False).
      ic_dropout: dropout on persistent-memory retrieval probabilities (training only; the
        contextual memory does not apply it, see :mod:`mmjax.layers.memory`).
      hd_dropout: dropout after each memory's output projection.
      context_length: the training context (official ``block_size``). The network has no
        position embedding and accepts any length; configs and data read this field.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); logits are returned in fp32.
      param_dtype: storage dtype of the parameters.
      retrieval_impl: ``impl`` of :func:`mmjax.ops.retrieve` for every memory.
    """

    vocab_size: int
    num_layers: int = 12
    num_heads: int = 12
    embed_dim: int = 768
    pmem_size: int = 2688
    pmem_count: int = 1
    use_bias: bool = False
    ic_dropout: float = 0.0
    hd_dropout: float = 0.0
    context_length: int = 512
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    retrieval_impl: str = "auto"

    def _check_fields(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}"
            )
        for name in ("vocab_size", "num_layers", "num_heads", "pmem_size", "pmem_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ic_dropout", "hd_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @nn.compact
    def __call__(self, input_ids_BxT: Array, *, deterministic: bool = True) -> Array:
        """Integer ``[batch, time]`` token ids -> fp32 logits ``[batch, time, vocab]``."""
        self._check_fields()
        if input_ids_BxT.ndim != 2 or not jnp.issubdtype(input_ids_BxT.dtype, jnp.integer):
            raise ValueError(
                "input_ids must be an integer array [batch, time], got "
                f"shape {input_ids_BxT.shape} dtype {input_ids_BxT.dtype}"
            )
        d = self.embed_dim
        embedding_NxD = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(d**-0.5), ("vocab", "embed")),
            (self.vocab_size, d),
            self.param_dtype,
        )
        x_BxTxD = jnp.take(embedding_NxD, input_ids_BxT, axis=0).astype(self.dtype)
        for i in range(self.num_layers):
            x_BxTxD = MemoryMosaicBlock(
                num_heads=self.num_heads,
                pmem_size=self.pmem_size,
                pmem_count=self.pmem_count,
                use_bias=self.use_bias,
                ic_dropout=self.ic_dropout,
                hd_dropout=self.hd_dropout,
                output_init_scale=self.num_layers**-0.5,
                retrieval_impl=self.retrieval_impl,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"block_{i}",
            )(x_BxTxD, deterministic=deterministic)
        h_BxTxD = _layer_norm("ln_out", self.use_bias, self.dtype, self.param_dtype)(x_BxTxD)
        logits_BxTxN = jnp.einsum(
            "btd,nd->btn", h_BxTxD, embedding_NxD.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        return logits_BxTxN * (d**-0.5)
