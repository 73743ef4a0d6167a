"""v1 Memory Mosaic language model (official Library ``StackAssoMem``, non-EFT, pre-LN).

    x = E[input_ids]                                  (no position embedding)
    for each layer:  x += ContextualMemory(LN1(x));  x += PersistentMemory(LN2(x))
    logits = LN_out(x) @ E^T / sqrt(D)                (output head tied to the embedding)

Init (the Library's; ``init_std`` left ``None``): the shared embedding/head matrix
``N(0, 1/sqrt(D))``, projections ``N(0, 1/sqrt(D))``, each output projection
``N(0, 1/sqrt(D)/sqrt(num_layers))`` (a given ``init_std`` replaces ``1/sqrt(D)``),
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

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.common import (
    LanguageModel,
    ModelConfig,
    TokenEmbedding,
    check_input_ids,
    layer_norm,
    run_blocks,
)
from mmjax.layers.memory import ContextualMemory, MemoryUnitConfig, PersistentMemory
from mmjax.models import register

Array = jax.Array


class MemoryMosaicBlock(nn.Module):
    """One pre-LN block: contextual memory then persistent memory, each on a residual.

    ``config``: the model's shared settings; ``memory``: the settings of both units.
    """

    config: ModelConfig
    memory: MemoryUnitConfig

    @nn.compact
    def __call__(self, x_BxTxD: Array, deterministic: bool = True,
                 long_term_skip=None, step=None) -> Array:
        del long_term_skip  # v1 has no long-term tier; the argument keeps one block signature
        m = self.memory
        norm = lambda name: layer_norm(name, use_bias=m.use_bias, dtype=m.dtype,
                                       param_dtype=m.param_dtype)
        mixer = ContextualMemory(config=m, name="mixer")
        x_BxTxD = x_BxTxD + mixer(norm("norm_1")(x_BxTxD), deterministic=deterministic,
                                  step=step)
        ffn = PersistentMemory(config=m, name="ffn")
        return x_BxTxD + ffn(norm("norm_2")(x_BxTxD), deterministic=deterministic, step=step)


@register("memory_mosaic")
class MemoryMosaic(LanguageModel):
    """The v1 Memory Mosaic language model.

    ``config`` (:class:`mmjax.layers.common.ModelConfig`): the shared settings;
    ``dropout_rate`` is the official ``hd_dropout`` (after each memory's output projection).
    The network has no position embedding and accepts any length.

    Attributes:
      pmem_size: persistent-memory slots per head (the Library's default 2688 = 3.5 * 768).
      pmem_count: persistent-memory banks averaged.
      use_bias: biases in projections and LayerNorms (official ``bias``, default False).
      pmem_attention_dropout: dropout on the persistent memory's retrieval probabilities
        (official ``ic_dropout``; training only; the contextual memory does not apply it,
        see :mod:`mmjax.layers.memory`).
    """

    config_defaults = dict(num_layers=12, num_heads=12, embed_dim=768)

    pmem_size: int = 2688
    pmem_count: int = 1
    use_bias: bool = False
    pmem_attention_dropout: float = 0.0

    def _check_fields(self):
        for name in ("pmem_size", "pmem_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.pmem_attention_dropout < 1.0:
            raise ValueError("model.pmem_attention_dropout must be in [0, 1), got "
                             f"{self.pmem_attention_dropout}")

    def unit_config(self) -> MemoryUnitConfig:
        """The frozen settings every memory unit of this model is built from."""
        c = self.config
        std = c.std(c.embed_dim**-0.5)
        return MemoryUnitConfig(
            num_heads=c.num_heads, use_bias=self.use_bias, dropout_rate=c.dropout_rate,
            init_std=std, out_init_std=std * c.num_layers**-0.5, impl=c.impl,
            dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
            pmem_size=self.pmem_size, pmem_count=self.pmem_count,
            pmem_attention_dropout=self.pmem_attention_dropout)

    @nn.compact
    def __call__(self, input_ids_BxT: Array, deterministic: bool = True,
                 return_head: bool = False, step=None):
        """Integer ``[batch, time]`` token ids -> fp32 logits ``[batch, time, vocab]`` (with
        ``return_head``: :meth:`mmjax.layers.common.TokenEmbedding.output`; with ``step``, a
        cached call: :mod:`mmjax.layers.cache`)."""
        self._check_fields()
        check_input_ids(input_ids_BxT)
        c, memory = self.config, self.unit_config()
        embed = TokenEmbedding(vocab_size=c.vocab_size, embed_dim=c.embed_dim,
                               tie_embeddings=True, init_std=memory.init_std,
                               dtype=memory.dtype, param_dtype=memory.param_dtype,
                               name="embedding")
        x_BxTxD = embed(input_ids_BxT)
        x_BxTxD = run_blocks(MemoryMosaicBlock, x_BxTxD, config=c, deterministic=deterministic,
                             step=step, memory=memory)
        x_BxTxD = layer_norm("final_norm", use_bias=self.use_bias, dtype=memory.dtype,
                             param_dtype=memory.param_dtype)(x_BxTxD)
        return embed.output(x_BxTxD, logit_scale=c.embed_dim**-0.5, return_head=return_head)
