"""Paged retrieval: a query scores pages of pairs first, then retrieves exactly from the best.

The pairs at positions ``a U .. a U + U - 1`` form page ``a`` (``U`` pairs a page). Each page
keeps a ball around its keys: the midpoint ``m`` of their box and the largest distance of a
key from it (:func:`page_bounds`). For a query ``q``, ``<q, m> + |q| radius`` bounds
``<q, k_i>`` from above for every key of the page, and it is one matmul
(:func:`page_scores`). A query keeps the page of its newest
visible pair, ranks the other pages it may see (the mask of :func:`mmjax.ops.retrieve`:
window, skip, causality) by that score, keeps the best ``W - 1`` (:func:`top_indices`), and
runs exact kernel regression over the pairs of its ``W`` pages, masked as usual. Only
complete pages compete, so a page's bound never depends on pairs stored after the query.
When ``W`` covers every page the query sees, the result is :func:`mmjax.ops.retrieve`'s
(up to summation order), values and gradients alike. The selection is per query: a chunk of
queries gets what one query at a time gets, so prefill and decoding agree.

Layout: pages fold batch and heads (row ``b * H + h``) like the decoding caches,
``keys_NxAxUxK``; unwritten slots are never read (the mask hides them, and the page that
holds them never competes). Why bounds and not a mean key: ``docs/architecture.md``, section 10.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mmjax.ops.dense import _softmax_parts, fold_heads
from mmjax.ops.masks import MaskSpec, check_scalar_range, target_platform

Array = jax.Array

# Queries retrieved together by :func:`retrieve_paged`: the gathered pages of a chunk are
# ``chunk x W x U`` pairs per row.
QUERY_CHUNK = 64


def page_bounds(keys_NxAxUxK: Array, written_AxU: Array | None = None) -> Array:
    """fp32 ``[N, A, K + 1]``: each page's ball, the midpoint ``m`` of its keys' box
    (elementwise maximum and minimum) and the largest distance of a key from it
    (``radius``), side by side so that scoring the pages is one matmul
    (:func:`page_scores`). ``written_AxU``: the slots that hold keys (default: all); a page
    without one gets ``m = 0`` and ``radius = -inf`` (no query prefers it).

    Why the ball and not the box itself (``sum_k max(q_k hi_k, q_k lo_k)``, also an upper
    bound): on the unit keys of a trained v2 at 256k tokens the box ranked a needle's page
    (whose pair took all of the exact weight) 584th of 4,095 and the ball 9th; the smaller
    of the two ranked every needle's page as the ball did, at twice the matmul
    (``docs/architecture.md``, section 10)."""
    k32 = keys_NxAxUxK.astype(jnp.float32)
    if written_AxU is None:
        written_AxU = jnp.ones(k32.shape[1:3], bool)
    written = written_AxU[None, :, :, None]
    hi_NxAxK = jnp.max(jnp.where(written, k32, -jnp.inf), axis=2)
    lo_NxAxK = jnp.min(jnp.where(written, k32, jnp.inf), axis=2)
    any_NxAx1 = jnp.any(written_AxU, axis=-1)[None, :, None]
    mid_NxAxK = jnp.where(any_NxAx1, (hi_NxAxK + lo_NxAxK) / 2, 0.0)
    distance_NxAxU = jnp.sqrt(jnp.sum(jnp.square(k32 - mid_NxAxK[:, :, None]), axis=-1))
    radius_NxA = jnp.max(jnp.where(written[..., 0], distance_NxAxU, -jnp.inf), axis=2)
    return jnp.concatenate([mid_NxAxK, radius_NxA[..., None]], axis=-1)


def page_scores(q_NxQxK: Array, bounds_NxAxZ: Array) -> Array:
    """fp32 ``[N, Q, A]``: each page's upper bound on a query's score ``<q, k>`` over the
    page's keys, ``<q, m> + |q| radius`` (:func:`page_bounds`): one matmul of
    ``[q, |q|]`` with ``[m, radius]``."""
    q32 = jax.lax.stop_gradient(q_NxQxK.astype(jnp.float32))
    norm_NxQx1 = jnp.sqrt(jnp.sum(jnp.square(q32), axis=-1, keepdims=True))
    return jnp.einsum("nqz,naz->nqa", jnp.concatenate([q32, norm_NxQx1], axis=-1),
                      bounds_NxAxZ)


def quantize_pages(pages_NxAxUxD: Array) -> tuple[Array, Array]:
    """int8 pages and their fp32 scales ``[N, A]``: each page's largest magnitude maps to 127
    (``page ~ q * scale``; an all-zero page has scale 0), so a value is off by at most half
    its page's scale."""
    x32 = pages_NxAxUxD.astype(jnp.float32)
    scale_NxA = jnp.max(jnp.abs(x32), axis=(2, 3)) / 127.0
    safe = jnp.where(scale_NxA > 0, scale_NxA, 1.0)[..., None, None]
    q = jnp.clip(jnp.round(x32 / safe), -127, 127).astype(jnp.int8)
    return q, scale_NxA


def to_pages(x_BxTxHxD: Array, page_size: int) -> Array:
    """``[B, T, H, D] -> [B * H, A, U, D]``, the time axis padded with zeros to whole pages."""
    x_NxTxD = fold_heads(x_BxTxHxD)
    pad = (-x_NxTxD.shape[1]) % page_size
    x_NxTxD = jnp.pad(x_NxTxD, ((0, 0), (0, pad), (0, 0)))
    n, t, d = x_NxTxD.shape
    return x_NxTxD.reshape(n, t // page_size, page_size, d)


def check_paging(**settings) -> None:
    """Raise a ``ValueError`` naming a setting that is not an integer >= 1
    (``check_paging(page_size=64, top_pages=16)``)."""
    for name, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def retrieve_paged(
    keys: Array,
    values: Array,
    *,
    page_size: int,
    top_pages: int,
    bandwidth: Array | None = None,
    mask: MaskSpec = MaskSpec(),
    queries: Array | None = None,
    query_offset=0,
    query_chunk: int = QUERY_CHUNK,
) -> Array:
    """Masked kernel-regression retrieval over the top ``top_pages`` pages of each query.

    Same arguments and result as :func:`mmjax.ops.retrieve` (``keys [B, T, H, K]``,
    ``values [B, T, H, V]``, ``queries [B, Q, H, K]`` defaulting to the keys, ``bandwidth``
    ``None``/``[H]``/``[Q, H]``), plus ``page_size`` (``U``) and ``top_pages`` (``W``).
    Queries run ``query_chunk`` at a time (memory ``B H x chunk x W U`` pairs).
    """
    if queries is None:
        queries = keys
    check_paging(page_size=page_size, top_pages=top_pages, query_chunk=query_chunk)
    for name, arr in (("keys", keys), ("values", values), ("queries", queries)):
        if jnp.ndim(arr) != 4:
            raise ValueError(f"{name} must have rank 4 [batch, time, heads, dim], got shape "
                             f"{jnp.shape(arr)}")
    check_scalar_range("query_offset", query_offset, minimum=0, allow_none=False)
    b, tq, h, _ = queries.shape
    tk = keys.shape[1]
    key_pages = to_pages(keys, page_size)
    bounds = page_bounds(key_pages)
    beta = jnp.ones((h,), jnp.float32) if bandwidth is None else bandwidth
    beta_QxH = jnp.broadcast_to(jnp.asarray(beta, jnp.float32), (tq, h))
    q_pos_Q = jnp.asarray(query_offset, jnp.int32) + jnp.arange(tq, dtype=jnp.int32)
    return retrieve_from_pages(queries, key_pages, to_pages(values, page_size), bounds,
                               key_count=tk, query_positions=q_pos_Q, mask=mask,
                               bandwidth=beta_QxH, top_pages=top_pages,
                               query_chunk=query_chunk)


def retrieve_from_pages(
    q_BxQxHxK: Array,
    keys_NxAxUxK: Array,
    values_NxAxUxV: Array,
    bounds: Array,
    *,
    page_size: int | None = None,
    load=None,
    scales: tuple[Array, Array] | None = None,
    key_count,
    query_positions: Array,
    mask: MaskSpec,
    bandwidth: Array,
    top_pages: int,
    query_chunk: int = QUERY_CHUNK,
    impl: str = "xla",
) -> Array:
    """Paged retrieval from stored pages (the decoding caches' layout).

    Args:
      q_BxQxHxK: queries.
      keys_NxAxUxK, values_NxAxUxV: pages; pair ``i`` sits at page ``i // U``, slot
        ``i % U``; row ``b * H + h``. A page's trailing axes may hold its ``U x D`` values in
        another row-major shape (e.g. rows of 128 lanes), given ``page_size``.
      page_size: ``U`` (default: axis 2 of the pages).
      load: applied to the gathered pages before use (the caches keep 16-bit pages as
        their bits: a bitcast of the whole store would be a copy of it; default none).
      scales: ``(key scales, value scales)`` ``[N, A]`` of int8 pages
        (:func:`quantize_pages`): a kept page's scores and weights are scaled, its pairs are
        never dequantized in memory.
      bounds: ``[N, A, K + 1]`` of :func:`page_bounds` (kept as pages are written when
        decoding).
      key_count: pairs stored (int or ``[B]``): positions from there on are hidden.
      query_positions: int ``[Q]`` or ``[B, Q]``, absolute positions of the queries.
      mask: a :class:`MaskSpec`.
      bandwidth: ``[Q, H]`` or ``[B, Q, H]``.
      top_pages: pages kept per query (clipped to the page count).
      impl: how the kept pages are read: ``"xla"`` gathers them (differentiable);
        ``"pallas_tpu"`` reads them in place with :mod:`mmjax.kernels.paged_tpu` (forward
        only; keys and values of one width); ``"auto"``: the kernel when the computation is
        built for a TPU and it applies, else ``"xla"``.
    Returns:
      ``[B, Q, H, V]`` in the queries' dtype (the pages may be stored narrower); rows with
      no visible pair are 0.
    """
    b, tq, h, dk = q_BxQxHxK.shape
    n, num_pages = keys_NxAxUxK.shape[:2]
    page_size = keys_NxAxUxK.shape[2] if page_size is None else page_size
    dv = math.prod(values_NxAxUxV.shape[2:]) // page_size
    top = min(top_pages, num_pages)
    rows = lambda x, tail: jnp.broadcast_to(jnp.asarray(x), (b,) + tail)
    pos_BxQ = rows(jnp.asarray(query_positions, jnp.int32), (tq,))
    count_B = rows(jnp.asarray(key_count, jnp.int32), ())
    beta_BxQxH = rows(jnp.asarray(bandwidth, jnp.float32), (tq, h))
    if impl == "auto":
        impl = ("pallas_tpu" if target_platform() == "tpu"
                and values_NxAxUxV.shape == keys_NxAxUxK.shape else "xla")
    if impl not in ("xla", "pallas_tpu"):
        raise ValueError(f"impl must be 'xla', 'pallas_tpu' or 'auto', got {impl!r}")
    load = load or (lambda x: x)
    chunk = min(query_chunk, tq)
    pad = (-tq) % chunk
    pad_q = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    # chunk-major: [I, ...] with I = chunks
    split = lambda x: jnp.moveaxis(pad_q(x).reshape((b, -1, chunk) + x.shape[2:]), 1, 0)
    bounds_NxAxZ = jax.lax.stop_gradient(bounds)

    def one_chunk(args):
        q_BxQxHxK, pos_BxQ, beta_BxQxH = args
        q_NxQxK = fold_heads(q_BxQxHxK)
        pos_NxQ = jnp.repeat(pos_BxQ, h, axis=0)
        count_N = jnp.repeat(count_B, h)
        first_NxQ = jnp.maximum(pos_NxQ - mask.window_scalar(), 0)
        last_NxQ = jnp.minimum(pos_NxQ - 1 - mask.skip_scalar(), count_N[:, None] - 1)
        page_NxQxW, kept_NxQxW = select_pages(q_NxQxK, bounds_NxAxZ, first_NxQ, last_NxQ,
                                              page_size=page_size, top=top)
        beta_NxQ = jnp.transpose(beta_BxQxH, (0, 2, 1)).reshape(n, -1)
        flat_NxQxW = jnp.arange(n)[:, None, None] * num_pages + page_NxQxW
        kept_scales = (None if scales is None
                       else tuple(x.reshape(-1)[flat_NxQxW] for x in scales))
        if impl == "pallas_tpu":
            from mmjax.kernels.paged_tpu import retrieve_pages_tpu

            y_NxQxV = retrieve_pages_tpu(
                q_NxQxK.astype(jnp.float32) * beta_NxQ[..., None], load(keys_NxAxUxK),
                load(values_NxAxUxV), page_NxQxW, kept_NxQxW, first_NxQ, last_NxQ,
                page_size=page_size, scales_NxQxW=kept_scales)
            return jnp.transpose(y_NxQxV.reshape(b, h, chunk, -1), (0, 2, 1, 3))
        # exact retrieval over the chosen pages' pairs
        # one gather of whole pages along the folded (row, page) axis: it keeps the pages'
        # layout (a per-row gather made XLA:TPU relayout the whole cache every step)
        take = lambda pages, d: load(
            pages.reshape((n * num_pages,) + pages.shape[2:])[flat_NxQxW]).reshape(
            flat_NxQxW.shape + (page_size, d))
        k_NxQxWxUxK, v_NxQxWxUxV = take(keys_NxAxUxK, dk), take(values_NxAxUxV, dv)
        # the pairs as the dot's left operand: with the query on the left, this dot took
        # 0.3 of a decoding retrieval's 0.5 ms on XLA:CPU, about twice its time now
        s_NxQxWxU = jnp.einsum("nqwuk,nqk->nqwu", k_NxQxWxUxK, q_NxQxK,
                               preferred_element_type=jnp.float32)
        s_NxQxWxU = s_NxQxWxU * beta_NxQ[..., None, None]
        if scales is not None:
            k_scale_NxQxW, v_scale_NxQxW = kept_scales
            s_NxQxWxU = s_NxQxWxU * k_scale_NxQxW[..., None]
        pair_NxQxWxU = (page_NxQxW[..., None] * page_size
                        + jnp.arange(page_size, dtype=jnp.int32))
        visible = ((pair_NxQxWxU >= first_NxQ[..., None, None])
                   & (pair_NxQxWxU <= last_NxQ[..., None, None]) & kept_NxQxW[..., None])
        s_NxQxWxU = jnp.where(visible, s_NxQxWxU, -jnp.inf)
        p_NxQxWxU = _softmax_parts([s_NxQxWxU.reshape(n, -1, top * page_size)])[0].reshape(
            s_NxQxWxU.shape)
        if scales is not None:
            p_NxQxWxU = p_NxQxWxU * v_scale_NxQxW[..., None]
        weight_dtype = (v_NxQxWxUxV.dtype if jnp.issubdtype(v_NxQxWxUxV.dtype, jnp.floating)
                        else jnp.float32)
        y_NxQxV = jnp.einsum("nqwu,nqwuv->nqv", p_NxQxWxU.astype(weight_dtype),
                             v_NxQxWxUxV, preferred_element_type=jnp.float32)
        return jnp.transpose(y_NxQxV.reshape(b, h, chunk, -1), (0, 2, 1, 3))

    chunks = (split(q_BxQxHxK), split(pos_BxQ), split(beta_BxQxH))
    if tq <= chunk:  # one chunk (a decoding step): no loop around it
        y_IxBxQxHxV = one_chunk(jax.tree.map(lambda x: x[0], chunks))[None]
    else:
        y_IxBxQxHxV = jax.lax.map(one_chunk, chunks)
    y_BxQxHxV = jnp.moveaxis(y_IxBxQxHxV, 0, 1).reshape((b, -1, h, dv))
    return y_BxQxHxV[:, :tq].astype(q_BxQxHxK.dtype)


def select_pages(q_NxQxK: Array, bounds_NxAxZ: Array, first_NxQ: Array, last_NxQ: Array,
                 *, page_size: int, top: int) -> tuple[Array, Array]:
    """Each query's ``top`` pages: the page of its newest visible pair, then the complete
    pages it may see ranked by their bound (:func:`page_scores`).

    ``first``/``last``: the query's oldest and newest visible pair (``last < first``: none).
    Returns ``(page_NxQxW, kept_NxQxW)``: page indices, and whether each is a page the query
    may see (a query that sees fewer than ``top`` pages gets unseen ones, not kept).
    """
    num_pages = bounds_NxAxZ.shape[1]
    bound_NxQxA = page_scores(q_NxQxK, bounds_NxAxZ)
    start_A = jnp.arange(num_pages, dtype=jnp.int32) * page_size
    seen_NxQxA = ((start_A <= last_NxQ[..., None])
                  & (start_A + page_size - 1 >= first_NxQ[..., None])
                  & (last_NxQ >= first_NxQ)[..., None])
    newest_NxQx1 = jnp.maximum(last_NxQ, 0)[..., None] // page_size
    compete_NxQxA = seen_NxQxA & (jnp.arange(num_pages) != newest_NxQx1)
    page_NxQxW = newest_NxQx1
    kept_NxQxW = jnp.take_along_axis(seen_NxQxA, newest_NxQx1, axis=-1)
    if top > 1:
        best_NxQxW = top_indices(jnp.where(compete_NxQxA, bound_NxQxA, -jnp.inf), top - 1)
        page_NxQxW = jnp.concatenate([page_NxQxW, best_NxQxW], axis=-1)
        kept_NxQxW = jnp.concatenate(
            [kept_NxQxW, jnp.take_along_axis(compete_NxQxA, best_NxQxW, axis=-1)], axis=-1)
    return page_NxQxW, kept_NxQxW


def top_indices(scores_NxQxA: Array, k: int) -> Array:
    """The indices ``[N, Q, k]`` of each row's ``k`` largest scores, best first, as
    ``jax.lax.top_k``'s (up to ties), in two smaller top-k's where that is cheaper.

    The ``k`` groups of ``G`` consecutive scores with the largest maxima hold the ``k``
    largest scores (a group without one of them has no score above the k-th), so the
    top-k of the group maxima, then of those groups' ``k G`` scores (and the last ``A % G``
    scores, in no group) finds them: at 16k pages and ``k = 15``, two top-k's of about 500
    instead of one of 16k.
    """
    a = scores_NxQxA.shape[-1]
    group = 1 << max(0, round(math.log2(math.sqrt(a / k))))
    groups = a // group
    if group < 2 or groups <= k:
        return jax.lax.top_k(scores_NxQxA, k)[1]
    lead = scores_NxQxA.shape[:-1]
    maxima_NxQxG = jnp.max(scores_NxQxA[..., :groups * group].reshape(lead + (groups, group)),
                           axis=-1)
    best_NxQxk = jax.lax.top_k(maxima_NxQxG, k)[1]
    candidates_NxQxC = (best_NxQxk[..., None] * group
                        + jnp.arange(group, dtype=best_NxQxk.dtype)).reshape(lead + (-1,))
    tail = jnp.arange(groups * group, a, dtype=best_NxQxk.dtype)
    candidates_NxQxC = jnp.concatenate(
        [candidates_NxQxC, jnp.broadcast_to(tail, lead + tail.shape)], axis=-1)
    chosen_NxQxk = jax.lax.top_k(jnp.take_along_axis(scores_NxQxA, candidates_NxQxC, axis=-1),
                                 k)[1]
    return jnp.take_along_axis(candidates_NxQxC, chosen_NxQxk, axis=-1)
