"""v1 Memory Mosaic language model (official Library ``StackAssoMem``, non-EFT, pre-LN).

    x = E[input_ids]                                  (no position embedding)
    for each layer:  x += ContextualMemory(LN1(x));  x += PersistentMemory(LN2(x))
    logits = LN_out(x) @ E^T / sqrt(D)                (output head tied to the embedding)

Init (the Library's): the shared embedding/head matrix ``N(0, 1/sqrt(D))``, projections
``N(0, 1/sqrt(fan_in))``, each output projection ``N(0, 1/sqrt(fan_in)/sqrt(num_layers))``,
persistent slots ``N(0, 1/sqrt(head_dim))``, LayerNorm weight 1 and bias 0 (eps 1e-5).
Official parameters map onto these with :func:`mmjax.convert.from_official_library`.

Parameter tree (``params``), with the names every model uses (:mod:`mmjax.layers.common`)::

    embedding/wte            [vocab, embed]                ("vocab", "embed")
    block_{i}/norm_1, norm_2 scale [embed] (+ bias)        ("embed",)
    block_{i}/mixer          ContextualMemory (key, value, per-head scalars, out)
    block_{i}/ffn            PersistentMemory (key, slots, per-head scalars, out)
    final_norm               scale [embed] (+ bias)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.common import TokenEmbedding, check_input_ids, layer_norm, run_blocks
from mmjax.layers.memory import ContextualMemory, MemoryUnitConfig, PersistentMemory
from mmjax.models import register

Array = jax.Array


class MemoryMosaicBlock(nn.Module):
    """One pre-LN block: contextual memory then persistent memory, each on a residual."""

    config: MemoryUnitConfig

    @nn.compact
    def __call__(self, x_BxTxD: Array, deterministic: bool = True,
                 long_term_skip=None, step=None) -> Array:
        del long_term_skip  # v1 has no long-term tier; the argument keeps one block signature
        c = self.config
        norm = lambda name: layer_norm(name, use_bias=c.use_bias, dtype=c.dtype,
                                       param_dtype=c.param_dtype)
        mixer = ContextualMemory(config=c, name="mixer")
        x_BxTxD = x_BxTxD + mixer(norm("norm_1")(x_BxTxD), deterministic=deterministic,
                                  step=step)
        ffn = PersistentMemory(config=c, name="ffn")
        return x_BxTxD + ffn(norm("norm_2")(x_BxTxD), deterministic=deterministic, step=step)


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
      dtype: compute dtype (e.g. ``"bfloat16"``); logits are returned in fp32.
      param_dtype: storage dtype of the parameters.
      impl: ``impl`` of :func:`mmjax.ops.retrieve` for every memory.
      remat: remat policy of every block (``"none"``, ``"full"``, ``"dots"``, ...; see
        :data:`mmjax.layers.common.REMAT_POLICIES`).
      scan_layers: one ``nn.scan`` over the blocks (compile time independent of depth;
        parameters stacked under ``blocks/layer``).
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
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    impl: str = "auto"
    remat: str = "none"
    scan_layers: bool = False

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

    def unit_config(self) -> MemoryUnitConfig:
        """The frozen settings every memory unit of this model is built from."""
        d = self.embed_dim
        return MemoryUnitConfig(
            num_heads=self.num_heads, use_bias=self.use_bias, hd_dropout=self.hd_dropout,
            init_std=d**-0.5, out_init_std=d**-0.5 * self.num_layers**-0.5, impl=self.impl,
            dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype),
            pmem_size=self.pmem_size, pmem_count=self.pmem_count, ic_dropout=self.ic_dropout)

    @nn.compact
    def __call__(self, input_ids_BxT: Array, deterministic: bool = True,
                 return_head: bool = False, step=None):
        """Integer ``[batch, time]`` token ids -> fp32 logits ``[batch, time, vocab]`` (with
        ``return_head``: :meth:`mmjax.layers.common.TokenEmbedding.output`; with ``step``, a
        cached call: :mod:`mmjax.layers.cache`)."""
        self._check_fields()
        check_input_ids(input_ids_BxT)
        config = self.unit_config()
        d = self.embed_dim
        embed = TokenEmbedding(vocab_size=self.vocab_size, embed_dim=d, tie_embeddings=True,
                               init_std=d**-0.5, dtype=config.dtype,
                               param_dtype=config.param_dtype, name="embedding")
        x_BxTxD = embed(input_ids_BxT)
        x_BxTxD = run_blocks(MemoryMosaicBlock, x_BxTxD, num_layers=self.num_layers,
                             deterministic=deterministic, step=step, scan=self.scan_layers,
                             remat=self.remat, config=config)
        x_BxTxD = layer_norm("final_norm", use_bias=self.use_bias, dtype=config.dtype,
                             param_dtype=config.param_dtype)(x_BxTxD)
        return embed.output(x_BxTxD, logit_scale=d**-0.5, return_head=return_head)
