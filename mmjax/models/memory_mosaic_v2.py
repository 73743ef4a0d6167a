"""Memory Mosaics v2 ("Memory Mosaics at Scale", arXiv 2507.03285): the full network.

Each of the ``num_layers`` blocks is pre-norm residual::

    x += ThreeTierMemory(RMSNorm(x))   # short-term (window h) + long-term (skip m) memories, W_o
    x += SwiGLU(RMSNorm(x))            # persistent memory

then a final RMSNorm and the output head. The layers and every choice made where the paper is
silent are documented in :mod:`mmjax.layers.memory_v2`. Model-level choices (CHOICE):

* RMSNorm (eps ``1e-5``) for the block and final norms, untied embeddings, no biases, init
  ``N(0, 0.02)`` with ``W_o`` and the SwiGLU down-projection at ``0.02 / sqrt(2 L)``: the
  LLaMA baseline's conventions (the paper transfers the LLaMA-3-8B architecture).
* No position encoding.
* The long-term skip ``m`` is one per forward pass, shared by all layers: explicit
  ``long_term_skip=`` (int or traced scalar), else drawn ``U{64..256}`` from the ``"skip"``
  rng when ``deterministic=False``, else ``inference_long_term_skip`` (64).
* ``long_term=False`` is the paper's "without long-term memory" variant (``W_o`` then fuses
  ``H`` heads).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.attention import split_heads
from mmjax.layers.memory_v2 import (
    ThreeTierMemory,
    resolve_long_term_skip,
    validate_skip_schedule,
)
from mmjax.layers.mlp import SwiGLU
from mmjax.models import register
from mmjax.models.transformer import TokenEmbedding, check_input_ids, maybe_remat, rms_norm

Array = jax.Array


class MemoryMosaicV2Block(nn.Module):
    num_heads: int
    mlp_dim: int
    short_term_window: int
    long_term: bool
    gate_cap: float
    bandwidth_init: tuple
    norm_eps: float
    dropout_rate: float
    init_std: float
    out_init_std: float
    dtype: Any
    impl: str

    @nn.compact
    def __call__(self, x_BxTxD: Array, deterministic: bool, long_term_skip) -> Array:
        d = x_BxTxD.shape[-1]
        memory = ThreeTierMemory(
            self.num_heads, split_heads(d, self.num_heads),
            short_term_window=self.short_term_window, long_term=self.long_term,
            gate_cap=self.gate_cap, bandwidth_init=self.bandwidth_init,
            dropout_rate=self.dropout_rate, init_std=self.init_std,
            out_init_std=self.out_init_std, dtype=self.dtype, impl=self.impl, name="mixer")
        x_BxTxD = x_BxTxD + memory(rms_norm(self.norm_eps, self.dtype, "norm_1")(x_BxTxD),
                                   deterministic=deterministic, long_term_skip=long_term_skip)
        persistent = SwiGLU(self.mlp_dim, dropout_rate=self.dropout_rate,
                            init_std=self.init_std, out_init_std=self.out_init_std,
                            dtype=self.dtype, name="ffn")
        return x_BxTxD + persistent(rms_norm(self.norm_eps, self.dtype, "norm_2")(x_BxTxD),
                                    deterministic=deterministic)


@register("memory_mosaic_v2")
class MemoryMosaicV2(nn.Module):
    """Memory Mosaics v2 language model; defaults are the paper's large model."""

    vocab_size: int = 128256
    num_layers: int = 32
    num_heads: int = 32
    embed_dim: int = 4096
    mlp_dim: int = 14336
    short_term_window: int = 256
    long_term: bool = True
    long_term_skip_range: tuple = (64, 256)
    inference_long_term_skip: int = 64
    gate_cap: float = 10.0
    bandwidth_init: tuple = (1.0, 1.0, 0.25)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dropout_rate: float = 0.0
    init_std: float = 0.02
    dtype: Any = "float32"
    impl: str = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids: Array, deterministic: bool = True,
                 long_term_skip=None) -> Array:
        check_input_ids(input_ids)
        split_heads(self.embed_dim, self.num_heads)
        validate_skip_schedule(self.short_term_window, tuple(self.long_term_skip_range),
                               self.inference_long_term_skip)
        dtype = jnp.dtype(self.dtype)
        embed = TokenEmbedding(self.vocab_size, self.embed_dim, self.tie_embeddings,
                               init_std=self.init_std, dtype=dtype, name="embedding")
        x_BxTxD = embed(input_ids)
        skip = resolve_long_term_skip(self, long_term_skip, deterministic,
                                      tuple(self.long_term_skip_range),
                                      self.inference_long_term_skip)
        out_std = self.init_std / math.sqrt(2 * self.num_layers)
        for i in range(self.num_layers):
            block = maybe_remat(MemoryMosaicV2Block, self.remat)(
                self.num_heads, self.mlp_dim, self.short_term_window, self.long_term,
                self.gate_cap, tuple(self.bandwidth_init), self.norm_eps, self.dropout_rate,
                self.init_std, out_std, dtype, self.impl, name=f"blocks_{i}")
            x_BxTxD = block(x_BxTxD, deterministic, skip)
        x_BxTxD = rms_norm(self.norm_eps, dtype, "final_norm")(x_BxTxD)
        return embed.logits(x_BxTxD)
