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

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.common import (
    LanguageModel,
    ModelConfig,
    TokenEmbedding,
    check_input_ids,
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
    """``x += ThreeTierMemory(RMSNorm(x)); x += SwiGLU(RMSNorm(x))``.

    ``config``: the model's shared settings; ``memory``: the settings of the block's memories.
    """

    config: ModelConfig
    memory: MemoryConfig
    mlp_dim: int
    norm_eps: float = 1e-5

    @nn.compact
    def __call__(self, x_BxTxD: Array, deterministic: bool, long_term_skip,
                 step=None) -> Array:
        m = self.memory
        norm = lambda name: rms_norm(name, eps=self.norm_eps, dtype=m.dtype,
                                     param_dtype=m.param_dtype)
        mixer = ThreeTierMemory(config=m, name="mixer")
        x_BxTxD = x_BxTxD + mixer(norm("norm_1")(x_BxTxD), deterministic=deterministic,
                                  long_term_skip=long_term_skip, step=step)
        ffn = SwiGLU(hidden_dim=self.mlp_dim, dropout_rate=m.dropout_rate,
                     init_std=m.init_std, out_init_std=m.out_init_std, dtype=m.dtype,
                     param_dtype=m.param_dtype, name="ffn")
        return x_BxTxD + ffn(norm("norm_2")(x_BxTxD), deterministic=deterministic)


@register("memory_mosaic_v2")
class MemoryMosaicV2(LanguageModel):
    """Memory Mosaics v2 language model; defaults are the paper's large model.

    ``config`` (:class:`mmjax.layers.common.ModelConfig`): the shared settings (``init_std``
    ``None``: 0.02; output projections ``init_std / sqrt(2 L)``; ``dropout_rate`` on the
    memories' head outputs before ``W_o`` and after the SwiGLU).
    """

    config_defaults = dict(vocab_size=128256, num_layers=32, num_heads=32, embed_dim=4096)

    mlp_dim: int = 14336
    short_term_window: int = 256
    long_term: bool = True
    long_term_skip_range: tuple = (64, 256)
    inference_long_term_skip: int = 64
    gate_cap: float = 10.0
    bandwidth_init: tuple = (1.0, 1.0, 0.25)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    long_term_memory: str = "exact"
    long_term_page: int = 64
    long_term_top_pages: int = 16
    long_term_page_dtype: str = "auto"

    def memory_config(self) -> MemoryConfig:
        """The frozen settings of every block's memories."""
        c = self.config
        std = c.std(0.02)
        return MemoryConfig(
            num_heads=c.num_heads, head_dim=c.head_dim,
            short_term_window=self.short_term_window, long_term=self.long_term,
            gate_cap=self.gate_cap, bandwidth_init=tuple(self.bandwidth_init),
            dropout_rate=c.dropout_rate, init_std=std,
            out_init_std=std / math.sqrt(2 * c.num_layers),
            dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype), impl=c.impl,
            long_term_memory=self.long_term_memory, long_term_page=self.long_term_page,
            long_term_top_pages=self.long_term_top_pages,
            long_term_page_dtype=self.long_term_page_dtype)

    @nn.compact
    def __call__(self, input_ids: Array, deterministic: bool = True,
                 long_term_skip=None, return_head: bool = False, step=None):
        check_input_ids(input_ids)
        validate_skip_schedule(self.short_term_window, tuple(self.long_term_skip_range),
                               self.inference_long_term_skip)
        c, memory = self.config, self.memory_config()
        embed = TokenEmbedding(vocab_size=c.vocab_size, embed_dim=c.embed_dim,
                               tie_embeddings=self.tie_embeddings, init_std=memory.init_std,
                               dtype=memory.dtype, param_dtype=memory.param_dtype,
                               name="embedding")
        x_BxTxD = embed(input_ids)
        skip = resolve_long_term_skip(self, long_term_skip, deterministic,
                                      self.long_term_skip_range, self.inference_long_term_skip)
        x_BxTxD = run_blocks(MemoryMosaicV2Block, x_BxTxD, config=c,
                             deterministic=deterministic, long_term_skip=skip, step=step,
                             memory=memory, mlp_dim=self.mlp_dim, norm_eps=self.norm_eps)
        x_BxTxD = rms_norm("final_norm", eps=self.norm_eps, dtype=memory.dtype,
                           param_dtype=memory.param_dtype)(x_BxTxD)
        return embed.output(x_BxTxD, return_head=return_head)
