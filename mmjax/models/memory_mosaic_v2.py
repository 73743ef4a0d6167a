"""Memory Mosaics v2 ("Memory Mosaics at Scale", arXiv 2507.03285): the full network.

Each of the ``num_layers`` blocks is pre-norm residual::

    x += ThreeTierMemory(RMSNorm(x))   # short-term (window h) + long-term (skip m) memories, W_o
    x += SwiGLU(RMSNorm(x))            # persistent memory

then a final RMSNorm and the output head, with the parameter names of every model
(:mod:`mmjax.layers.common`). The long-term skip ``m`` is one per forward pass: explicit
``long_term_skip=``, else drawn from the ``"skip"`` rng when ``deterministic=False``, else
``inference_long_term_skip``. ``long_term=False`` is the paper's "without long-term memory"
variant. The choices where the paper is silent: ``docs/architecture.md``, section 6.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.common import (
    TokenEmbedding,
    check_input_ids,
    per_head_dim,
    resolve_long_term_skip,
    rms_norm,
    run_blocks,
)
from mmjax.layers.memory_v2 import MemoryConfig, ThreeTierMemory
from mmjax.layers.mlp import SwiGLU
from mmjax.models import register
from mmjax.ops import validate_skip_schedule

Array = jax.Array


class MemoryMosaicV2Block(nn.Module):
    """``x += ThreeTierMemory(RMSNorm(x)); x += SwiGLU(RMSNorm(x))``."""

    memory: MemoryConfig
    mlp_dim: int
    norm_eps: float = 1e-5

    @nn.compact
    def __call__(self, x_BxTxD: Array, deterministic: bool, long_term_skip,
                 step=None) -> Array:
        c = self.memory
        norm = lambda name: rms_norm(name, eps=self.norm_eps, dtype=c.dtype)
        mixer = ThreeTierMemory(config=c, name="mixer")
        x_BxTxD = x_BxTxD + mixer(norm("norm_1")(x_BxTxD), deterministic=deterministic,
                                  long_term_skip=long_term_skip, step=step)
        ffn = SwiGLU(hidden_dim=self.mlp_dim, dropout_rate=c.dropout_rate,
                     init_std=c.init_std, out_init_std=c.out_init_std, dtype=c.dtype,
                     name="ffn")
        return x_BxTxD + ffn(norm("norm_2")(x_BxTxD), deterministic=deterministic)


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
    remat: str = "none"
    scan_layers: bool = False

    def memory_config(self) -> MemoryConfig:
        """The frozen settings of every block's memories."""
        return MemoryConfig(
            num_heads=self.num_heads, head_dim=per_head_dim(self.embed_dim, self.num_heads),
            short_term_window=self.short_term_window, long_term=self.long_term,
            gate_cap=self.gate_cap, bandwidth_init=tuple(self.bandwidth_init),
            dropout_rate=self.dropout_rate, init_std=self.init_std,
            out_init_std=self.init_std / math.sqrt(2 * self.num_layers),
            dtype=jnp.dtype(self.dtype), impl=self.impl)

    @nn.compact
    def __call__(self, input_ids: Array, deterministic: bool = True,
                 long_term_skip=None, return_head: bool = False, step=None):
        check_input_ids(input_ids)
        validate_skip_schedule(self.short_term_window, tuple(self.long_term_skip_range),
                               self.inference_long_term_skip)
        memory = self.memory_config()
        embed = TokenEmbedding(vocab_size=self.vocab_size, embed_dim=self.embed_dim,
                               tie_embeddings=self.tie_embeddings, init_std=self.init_std,
                               dtype=memory.dtype, name="embedding")
        x_BxTxD = embed(input_ids)
        skip = resolve_long_term_skip(self, long_term_skip, deterministic,
                                      self.long_term_skip_range, self.inference_long_term_skip)
        x_BxTxD = run_blocks(MemoryMosaicV2Block, x_BxTxD, num_layers=self.num_layers,
                             deterministic=deterministic, long_term_skip=skip, step=step,
                             scan=self.scan_layers, remat=self.remat, memory=memory,
                             mlp_dim=self.mlp_dim, norm_eps=self.norm_eps)
        x_BxTxD = rms_norm("final_norm", eps=self.norm_eps, dtype=memory.dtype)(x_BxTxD)
        return embed.output(x_BxTxD, return_head=return_head)
