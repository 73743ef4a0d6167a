"""Transformer baselines sharing mmjax's building blocks.

* ``"gpt2"``: the Library's GPT (``docs/official_code.md``): learned positions, pre-LayerNorm,
  tanh-approx GELU MLP of width ``4 D``, tied ``wte``/``lm_head``, no biases by default.
* ``"llama"``: a LLaMA-style transformer: RoPE (base ``rope_theta``), RMSNorm, SwiGLU, full
  multi-head attention, untied embeddings, no biases.
* ``"llama_short_long"``: the v2 paper's ablation, the three-tier layout with ``H``
  short-term and ``H`` long-term attention heads in place of the memories.

Every model is called as ``model.apply({"params": p}, input_ids, deterministic=True)`` and
returns fp32 logits ``[B, T, N]``, with the parameter names of every model
(:mod:`mmjax.layers.common`; ``wpe`` is GPT2's positions), on which :mod:`mmjax.flops`
relies. Inits, dropout placement and the ablation's details: ``docs/architecture.md``,
section 6.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.attention import CausalSelfAttention, ShortLongAttention
from mmjax.layers.common import (
    LanguageModel,
    ModelConfig,
    TokenEmbedding,
    check_input_ids,
    layer_norm,
    normal_init,
    resolve_long_term_skip,
    rms_norm,
    run_blocks,
)
from mmjax.layers.mlp import MLP, SwiGLU
from mmjax.models import register
from mmjax.ops import validate_skip_schedule

Array = jax.Array

# Parts of a block as mmjax.flops names them in its tables.
FLOPS_LABELS = {"mixer": "attention", "ffn": "MLP"}

# The init std of the transformers when the config leaves ``init_std`` out (None).
INIT_STD = 0.02


def _init_stds(config: ModelConfig) -> tuple[float, float]:
    """``(init_std, out_init_std)``: ``init_std`` (default 0.02) and the output projections'
    ``init_std / sqrt(2 L)`` (GPT2's and LLaMA's residual scaling)."""
    std = config.std(INIT_STD)
    return std, std / math.sqrt(2 * config.num_layers)


# ----------------------------------------------------------------------------- GPT2


class GPT2Block(nn.Module):
    """``x += attention(LN(x)); x += MLP(LN(x))``, dropout ``config.dropout_rate`` on the
    attention heads' outputs and after both output projections."""

    config: ModelConfig
    mlp_dim: int
    use_bias: bool
    init_std: float
    out_init_std: float

    @nn.compact
    def __call__(self, x_BxTxD: Array, deterministic: bool, long_term_skip=None,
                 step=None) -> Array:
        del long_term_skip  # one block signature for every model
        c = self.config
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        norm = lambda name: layer_norm(name, use_bias=self.use_bias, dtype=dtype,
                                       param_dtype=param_dtype)
        attn = CausalSelfAttention(
            num_heads=c.num_heads, attention_dropout=c.dropout_rate,
            residual_dropout=c.dropout_rate, use_bias=self.use_bias, init_std=self.init_std,
            out_init_std=self.out_init_std, dtype=dtype, param_dtype=param_dtype, impl=c.impl,
            name="mixer")
        x_BxTxD = x_BxTxD + attn(norm("norm_1")(x_BxTxD), deterministic=deterministic,
                                 step=step)
        mlp = MLP(hidden_dim=self.mlp_dim, dropout_rate=c.dropout_rate,
                  use_bias=self.use_bias, init_std=self.init_std,
                  out_init_std=self.out_init_std, dtype=dtype, param_dtype=param_dtype,
                  name="ffn")
        return x_BxTxD + mlp(norm("norm_2")(x_BxTxD), deterministic=deterministic)


@register("gpt2")
class GPT2(LanguageModel):
    """GPT2 baseline (the Library's ``GPT``); defaults are GPT2-small.

    ``config`` (:class:`mmjax.layers.common.ModelConfig`): the shared settings (``init_std``
    ``None``: 0.02, also of the position table; ``dropout_rate`` also on the embeddings).

    Attributes:
      context_length: rows of the learned position table ``wpe``, the longest input.
      mlp_dim: width of the MLP's hidden layer; ``None``: ``4 * embed_dim``.
      use_bias: biases in projections and LayerNorms.
    """

    flops_labels = FLOPS_LABELS
    config_defaults = dict(vocab_size=50304, num_layers=12, num_heads=12, embed_dim=768)

    context_length: int = 1024
    mlp_dim: int | None = None
    use_bias: bool = False

    @nn.compact
    def __call__(self, input_ids: Array, deterministic: bool = True,
                 return_head: bool = False, step=None):
        check_input_ids(input_ids, self.context_length)
        c = self.config
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        std, out_std = _init_stds(c)
        embed = TokenEmbedding(vocab_size=c.vocab_size, embed_dim=c.embed_dim,
                               tie_embeddings=True, init_std=std, dtype=dtype,
                               param_dtype=param_dtype, name="embedding")
        wpe = self.param("wpe", normal_init(std, (None, "embed")),
                         (self.context_length, c.embed_dim), param_dtype)
        t = input_ids.shape[1]
        if step is None:
            pos_embed = wpe[:t][None]
        else:  # [C, D] or [B, C, D]; positions past the table are the caller's to refuse
            pos_embed = jnp.take(wpe, step.query_positions(t), axis=0, mode="clip")
            pos_embed = pos_embed if pos_embed.ndim == 3 else pos_embed[None]
        x_BxTxD = embed(input_ids) + jnp.asarray(pos_embed, dtype)
        x_BxTxD = nn.Dropout(c.dropout_rate)(x_BxTxD, deterministic=deterministic)
        x_BxTxD = run_blocks(
            GPT2Block, x_BxTxD, config=c, deterministic=deterministic, step=step,
            mlp_dim=self.mlp_dim or 4 * c.embed_dim, use_bias=self.use_bias, init_std=std,
            out_init_std=out_std)
        x_BxTxD = layer_norm("final_norm", use_bias=self.use_bias, dtype=dtype,
                             param_dtype=param_dtype)(x_BxTxD)
        return embed.output(x_BxTxD, return_head=return_head)


# ----------------------------------------------------------------------------- LLaMA


class LlamaBlock(nn.Module):
    """``x += attention(RMSNorm(x)); x += SwiGLU(RMSNorm(x))``; with ``short_term_window``
    the attention is :class:`mmjax.layers.attention.ShortLongAttention` (the ablation)."""

    config: ModelConfig
    mlp_dim: int
    rope_theta: float
    norm_eps: float
    init_std: float
    out_init_std: float
    short_term_window: int | None = None  # set: the separate short/long ablation

    @nn.compact
    def __call__(self, x_BxTxD: Array, deterministic: bool, long_term_skip=None,
                 step=None) -> Array:
        c = self.config
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        norm = lambda name: rms_norm(name, eps=self.norm_eps, dtype=dtype,
                                     param_dtype=param_dtype)
        h_BxTxD = norm("norm_1")(x_BxTxD)
        if self.short_term_window is None:
            mixer = CausalSelfAttention(
                num_heads=c.num_heads, rope_theta=self.rope_theta,
                attention_dropout=c.dropout_rate, init_std=self.init_std,
                out_init_std=self.out_init_std, dtype=dtype, param_dtype=param_dtype,
                impl=c.impl, name="mixer")
            h_BxTxD = mixer(h_BxTxD, deterministic=deterministic, step=step)
        else:
            mixer = ShortLongAttention(
                num_heads=c.num_heads, head_dim=c.head_dim,
                short_term_window=self.short_term_window, rope_theta=self.rope_theta,
                dropout_rate=c.dropout_rate, init_std=self.init_std,
                out_init_std=self.out_init_std, dtype=dtype, param_dtype=param_dtype,
                impl=c.impl, name="mixer")
            h_BxTxD = mixer(h_BxTxD, deterministic=deterministic, long_term_skip=long_term_skip,
                            step=step)
        x_BxTxD = x_BxTxD + h_BxTxD
        ffn = SwiGLU(hidden_dim=self.mlp_dim, dropout_rate=c.dropout_rate,
                     init_std=self.init_std, out_init_std=self.out_init_std, dtype=dtype,
                     param_dtype=param_dtype, name="ffn")
        return x_BxTxD + ffn(norm("norm_2")(x_BxTxD), deterministic=deterministic)


@register("llama")
class Llama(LanguageModel):
    """LLaMA-style transformer; defaults are the paper's large baseline (LLaMA-3-8B-like).

    ``config`` (:class:`mmjax.layers.common.ModelConfig`): the shared settings (``init_std``
    ``None``: 0.02; ``dropout_rate`` on the attention heads' outputs and after the SwiGLU).
    """

    flops_labels = FLOPS_LABELS
    config_defaults = dict(vocab_size=128256, num_layers=32, num_heads=32, embed_dim=4096)

    mlp_dim: int = 14336
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def _block_kwargs(self) -> dict:
        return {}

    def _long_term_skip(self, long_term_skip, deterministic):
        if long_term_skip is not None:
            raise ValueError(
                f"long_term_skip={long_term_skip!r} given to model 'llama', which has no "
                "long-term attention (use 'llama_short_long')")
        return None

    @nn.compact
    def __call__(self, input_ids: Array, deterministic: bool = True,
                 long_term_skip=None, return_head: bool = False, step=None):
        check_input_ids(input_ids)
        c = self.config
        dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        std, out_std = _init_stds(c)
        embed = TokenEmbedding(vocab_size=c.vocab_size, embed_dim=c.embed_dim,
                               tie_embeddings=self.tie_embeddings, init_std=std,
                               dtype=dtype, param_dtype=param_dtype, name="embedding")
        x_BxTxD = embed(input_ids)
        skip = self._long_term_skip(long_term_skip, deterministic)
        x_BxTxD = run_blocks(
            LlamaBlock, x_BxTxD, config=c, deterministic=deterministic, long_term_skip=skip,
            step=step, mlp_dim=self.mlp_dim, rope_theta=self.rope_theta,
            norm_eps=self.norm_eps, init_std=std, out_init_std=out_std, **self._block_kwargs())
        x_BxTxD = rms_norm("final_norm", eps=self.norm_eps, dtype=dtype,
                           param_dtype=param_dtype)(x_BxTxD)
        return embed.output(x_BxTxD, return_head=return_head)


@register("llama_short_long")
class LlamaShortLong(Llama):
    """The ablation: LLaMA with separate short-term and long-term attention heads.

    ``long_term_skip``: explicit skip ``m`` (int or traced scalar); otherwise drawn
    uniformly from ``long_term_skip_range`` (inclusive) with the ``"skip"`` rng when
    ``deterministic=False``, and ``inference_long_term_skip`` when deterministic.
    """

    short_term_window: int = 256
    long_term_skip_range: tuple = (64, 256)
    inference_long_term_skip: int = 64

    def _block_kwargs(self) -> dict:
        return {"short_term_window": self.short_term_window}

    def _long_term_skip(self, long_term_skip, deterministic):
        validate_skip_schedule(self.short_term_window, self.long_term_skip_range,
                               self.inference_long_term_skip)
        return resolve_long_term_skip(self, long_term_skip, deterministic,
                                      self.long_term_skip_range, self.inference_long_term_skip)
