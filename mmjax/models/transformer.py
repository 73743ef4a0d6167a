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
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.attention import AttentionHeads, CausalSelfAttention
from mmjax.layers.common import (
    HeadOutput,
    TokenEmbedding,
    check_input_ids,
    layer_norm,
    normal_init,
    per_head_dim,
    resolve_long_term_skip,
    rms_norm,
    run_blocks,
)
from mmjax.layers.mlp import MLP, SwiGLU
from mmjax.models import register
from mmjax.ops import tier_masks, validate_skip_schedule

Array = jax.Array

# Parts of a block as mmjax.flops names them in its tables.
FLOPS_LABELS = {"mixer": "attention", "ffn": "MLP"}


# ----------------------------------------------------------------------------- GPT2


class GPT2Block(nn.Module):
    num_heads: int
    mlp_dim: int
    dropout_rate: float
    use_bias: bool
    out_init_std: float
    dtype: Any
    impl: str

    @nn.compact
    def __call__(self, x_BxTxD: Array, deterministic: bool, long_term_skip=None,
                 step=None) -> Array:
        del long_term_skip  # one block signature for every model
        norm = lambda name: layer_norm(name, use_bias=self.use_bias, dtype=self.dtype)
        attn = CausalSelfAttention(
            num_heads=self.num_heads, attention_dropout=self.dropout_rate,
            residual_dropout=self.dropout_rate, use_bias=self.use_bias,
            out_init_std=self.out_init_std, dtype=self.dtype, impl=self.impl, name="mixer")
        x_BxTxD = x_BxTxD + attn(norm("norm_1")(x_BxTxD), deterministic=deterministic,
                                 step=step)
        mlp = MLP(hidden_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                  use_bias=self.use_bias, out_init_std=self.out_init_std, dtype=self.dtype,
                  name="ffn")
        return x_BxTxD + mlp(norm("norm_2")(x_BxTxD), deterministic=deterministic)


@register("gpt2")
class GPT2(nn.Module):
    """GPT2 baseline (the Library's ``GPT``); defaults are GPT2-small."""

    flops_labels = FLOPS_LABELS

    vocab_size: int = 50304
    context_length: int = 1024
    num_layers: int = 12
    num_heads: int = 12
    embed_dim: int = 768
    mlp_ratio: int = 4
    dropout_rate: float = 0.0
    use_bias: bool = False
    dtype: Any = "float32"
    impl: str = "auto"
    remat: str = "none"
    scan_layers: bool = False

    @nn.compact
    def __call__(self, input_ids: Array, deterministic: bool = True,
                 return_head: bool = False, step=None):
        check_input_ids(input_ids, self.context_length)
        per_head_dim(self.embed_dim, self.num_heads)
        dtype = jnp.dtype(self.dtype)
        embed = TokenEmbedding(vocab_size=self.vocab_size, embed_dim=self.embed_dim,
                               tie_embeddings=True, dtype=dtype, name="embedding")
        wpe = self.param("wpe", normal_init(0.02, (None, "embed")),
                         (self.context_length, self.embed_dim))
        t = input_ids.shape[1]
        if step is None:
            pos_embed = wpe[:t][None]
        else:  # [C, D] or [B, C, D]; positions past the table are the caller's to refuse
            pos_embed = jnp.take(wpe, step.query_positions(t), axis=0, mode="clip")
            pos_embed = pos_embed if pos_embed.ndim == 3 else pos_embed[None]
        x_BxTxD = embed(input_ids) + jnp.asarray(pos_embed, dtype)
        x_BxTxD = nn.Dropout(self.dropout_rate)(x_BxTxD, deterministic=deterministic)
        out_std = 0.02 / math.sqrt(2 * self.num_layers)
        x_BxTxD = run_blocks(
            GPT2Block, x_BxTxD, num_layers=self.num_layers, deterministic=deterministic,
            step=step, scan=self.scan_layers, remat=self.remat, num_heads=self.num_heads,
            mlp_dim=self.mlp_ratio * self.embed_dim, dropout_rate=self.dropout_rate,
            use_bias=self.use_bias, out_init_std=out_std, dtype=dtype, impl=self.impl)
        x_BxTxD = layer_norm("final_norm", use_bias=self.use_bias, dtype=dtype)(x_BxTxD)
        return embed.output(x_BxTxD, return_head=return_head)


# ----------------------------------------------------------------------------- LLaMA


class ShortLongAttention(nn.Module):
    """Separate short-term (window) and long-term (skip) attention heads fused by ``W_o``.

    Query ``t``'s short-term heads see tokens ``t - window + 1 .. t``; its long-term heads see
    ``0 .. t - long_term_skip``. Outputs: ``[B, T, D]``.
    """

    num_heads: int
    head_dim: int
    short_term_window: int
    rope_theta: float | None
    dropout_rate: float = 0.0
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x_BxTxD: Array, *, deterministic: bool, long_term_skip,
                 step=None) -> Array:
        short_mask, long_mask = tier_masks(self.short_term_window, long_term_skip)

        def heads(mask, name):
            return AttentionHeads(num_heads=self.num_heads, head_dim=self.head_dim,
                                  window=mask.window, rope_theta=self.rope_theta,
                                  init_std=self.init_std, dtype=self.dtype, impl=self.impl,
                                  name=name)

        short_BxTxHxK = heads(short_mask, "short_term")(x_BxTxD, step=step)
        long_BxTxHxK = heads(long_mask, "long_term")(x_BxTxD, skip=long_mask.skip, step=step)
        y_BxTxGxK = jnp.concatenate([short_BxTxHxK, long_BxTxHxK], axis=2)
        y_BxTxGxK = nn.Dropout(self.dropout_rate)(y_BxTxGxK, deterministic=deterministic)
        return HeadOutput(features=x_BxTxD.shape[-1], init_std=self.out_init_std,
                          dtype=self.dtype, name="out")(y_BxTxGxK)


class LlamaBlock(nn.Module):
    num_heads: int
    mlp_dim: int
    rope_theta: float
    norm_eps: float
    dropout_rate: float
    init_std: float
    out_init_std: float
    dtype: Any
    impl: str
    short_term_window: int | None = None  # set: the separate short/long ablation

    @nn.compact
    def __call__(self, x_BxTxD: Array, deterministic: bool, long_term_skip=None,
                 step=None) -> Array:
        d = x_BxTxD.shape[-1]
        norm = lambda name: rms_norm(name, eps=self.norm_eps, dtype=self.dtype)
        h_BxTxD = norm("norm_1")(x_BxTxD)
        if self.short_term_window is None:
            mixer = CausalSelfAttention(
                num_heads=self.num_heads, rope_theta=self.rope_theta,
                attention_dropout=self.dropout_rate, init_std=self.init_std,
                out_init_std=self.out_init_std, dtype=self.dtype, impl=self.impl, name="mixer")
            h_BxTxD = mixer(h_BxTxD, deterministic=deterministic, step=step)
        else:
            mixer = ShortLongAttention(
                num_heads=self.num_heads, head_dim=per_head_dim(d, self.num_heads),
                short_term_window=self.short_term_window, rope_theta=self.rope_theta,
                dropout_rate=self.dropout_rate, init_std=self.init_std,
                out_init_std=self.out_init_std, dtype=self.dtype, impl=self.impl, name="mixer")
            h_BxTxD = mixer(h_BxTxD, deterministic=deterministic, long_term_skip=long_term_skip,
                            step=step)
        x_BxTxD = x_BxTxD + h_BxTxD
        ffn = SwiGLU(hidden_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                     init_std=self.init_std, out_init_std=self.out_init_std, dtype=self.dtype,
                     name="ffn")
        return x_BxTxD + ffn(norm("norm_2")(x_BxTxD), deterministic=deterministic)


@register("llama")
class Llama(nn.Module):
    """LLaMA-style transformer; defaults are the paper's large baseline (LLaMA-3-8B-like)."""

    flops_labels = FLOPS_LABELS

    vocab_size: int = 128256
    num_layers: int = 32
    num_heads: int = 32
    embed_dim: int = 4096
    mlp_dim: int = 14336
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dropout_rate: float = 0.0
    init_std: float = 0.02
    dtype: Any = "float32"
    impl: str = "auto"
    remat: str = "none"
    scan_layers: bool = False

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
        per_head_dim(self.embed_dim, self.num_heads)
        dtype = jnp.dtype(self.dtype)
        embed = TokenEmbedding(vocab_size=self.vocab_size, embed_dim=self.embed_dim,
                               tie_embeddings=self.tie_embeddings, init_std=self.init_std,
                               dtype=dtype, name="embedding")
        x_BxTxD = embed(input_ids)
        skip = self._long_term_skip(long_term_skip, deterministic)
        out_std = self.init_std / math.sqrt(2 * self.num_layers)
        x_BxTxD = run_blocks(
            LlamaBlock, x_BxTxD, num_layers=self.num_layers, deterministic=deterministic,
            long_term_skip=skip, step=step, scan=self.scan_layers, remat=self.remat,
            num_heads=self.num_heads, mlp_dim=self.mlp_dim, rope_theta=self.rope_theta,
            norm_eps=self.norm_eps, dropout_rate=self.dropout_rate, init_std=self.init_std,
            out_init_std=out_std, dtype=dtype, impl=self.impl, **self._block_kwargs())
        x_BxTxD = rms_norm("final_norm", eps=self.norm_eps, dtype=dtype)(x_BxTxD)
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
