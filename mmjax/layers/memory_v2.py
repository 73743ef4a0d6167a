"""Memory Mosaics v2 layers: gated key extractor, adaptive bandwidth, three-tier memory.

"Memory Mosaics at Scale" (Zhang & Bottou, arXiv 2507.03285) has no public code; this is
its reference implementation in mmjax. The math is pure functions in :mod:`mmjax.ops`
(:func:`~mmjax.ops.gated_keys`, :func:`~mmjax.ops.extract_values`,
:func:`~mmjax.ops.tier_bandwidth`, :func:`~mmjax.ops.tier_masks`); the modules here own the
parameters. :class:`MemoryTier` is one memory: gated keys, the v1 values and a retrieval
with its tier's mask and adaptive bandwidth. :class:`ThreeTierMemory` runs a short-term tier
(window ``h``) and a long-term tier (skip ``m``) of ``H`` heads each and fuses their ``2 H``
outputs with ``W_o``; the persistent memory is :class:`mmjax.layers.mlp.SwiGLU`.

The equations and every choice the paper leaves open (gate cap, bandwidth parametrisation
and init, inits, skip schedule, dropout): ``docs/architecture.md``, sections 5 and 6.
Logical axis names: ``embed``, ``heads``, ``head_dim``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers.cache import DecodeStep, key_state, memory_step
from mmjax.layers.common import (
    HeadOutput,
    head_projection,
    projection,
    retrieval_sharding,
    sow_retrieval,
)
from mmjax.layers.memory import per_head_param, value_extractor
from mmjax.ops import (
    bandwidth_parameters,
    gated_key_average,
    inverse_bandwidth_parameters,
    l2_normalize,
    retrieve,
    retrieve_paged,
    tier_bandwidth,
    tier_masks,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """Settings of a v2 associative memory (a tier, or the three-tier mixer of a block).

    Attributes:
      num_heads, head_dim: ``H`` and ``K`` of each tier.
      short_term_window: the short-term window ``h``.
      long_term: whether the long-term tier exists (the paper's ablation drops it).
      gate_cap: bound on ``|log g_t|``.
      bandwidth_init: ``(beta0, beta1, alpha)`` at init.
      dropout_rate: dropout on the concatenated head outputs before ``W_o``.
      init_std: std of ``W_k``, ``W_v``; out_init_std: std of ``W_o``.
      dtype, param_dtype: compute and storage dtypes.
      long_term_memory: ``"exact"`` (every visible pair) or ``"paged"``: the long-term tier
        retrieves from each query's ``long_term_top_pages`` best pages of
        ``long_term_page`` pairs (:func:`mmjax.ops.retrieve_paged`).
      long_term_page_dtype: storage dtype of the paged decoding caches' keys and values
        (``"auto"``: the compute dtype; ``"bfloat16"`` halves them from fp32, ``"int8"``
        quarters them, with a scale per page).
    """

    num_heads: int
    head_dim: int
    short_term_window: int = 256
    long_term: bool = True
    gate_cap: float = 10.0
    bandwidth_init: tuple = (1.0, 1.0, 0.25)
    dropout_rate: float = 0.0
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    impl: str = "auto"
    long_term_memory: str = "exact"
    long_term_page: int = 64
    long_term_top_pages: int = 16
    long_term_page_dtype: str = "auto"

    def __post_init__(self):
        check_long_term_memory(self.long_term_memory, self.long_term_page,
                               self.long_term_top_pages, self.long_term_page_dtype)

    @property
    def paging(self) -> tuple[int, int, Any] | None:
        """``(page size, pages kept, page dtype)`` of a paged long-term tier, else ``None``."""
        if self.long_term_memory != "paged":
            return None
        dtype = self.dtype if self.long_term_page_dtype == "auto" else self.long_term_page_dtype
        return self.long_term_page, self.long_term_top_pages, jnp.dtype(dtype)


LONG_TERM_MEMORIES = ("exact", "paged")
PAGE_DTYPES = ("auto", "float32", "bfloat16", "int8")


def check_long_term_memory(kind, page, top_pages, page_dtype="auto") -> None:
    """Raise one ``ValueError`` naming the ``model.`` key of a bad long-term memory setting."""
    if kind not in LONG_TERM_MEMORIES:
        raise ValueError(f"model.long_term_memory={kind!r} must be one of {LONG_TERM_MEMORIES}")
    if page_dtype not in PAGE_DTYPES:
        raise ValueError(f"model.long_term_page_dtype={page_dtype!r} must be one of "
                         f"{PAGE_DTYPES}")
    for key, value in (("long_term_page", page), ("long_term_top_pages", top_pages)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model.{key}={value!r} must be an integer >= 1")


class MemoryTier(nn.Module):
    """One associative-memory tier of ``H`` heads: ``[B, T, D] -> [B, T, H, K]`` head outputs.

    ``mask`` (a :class:`mmjax.ops.MaskSpec`, from :func:`mmjax.ops.tier_masks`) says which
    pairs the tier sees; its skip may be a traced scalar. ``paging``: ``(page size, pages
    kept, page dtype)`` to retrieve from each query's best pages
    (:func:`mmjax.ops.retrieve_paged`), or ``None`` for every visible pair. With ``step`` (a
    cached call, :mod:`mmjax.layers.cache`) a windowed tier keeps its pairs in a ring buffer
    of ``window`` slots, the others in a linear buffer, or in pages when paged.
    """

    config: MemoryConfig

    @nn.compact
    def __call__(self, x_BxTxD: Array, *, mask, step: DecodeStep | None = None,
                 paging: tuple[int, int, Any] | None = None) -> Array:
        c = self.config
        if c.gate_cap <= 0:
            raise ValueError(f"gate_cap must be > 0, got {c.gate_cap}")
        d, h, k = x_BxTxD.shape[-1], c.num_heads, c.head_dim
        x = x_BxTxD.astype(c.dtype)
        by_head = lambda name: head_projection(self, name, x, num_heads=h, head_dim=k,
                                                init_std=c.init_std, use_bias=False,
                                                dtype=c.dtype, param_dtype=c.param_dtype)

        def gate(name):  # [B, T, H]
            return projection(self, x, out_shape=(h,), names=("embed", "heads"),
                              init_std=d ** -0.5, use_bias=False, dtype=c.dtype,
                              param_dtype=c.param_dtype, kernel=name)

        k_proj, gate_logit, decay_logit = by_head("key"), gate("gate"), gate("decay")
        kbar_BxTxHxK = key_state(
            self, step,
            lambda init: gated_key_average(k_proj, gate_logit, decay_logit, c.gate_cap, init),
            (x.shape[0], h, k))
        k_BxTxHxK = l2_normalize(kbar_BxTxHxK).astype(c.dtype)
        u_BxTxHxK, extract = value_extractor(self, x, num_heads=h, head_dim=k,
                                             init_std=c.init_std, dtype=c.dtype,
                                             param_dtype=c.param_dtype)
        raw = inverse_bandwidth_parameters(*c.bandwidth_init)
        p0_H, p1_H, pa_H = (per_head_param(self, name, nn.initializers.constant(value), h,
                                           c.param_dtype)
                            for name, value in zip(("beta0", "beta1", "alpha"), raw, strict=True))
        beta = bandwidth_parameters(p0_H, p1_H, pa_H)
        if step is not None:
            return memory_step(self, step, keys_BxTxHxK=k_BxTxHxK, u_BxTxHxV=u_BxTxHxK,
                               extract=extract, mask=mask,
                               bandwidth=lambda pos: tier_bandwidth(pos, mask, *beta),
                               ring=mask.window, impl=c.impl, paging=paging)
        beta_TxH = tier_bandwidth(jnp.arange(x.shape[1]), mask, *beta)
        sow_retrieval(self, k_BxTxHxK, k_BxTxHxK, bandwidth=beta_TxH, mask=mask)
        if paging is not None:  # a full pass holds its pairs as computed: no page store
            return retrieve_paged(k_BxTxHxK, extract(u_BxTxHxK), bandwidth=beta_TxH, mask=mask,
                                  page_size=paging[0], top_pages=paging[1])
        return retrieve(k_BxTxHxK, extract(u_BxTxHxK), bandwidth=beta_TxH, mask=mask,
                        impl=c.impl, sharding=retrieval_sharding())


class ThreeTierMemory(nn.Module):
    """Short-term and (optionally) long-term memories, concatenated and fused by ``W_o``.

    ``[B, T, D] -> [B, T, D]``; the persistent tier (SwiGLU) lives in the block.
    """

    config: MemoryConfig

    @nn.compact
    def __call__(self, x_BxTxD: Array, *, deterministic: bool, long_term_skip,
                 step: DecodeStep | None = None) -> Array:
        c = self.config
        short_mask, long_mask = tier_masks(c.short_term_window, long_term_skip)
        heads = [MemoryTier(config=c, name="short_term")(x_BxTxD, mask=short_mask, step=step)]
        if c.long_term:
            heads.append(MemoryTier(config=c, name="long_term")(x_BxTxD, mask=long_mask,
                                                                step=step, paging=c.paging))
        y_BxTxGxK = jnp.concatenate(heads, axis=2)
        y_BxTxGxK = nn.Dropout(c.dropout_rate)(y_BxTxGxK, deterministic=deterministic)
        return HeadOutput(features=x_BxTxD.shape[-1], init_std=c.out_init_std, dtype=c.dtype,
                          param_dtype=c.param_dtype, name="out")(y_BxTxGxK)
