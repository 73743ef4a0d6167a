"""TPU kernel (``jax.experimental.pallas.tpu``) for the exact half of paged retrieval: each
query's kept pages are read straight from the page store and reduced with an online softmax,
never gathered into a copy (:func:`mmjax.ops.paged.retrieve_from_pages` chooses the pages).

Grid ``(query row, kept page)``: the page indices are scalar-prefetch operands, so the index
map of the key and value blocks sends each grid step's DMA to the page it keeps, one page
``[R, L]`` at a time in the caches' layout (a page's ``U x D`` pairs in rows of 128 lanes,
``g = L / D`` pairs a row: :func:`mmjax.layers.cache.page_rows`). Inside, no relayout: the
query is tiled over the lanes, a pair's score is the sum of its ``D`` lanes and a weight is
spread back over them by small 0/1 matmuls. Forward only: decoding and prefill.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mmjax.ops.masks import target_platform

Array = jax.Array
NEG = -1e30  # finite "minus infinity": a page with nothing visible adds nothing, never NaN


def retrieve_pages_tpu(q_NxQxK: Array, keys_NxAxRxL: Array, values_NxAxRxL: Array,
                       page_NxQxW: Array, kept_NxQxW: Array, first_NxQ: Array,
                       last_NxQ: Array, *, page_size: int,
                       scales_NxQxW: tuple[Array, Array] | None = None,
                       interpret=None) -> Array:
    """``y [N, Q, D]`` (fp32): kernel regression of each query over the visible pairs of its
    kept pages.

    Args:
      q_NxQxK: queries, the bandwidth already folded in (``beta q``).
      keys_NxAxRxL, values_NxAxRxL: the page stores (keys and values of one width ``D``).
      page_NxQxW, kept_NxQxW: each query's pages and whether it may see each.
      first_NxQ, last_NxQ: the query's oldest and newest visible pair.
      page_size: ``U``.
      scales_NxQxW: the kept pages' ``(key, value)`` scales of int8 pages.
      interpret: Pallas interpret mode (default: when the computation is not built for a
        TPU).
    """
    n, num_q, dk = q_NxQxK.shape
    num_pages, rows, lanes = keys_NxAxRxL.shape[1:]
    top = page_NxQxW.shape[-1]
    if values_NxAxRxL.shape != keys_NxAxRxL.shape or rows * lanes != page_size * dk:
        raise ValueError(f"paged kernel: keys and values must share one page layout of "
                         f"{page_size} pairs of {dk}, got {keys_NxAxRxL.shape} and "
                         f"{values_NxAxRxL.shape}")
    if interpret is None:
        interpret = target_platform() != "tpu"
    flat = lambda x, dtype: jnp.asarray(x, dtype).reshape(-1)
    if scales_NxQxW is None:
        ones = jnp.ones((n * num_q * top,), jnp.float32)
        scales_NxQxW = (ones, ones)
    prefetch = (flat(page_NxQxW, jnp.int32), flat(kept_NxQxW, jnp.int32),
                flat(first_NxQ, jnp.int32), flat(last_NxQ, jnp.int32),
                flat(scales_NxQxW[0], jnp.float32), flat(scales_NxQxW[1], jnp.float32))

    def page_block(i, w, page_ref, *_):
        return (i // num_q, page_ref[i * top + w], 0, 0)

    kernel = functools.partial(_kernel, top=top, page_size=page_size, dim=dk, lanes=lanes)
    y = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(n * num_q, top),
            in_specs=[pl.BlockSpec((1, 1, dk), lambda i, w, *_: (i, 0, 0)),
                      pl.BlockSpec((1, 1, rows, lanes), page_block),
                      pl.BlockSpec((1, 1, rows, lanes), page_block)],
            out_specs=pl.BlockSpec((1, 1, dk), lambda i, w, *_: (i, 0, 0)),
            scratch_shapes=[pltpu.VMEM((1, 1), jnp.float32), pltpu.VMEM((1, 1), jnp.float32),
                            pltpu.VMEM((1, lanes), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((n * num_q, 1, dk), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )(*prefetch, q_NxQxK.astype(jnp.float32).reshape(n * num_q, 1, dk), keys_NxAxRxL,
      values_NxAxRxL)
    return y.reshape(n, num_q, dk)


def _kernel(page_ref, kept_ref, first_ref, last_ref, k_scale_ref, v_scale_ref,
            q_ref, k_ref, v_ref, y_ref, m_ref, l_ref, acc_ref, *, top, page_size, dim, lanes):
    i, w = pl.program_id(0), pl.program_id(1)
    per_row = lanes // dim  # pairs in a row of the page
    f32 = jnp.float32

    @pl.when(w == 0)
    def _():
        m_ref[...] = jnp.full_like(m_ref, NEG)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    slot = i * top + w
    # 0/1 matrices: a row's lanes summed into its pairs (and back), a vector tiled over a
    # row's lanes (and folded back)
    iota = lambda shape, axis: jax.lax.broadcasted_iota(jnp.int32, shape, axis)
    lane_to_pair = (iota((lanes, per_row), 0) // dim == iota((lanes, per_row), 1)).astype(f32)
    pair_to_lane = (iota((per_row, lanes), 1) // dim == iota((per_row, lanes), 0)).astype(f32)
    tile = (iota((dim, lanes), 1) % dim == iota((dim, lanes), 0)).astype(f32)
    fold = (iota((lanes, dim), 0) % dim == iota((lanes, dim), 1)).astype(f32)
    q_1xL = jnp.dot(q_ref[0], tile, preferred_element_type=f32)
    keys_RxL = k_ref[0, 0].astype(f32)
    s_RxG = jnp.dot(keys_RxL * q_1xL, lane_to_pair, preferred_element_type=f32)
    s_RxG = s_RxG * k_scale_ref[slot]
    rows = s_RxG.shape[0]
    pos_RxG = (page_ref[slot] * page_size + iota((rows, per_row), 0) * per_row
               + iota((rows, per_row), 1))
    visible = ((pos_RxG >= first_ref[i]) & (pos_RxG <= last_ref[i])
               & (kept_ref[slot] != 0))
    s_RxG = jnp.where(visible, s_RxG, NEG)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(s_RxG, keepdims=True).reshape(1, 1))
    alpha = jnp.exp(m_prev - m_new)
    p_RxG = jnp.where(visible, jnp.exp(s_RxG - m_new), 0.0)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p_RxG, keepdims=True).reshape(1, 1)
    p_RxL = jnp.dot(p_RxG, pair_to_lane, preferred_element_type=f32)
    row_1xL = jnp.sum(p_RxL * v_ref[0, 0].astype(f32), axis=0, keepdims=True)
    acc_ref[...] = alpha * acc_ref[...] + row_1xL * v_scale_ref[slot]
    m_ref[...] = m_new

    @pl.when(w == top - 1)
    def _():
        y_1xD = jnp.dot(acc_ref[...], fold, preferred_element_type=f32)
        total = l_ref[...]
        y_ref[0] = jnp.where(total > 0, y_1xD / jnp.where(total > 0, total, 1.0), 0.0)
