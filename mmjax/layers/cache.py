"""Decoding caches: what each layer keeps between calls when a model generates.

A model called with ``step=DecodeStep(...)`` and ``mutable=["cache"]`` processes a chunk of
``T`` new tokens per row (a prompt chunk, or one token) on top of what its ``"cache"``
collection holds, and updates it; :mod:`mmjax.generate` drives it. A contextual memory keeps
its key state, the pending pair (values peek one step ahead, so the newest key waits one token
for its value) and the completed pairs, in a linear buffer or, for the v2 short-term tier, a
ring of ``h`` slots; attention keeps an ordinary KV cache. Positions, padding and the buffer
layout: ``docs/architecture.md``, section 4.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.ops import (
    MaskSpec,
    fold_heads,
    page_bounds,
    quantize_pages,
    retrieve,
    retrieve_dense,
    retrieve_from_pages,
    target_platform,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DecodeStep:
    """Where the tokens of one cached call sit.

    Attributes:
      position: int32 scalar (every row at the same position) or ``[B]``: absolute position
        of the call's first token.
      lengths: int32 ``[B]``: real tokens of each row after this call (later positions are
        padding).
      cache_length: slots of the linear caches: positions ``0 .. cache_length - 1`` can be
        stored (static).
    """

    position: Any
    lengths: Any
    cache_length: int

    def __post_init__(self):
        if not isinstance(self.cache_length, int) or self.cache_length < 1:
            raise ValueError(f"cache_length must be an integer >= 1, got {self.cache_length!r}")

    @property
    def aligned(self) -> bool:
        """Whether every row sits at the same position (``position`` is a scalar)."""
        return jnp.ndim(self.position) == 0

    def query_positions(self, chunk: int) -> Array:
        """Absolute positions of the call's tokens: ``[T]`` when aligned, else ``[B, T]``."""
        position = jnp.asarray(self.position, jnp.int32)
        return position[..., None] + jnp.arange(chunk, dtype=jnp.int32)

    def rows(self, batch: int) -> Array:
        """``position`` as ``[B]``."""
        return jnp.broadcast_to(jnp.asarray(self.position, jnp.int32), (batch,))

    def last_index(self, batch: int, chunk: int) -> Array:
        """``[B]``: index in the call of each row's last real token, ``-1`` when it has none."""
        real_B = jnp.clip(jnp.asarray(self.lengths, jnp.int32) - self.rows(batch), 0, chunk)
        return real_B - 1


jax.tree_util.register_dataclass(DecodeStep, data_fields=["position", "lengths"],
                                 meta_fields=["cache_length"])


def carry_last(old_Bx: Array, new_BxTx: Array, step: DecodeStep) -> Array:
    """Each row's value at its last real token of the call; the old value where it has none.

    Args:
      old_Bx: the carried state ``[B, ...]``.
      new_BxTx: the state after each token of the call ``[B, T, ...]``.
    """
    b, c = new_BxTx.shape[:2]
    last_B = step.last_index(b, c)
    picked_Bx = jnp.take_along_axis(
        new_BxTx, jnp.maximum(last_B, 0).reshape((b, 1) + (1,) * (new_BxTx.ndim - 2)),
        axis=1)[:, 0]
    keep = (last_B >= 0).reshape((b,) + (1,) * (old_Bx.ndim - 1))
    return jnp.where(keep, picked_Bx.astype(old_Bx.dtype), old_Bx)


def key_state(module: nn.Module, step: DecodeStep | None,
              average: Callable[[Array | None], Array], shape: tuple) -> Array:
    """A key recurrence that continues across cached calls.

    ``average(initial)`` returns the states ``kbar [B, T, H, K]`` of the call's tokens from
    the state before them. Without ``step`` it starts from 0; with one it starts from the
    cache variable ``kbar`` (fp32 ``shape = [B, H, K]``) and leaves there the state at each
    row's last real token.
    """
    if step is None:
        return average(None)
    var = module.variable("cache", "kbar", jnp.zeros, shape, jnp.float32)
    kbar_BxTxHxK = average(var.value)
    var.value = carry_last(var.value, kbar_BxTxHxK, step)
    return kbar_BxTxHxK


def memory_step(module: nn.Module, step: DecodeStep, *, keys_BxTxHxK: Array,
                u_BxTxHxV: Array, extract: Callable[[Array], Array], mask: MaskSpec,
                bandwidth: Callable[[Array], Array | None], ring: int | None,
                impl: str, paging: tuple[int, int, Any] | None = None) -> Array:
    """One cached call of a contextual memory (v1, or a v2 tier) after its keys.

    Completes the pending pair with the call's first token, stores the pairs that are
    complete, retrieves for the call's queries (the keys themselves), and keeps the newest
    key and ``u_t`` as the next pending pair (cache variables ``pending_key`` and
    ``pending_input``, 0 at first).

    Args:
      keys_BxTxHxK: keys of the call's tokens.
      u_BxTxHxV: value inputs ``W_v x_t`` of the call's tokens.
      extract: ``u -> values`` (:func:`mmjax.ops.extract_values` with the layer's parameters).
      mask, bandwidth, ring, impl: see :func:`retrieve_with_cache`.
      paging: ``(page size, pages kept, page dtype)``: the pairs live in pages and each query
        retrieves from its best pages (:func:`retrieve_with_pages`).
    Returns:
      ``[B, T, H, V]`` retrieved values.
    """
    b, _, h, dk = keys_BxTxHxK.shape
    var = lambda name, shape, dt: module.variable("cache", name, jnp.zeros, shape, dt)
    pending_key = var("pending_key", (b, h, dk), keys_BxTxHxK.dtype)
    pending_input = var("pending_input", (b, h, u_BxTxHxV.shape[-1]), u_BxTxHxV.dtype)
    pairs_k = jnp.concatenate([pending_key.value[:, None], keys_BxTxHxK[:, :-1]], axis=1)
    inputs_u = jnp.concatenate([pending_input.value[:, None], u_BxTxHxV], axis=1)
    pairs_v = extract(inputs_u)[:, :-1]
    if paging is not None:
        y = retrieve_with_pages(module, step, pairs_k, pairs_v, keys_BxTxHxK, mask=mask,
                                bandwidth=bandwidth, paging=paging)
    else:
        y = retrieve_with_cache(module, step, pairs_k, pairs_v, keys_BxTxHxK, query_offset=0,
                                mask=mask, bandwidth=bandwidth, ring=ring, impl=impl)
    pending_key.value = carry_last(pending_key.value, keys_BxTxHxK, step)
    pending_input.value = carry_last(pending_input.value, u_BxTxHxV, step)
    return y


def _write_slots(buffer_NxSxD: Array, new_BxTxHxD: Array, slot_BxT: Array) -> Array:
    """``buffer[b * H + h, slot[b, j]] = new[b, j, h]``.

    The buffer folds batch and heads (``N = B * H``) and ends with a sink slot that takes
    the writes to skip and is never read. One token per row (a decoding step) is then an
    unconditional in-place ``dynamic_update_slice`` per row: a scatter, a vmapped update, a
    read of the old entry or a 4-D buffer of batch 1 each made XLA CPU copy the whole buffer
    around the update, every step.
    """
    b, t, h, d = new_BxTxHxD.shape
    s = buffer_NxSxD.shape[1]
    new_BxTxHxD = new_BxTxHxD.astype(buffer_NxSxD.dtype)
    if t > 1:
        buffer_BxHxSxD = buffer_NxSxD.reshape(b, h, s, d)
        buffer_BxHxSxD = buffer_BxHxSxD.at[jnp.arange(b)[:, None], :, slot_BxT].set(
            new_BxTxHxD, mode="promise_in_bounds")
        return buffer_BxHxSxD.reshape(b * h, s, d)
    for row in range(b):  # unrolled: each an in-place update of the donated buffer
        buffer_NxSxD = jax.lax.dynamic_update_slice(
            buffer_NxSxD, new_BxTxHxD[row, 0, :, None, :], (row * h, slot_BxT[row, 0], 0))
    return buffer_NxSxD


def retrieve_with_cache(module: nn.Module, step: DecodeStep, pairs_k_BxTxHxK: Array,
                        pairs_v_BxTxHxV: Array, queries_BxTxHxK: Array, *, query_offset: int,
                        mask: MaskSpec, bandwidth: Callable[[Array], Array | None],
                        ring: int | None, impl: str) -> Array:
    """Store ``T`` new pairs in ``module``'s cache and retrieve for the call's ``T`` queries.

    In the mask arithmetic of :func:`mmjax.ops.retrieve` the query of token ``t`` sits at
    ``t + query_offset`` and the new pairs at ``position + query_offset - 1 + j``: a memory
    (``query_offset=0``) stores the pairs ``t - 1`` it completes, attention
    (``query_offset=1``) the pairs of its own tokens. A pair is stored when its position is
    ``>= 0`` and belongs to a real token.

    Args:
      pairs_k_BxTxHxK, pairs_v_BxTxHxV: the new pairs; queries_BxTxHxK: the call's queries.
      mask: which stored pairs a query sees.
      bandwidth: query positions (``[T]`` or ``[B, T]``, mask arithmetic) -> ``None``,
        ``[H]`` or ``positions.shape + [H]``.
      ring: ``None`` (a linear buffer of ``step.cache_length`` slots) or the slots of a ring
        buffer; a ring serves a mask whose window is at most ``ring`` pairs.
      impl: retrieval implementation of the aligned path.
    Returns:
      ``[B, T, H, V]`` in the dtype of the values.
    """
    b, t, h, dk = pairs_k_BxTxHxK.shape
    dv = pairs_v_BxTxHxV.shape[-1]
    q_pos = step.query_positions(t) + query_offset
    pair_pos_BxT = (step.rows(b) + query_offset - 1)[:, None] + jnp.arange(t, dtype=jnp.int32)
    last_pair_B = jnp.asarray(step.lengths, jnp.int32) + query_offset - 2
    valid_BxT = (pair_pos_BxT >= 0) & (pair_pos_BxT <= last_pair_B[:, None])
    rows_Bx1 = jnp.arange(b)[:, None]
    slots = ring if ring is not None else step.cache_length
    var = lambda name, shape, dt: module.variable("cache", name, jnp.zeros, shape, dt)
    # Heads-major buffers [B * H, slots + 1, dim] (batch and heads folded, and a last sink
    # slot: see _write_slots): a decoding step reads each head's keys in order.
    keys = var("keys", (b * h, slots + 1, dk), pairs_k_BxTxHxK.dtype)
    values = var("values", (b * h, slots + 1, dv), pairs_v_BxTxHxV.dtype)
    unfold = lambda x: jnp.transpose(x.reshape(b, h, slots + 1, x.shape[-1]), (0, 2, 1, 3))
    new_pos_BxT = jnp.where(valid_BxT, pair_pos_BxT, -1)
    if ring is None:
        slot_BxT = jnp.where(valid_BxT, pair_pos_BxT, slots)  # skipped: to the sink
        # unwritten slots and the sink (position cache_length) are hidden by the causal mask
        held_pos = lambda: jnp.arange(slots + 1)
    else:
        # Ring: positions + 1 of the pairs held (0: empty slot); only the newest ``slots``
        # pairs of the call are kept.
        held = var("positions", (b, slots), jnp.int32)
        newest_B = jnp.max(new_pos_BxT, axis=1)
        keep_BxT = valid_BxT & (pair_pos_BxT > newest_B[:, None] - slots)
        slot_BxT = jnp.where(keep_BxT, pair_pos_BxT % slots, slots)  # skipped: to the sink
        held_pos = lambda: jnp.pad(held.value - 1, ((0, 0), (0, 1)), constant_values=-1)

    def store():
        keys.value = _write_slots(keys.value, pairs_k_BxTxHxK, slot_BxT)
        values.value = _write_slots(values.value, pairs_v_BxTxHxV, slot_BxT)
        if ring is not None:
            held.value = held.value.at[rows_Bx1, slot_BxT].set(pair_pos_BxT + 1, mode="drop")

    if ring is not None and t > 1:
        # A prefill chunk on a ring may overwrite pairs its first queries need: read the ring
        # and the chunk's pairs together, then store.
        y = retrieve_dense(queries_BxTxHxK,
                           [(keys.value, values.value, held_pos()),
                            (fold_heads(pairs_k_BxTxHxK), fold_heads(pairs_v_BxTxHxV),
                             new_pos_BxT)],
                           query_positions=q_pos, mask=mask, bandwidth=bandwidth(q_pos))
        store()
        return y
    store()
    if ring is None and step.aligned:  # prefill: the blocked (or Pallas) retrieval
        return retrieve(unfold(keys.value), unfold(values.value), queries=queries_BxTxHxK,
                        bandwidth=bandwidth(q_pos), mask=mask,
                        query_offset=step.position + query_offset, impl=impl)
    return retrieve_dense(queries_BxTxHxK, [(keys.value, values.value, held_pos())],
                          query_positions=q_pos, mask=mask, bandwidth=bandwidth(q_pos))


# The paged buffers of :func:`retrieve_with_pages`, by cache-variable name: the axis of their
# pages, counted from the end (``[..., A, R, L]`` pages, ``[..., A, K + 1]`` bounds,
# ``[..., A]`` scales of int8 pages).
PAGE_AXES = {"key_pages": -3, "value_pages": -3, "page_bounds": -2,
             "key_scale": -1, "value_scale": -1}


def retrieve_with_pages(module: nn.Module, step: DecodeStep, pairs_k_BxTxHxK: Array,
                        pairs_v_BxTxHxV: Array, queries_BxTxHxK: Array, *, mask: MaskSpec,
                        bandwidth: Callable[[Array], Array | None],
                        paging: tuple[int, int, Any]) -> Array:
    """Store ``T`` new pairs of a memory in pages and retrieve for the call's queries from
    each query's best pages (:func:`mmjax.ops.retrieve_from_pages`).

    The pair at position ``i`` goes to page ``i // U``, slot ``i % U`` of ``key_pages`` /
    ``value_pages`` ``[B * H, A + 1, *page_rows(U, D)]`` (a page's ``U x D`` values in rows of
    128 lanes where they fit: :func:`page_rows`); the bounds of the pages written to follow
    (``page_bounds`` ``[B * H, A + 1, K + 1]``, :func:`_update_bounds`), so a step's
    work is the page bounds plus the kept pages' pairs, not every pair; the pages hold the
    page dtype of ``paging`` (bfloat16 halves fp32's bytes; int8 quarters them, with a scale
    per page in ``key_scale`` / ``value_scale`` ``[B * H, A + 1]``: :func:`_write_quantized`).
    Built for a TPU, the kept pages are read in place by a Pallas kernel
    (:mod:`mmjax.kernels.paged_tpu`). The last page is a sink for the
    writes to skip, never seen. The buffers are created with the pages
    of ``step.cache_length`` tokens; after that their size is theirs (:func:`grow_pages` adds
    pages between calls). Same positions and arguments as :func:`retrieve_with_cache` with
    ``query_offset=0``.
    """
    b, t, h, dk = pairs_k_BxTxHxK.shape
    dv = pairs_v_BxTxHxV.shape[-1]
    page, top, page_dtype = paging
    var = lambda name, shape, dt: module.variable("cache", name, jnp.zeros, shape, dt)
    pages = -(-step.cache_length // page) + 1
    stored = _stored_dtype(page_dtype)
    keys = var("key_pages", (b * h, pages) + page_rows(page, dk), stored)
    values = var("value_pages", (b * h, pages) + page_rows(page, dv), stored)
    bounds = var("page_bounds", (b * h, pages, dk + 1), jnp.float32)
    sink = keys.value.shape[1] - 1
    pair_pos_BxT = (step.rows(b) - 1)[:, None] + jnp.arange(t, dtype=jnp.int32)
    last_pair_B = jnp.asarray(step.lengths, jnp.int32) - 2
    valid_BxT = ((pair_pos_BxT >= 0) & (pair_pos_BxT <= last_pair_B[:, None])
                 & (pair_pos_BxT < sink * page))
    page_BxT = jnp.where(valid_BxT, pair_pos_BxT // page, sink)
    slot_BxT = jnp.where(valid_BxT, pair_pos_BxT % page, 0)
    if jnp.dtype(page_dtype) == jnp.int8:  # pages of int8 with a scale each
        k_scale = var("key_scale", (b * h, pages), jnp.float32)
        v_scale = var("value_scale", (b * h, pages), jnp.float32)
        keys.value, k_scale.value = _write_quantized(keys.value, k_scale.value,
                                                     pairs_k_BxTxHxK, page_BxT, slot_BxT)
        values.value, v_scale.value = _write_quantized(values.value, v_scale.value,
                                                       pairs_v_BxTxHxV, page_BxT, slot_BxT)
        load, scales = None, (k_scale.value, v_scale.value)
    else:
        store = lambda x_BxTxHxD, buffer: _as_stored(x_BxTxHxD.astype(page_dtype),
                                                     buffer.value)
        keys.value = _write_pages(keys.value, store(pairs_k_BxTxHxK, keys), page_BxT,
                                  slot_BxT)
        values.value = _write_pages(values.value, store(pairs_v_BxTxHxV, values), page_BxT,
                                    slot_BxT)
        load = functools.partial(_as_loaded, page_dtype=page_dtype)  # after gathering: a view
        scales = None
    bounds.value = _update_bounds(keys.value, bounds.value, page_BxT, last_pair_B, page,
                                  page_dtype, scales and scales[0])
    q_pos = step.query_positions(t)
    # what a query read, for diagnosis (mmjax.eval.needles.page_diagnosis); a no-op unless
    # the caller makes "intermediates" mutable
    beta, key_count = bandwidth(q_pos), jnp.minimum(last_pair_B + 1, sink * page)
    module.sow("intermediates", "paged_queries", {
        "queries": queries_BxTxHxK, "bandwidth": beta, "key_count": key_count,
        "positions": jnp.broadcast_to(q_pos, (b, t)), "window": mask.window_scalar(),
        "skip": mask.skip_scalar()})
    return retrieve_from_pages(queries_BxTxHxK, keys.value, values.value, bounds.value,
                               page_size=page, load=load, scales=scales, key_count=key_count,
                               query_positions=q_pos, mask=mask, bandwidth=beta,
                               top_pages=top, impl="auto")


def _stored_dtype(page_dtype):
    """The dtype a new page buffer holds: on CPU a 16-bit float's bits as ``uint16``, since
    XLA:CPU copies a whole bfloat16 buffer around an in-place update (measured on the 2-core
    machine: 2.7 ms per update at 1025 pages of 64 x 64, against 0.06 ms for ``uint16`` or
    ``float32``); elsewhere the dtype itself (a TPU lays 16-bit integers and floats out
    differently, so there the bitcast would copy the buffer)."""
    page_dtype = jnp.dtype(page_dtype)
    if page_dtype.itemsize == 2 and target_platform() == "cpu":
        return jnp.dtype(jnp.uint16)
    return page_dtype


def _as_stored(x: Array, buffer: Array) -> Array:
    """``x`` (in the page dtype) as ``buffer`` holds it."""
    if buffer.dtype == x.dtype:
        return x
    return jax.lax.bitcast_convert_type(x, buffer.dtype)


def _as_loaded(buffer: Array, page_dtype) -> Array:
    if buffer.dtype == jnp.dtype(page_dtype):
        return buffer
    return jax.lax.bitcast_convert_type(buffer, jnp.dtype(page_dtype))


def page_rows(page_size: int, dim: int) -> tuple[int, int]:
    """How a page of ``page_size`` vectors of ``dim`` lies in a cache: ``(rows, lanes)`` with
    rows of 128 lanes where pairs fill them evenly, else one row per pair. A TPU keeps the
    two minor axes of an array in tiles of 128 lanes: pages of ``U x K`` with ``K < 128``
    made it lay the page axis minor instead, and then relayout the whole cache around every
    update and gather (measured with the real compiler: 1 GiB of temporaries per layer at
    1M tokens). On CPU the two forms are the same bytes."""
    lanes = 128
    if (page_size * dim) % lanes == 0 and (dim % lanes == 0 or lanes % dim == 0):
        return page_size * dim // lanes, lanes
    return page_size, dim


def _write_pages(pages_NxAxRxL: Array, new_BxTxHxD: Array, page_BxT: Array,
                 slot_BxT: Array) -> Array:
    """Pair ``new[b, j, h]`` into slot ``slot[b, j]`` of page ``page[b, j]`` of row
    ``b * H + h`` (:func:`page_rows` layout), in place: a one-token call updates one pair per
    row (as :func:`_write_slots`); a longer call rewrites, per row, the block of consecutive
    pages its pairs fall in (:func:`_page_block`), never the whole buffer."""
    b, t, h, d = new_BxTxHxD.shape
    lanes = pages_NxAxRxL.shape[-1]
    if t > 1:
        for row in range(b):
            first, block_HxJxUxD, local_T = _page_block(pages_NxAxRxL, row, h, page_BxT[row],
                                                        d)
            block_HxJxUxD = block_HxJxUxD.at[:, local_T, slot_BxT[row]].set(
                jnp.swapaxes(new_BxTxHxD[row], 0, 1), mode="drop")
            pages_NxAxRxL = jax.lax.dynamic_update_slice(
                pages_NxAxRxL, block_HxJxUxD.reshape((h, -1) + pages_NxAxRxL.shape[2:]),
                (row * h, first, 0, 0))
        return pages_NxAxRxL
    rows, width = max(1, d // lanes), min(d, lanes)  # one pair: whole rows, or part of one
    for row in range(b):
        first_row, first_lane = jnp.divmod(slot_BxT[row, 0] * d, lanes)
        pages_NxAxRxL = jax.lax.dynamic_update_slice(
            pages_NxAxRxL, new_BxTxHxD[row, 0].reshape(h, 1, rows, width),
            (row * h, page_BxT[row, 0], first_row, first_lane))
    return pages_NxAxRxL


def _write_quantized(pages_NxAxRxL: Array, scales_NxA: Array, new_BxTxHxD: Array,
                     page_BxT: Array, slot_BxT: Array) -> tuple[Array, Array]:
    """:func:`_write_pages` for int8 pages with a scale each (:func:`mmjax.ops.quantize_pages`):
    per row, the block of pages the call writes to is read back, the new pairs set in it,
    and the block quantized again, so each page's scale is that of its largest value so far.
    A page whose scale grows rounds its older pairs again to the new step (each time adding
    at most half of it to their error); one whose scale stays keeps them exactly."""
    b, t, h, d = new_BxTxHxD.shape
    for row in range(b):
        first, block_HxJxUxD, local_T = _page_block(pages_NxAxRxL, row, h, page_BxT[row], d)
        span = block_HxJxUxD.shape[1]
        scale_HxJ = jax.lax.dynamic_slice(scales_NxA, (row * h, first), (h, span))
        block_HxJxUxD = (block_HxJxUxD.astype(jnp.float32) * scale_HxJ[..., None, None]).at[
            :, local_T, slot_BxT[row]].set(
            jnp.swapaxes(new_BxTxHxD[row], 0, 1).astype(jnp.float32), mode="drop")
        block_HxJxUxD, scale_HxJ = quantize_pages(block_HxJxUxD)
        pages_NxAxRxL = jax.lax.dynamic_update_slice(
            pages_NxAxRxL, block_HxJxUxD.reshape((h, span) + pages_NxAxRxL.shape[2:]),
            (row * h, first, 0, 0))
        scales_NxA = jax.lax.dynamic_update_slice(scales_NxA, scale_HxJ, (row * h, first))
    return pages_NxAxRxL, scales_NxA


def _page_block(pages_NxAxRxL: Array, row: int, heads: int, page_T: Array, dim: int):
    """The consecutive pages that a call's ``T`` pairs of batch row ``row`` fall in (the
    sink page for the pairs to skip lies past them, so those land out of the block):
    ``(first page, block [H, J, U, D], index in the block of each pair's page [T])``; pairs
    outside the block get index ``J``."""
    t = page_T.shape[0]
    num_pages, r, lanes = pages_NxAxRxL.shape[1:]
    page_size = r * lanes // dim
    span = min(-(-t // page_size) + 1, num_pages)
    first = jnp.clip(jnp.min(page_T), 0, num_pages - span)
    block = jax.lax.dynamic_slice(pages_NxAxRxL, (row * heads, first, 0, 0),
                                  (heads, span, r, lanes))
    local_T = page_T - first
    local_T = jnp.where((local_T >= 0) & (local_T < span), local_T, span)
    return first, block.reshape(heads, span, page_size, dim), local_T


def _update_bounds(keys_NxAxRxL: Array, bounds_NxAxZ: Array, page_BxT: Array,
                   last_pair_B: Array, page_size: int, page_dtype,
                   scales_NxA: Array | None = None) -> Array:
    """The bounds (:func:`mmjax.ops.page_bounds`) of the pages written to, recomputed per
    row from the block of pages the call wrote (:func:`_page_block`) over their slots up to
    the row's last pair: a page written token by token gets the bounds of the same page
    written at once (a running radius could not follow the moving midpoint)."""
    b = page_BxT.shape[0]
    heads = keys_NxAxRxL.shape[0] // b
    dk = bounds_NxAxZ.shape[-1] - 1
    for row in range(b):
        first, block_HxJxUxK, _ = _page_block(keys_NxAxRxL, row, heads, page_BxT[row], dk)
        span = block_HxJxUxK.shape[1]
        if scales_NxA is None:
            block_HxJxUxK = _as_loaded(block_HxJxUxK, page_dtype)
        else:
            scale_HxJ = jax.lax.dynamic_slice(scales_NxA, (row * heads, first), (heads, span))
            block_HxJxUxK = block_HxJxUxK.astype(jnp.float32) * scale_HxJ[..., None, None]
        slot_pos_JxU = (first + jnp.arange(span))[:, None] * page_size + jnp.arange(page_size)
        bounds_NxAxZ = jax.lax.dynamic_update_slice(
            bounds_NxAxZ, page_bounds(block_HxJxUxK, slot_pos_JxU <= last_pair_B[row]),
            (row * heads, first, 0))
    return bounds_NxAxZ


def paged_capacity(cache) -> int | None:
    """Tokens the paged buffers of ``cache`` hold (pages x page size, the sink left out), or
    ``None`` when it has none."""
    sizes = [(pages.shape[-3] - 1) * page for pages, page in _paged_buffers(cache)]
    return min(sizes) if sizes else None


def _paged_buffers(cache):
    """``(key_pages, page size)`` of each paged memory in ``cache`` (the page size from the
    page's values and the bounds' key width). A plain walk of the nested dicts: this runs
    before every decoding step, where ``jax.tree_util`` paths cost a tenth of a millisecond."""
    found, stack = [], [cache]
    while stack:
        node = stack.pop()
        if not hasattr(node, "items"):
            continue
        if "key_pages" in node:
            pages = node["key_pages"]
            key_dim = node["page_bounds"].shape[-1] - 1
            found.append((pages, math.prod(pages.shape[-2:]) // key_dim))
        stack.extend(v for k, v in node.items() if k not in PAGE_AXES)
    return found


def grow_pages(cache, tokens: int):
    """``cache`` with its paged buffers holding at least ``tokens`` tokens: pages added at the
    end (the old sink page cleared), every other buffer as it was."""
    capacity = paged_capacity(cache)
    if capacity is None or tokens <= capacity:
        return cache
    new_pages = -(-tokens // _paged_buffers(cache)[0][1])

    def pad(path, leaf):
        axis = PAGE_AXES.get(_leaf_name(path))
        if axis is None:
            return leaf
        axis = leaf.ndim + axis
        old_pages = leaf.shape[axis] - 1
        kept = jax.lax.slice_in_dim(leaf, 0, old_pages, axis=axis)
        widths = [(0, 0)] * leaf.ndim
        widths[axis] = (0, new_pages + 1 - old_pages)
        return jnp.pad(kept, widths)

    return jax.tree_util.tree_map_with_path(pad, cache)


def _leaf_name(path) -> str | None:
    last = path[-1] if path else None
    return getattr(last, "key", None)

