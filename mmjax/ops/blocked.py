"""The blocked XLA path of retrieval: online softmax over query and key tiles.

Running max and sum stay in fp32; a ``jax.custom_vjp`` backward recomputes the scores tile
by tile, so forward and backward use O(T) memory. Key tiles that the mask hides from a whole
query tile are never visited (:func:`mmjax.ops.masks.kv_tile_range`): with a window or a
skip the cost is O(T * window), not O(T^2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.ops.masks import MaskSpec, kv_tile_range, visible_mask

Array = jax.Array

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 256
# Query tile when every query sees every key (the v1 persistent memory): there is no mask
# to skip tiles by, and taller query tiles make fewer, larger matmuls. Measured on the
# 2-core CPU machine, 2048 queries x 1024 slots x 4 heads of 64, forward + backward:
# 256x256 tiles 45.6 ms, 512x512 40.4, 1024x256 37.5, 2048x256 37.2, 2048x512 53.1.
ALL_VISIBLE_BLOCK_Q = 1024


def default_blocks(tq: int, window, all_visible: bool, platform: str) -> tuple[int, int]:
    """``(block_q, block_k)`` of the blocked path when the caller gives none.

    Off CPU (where this path runs only when no kernel does) the tiles are 256. On CPU the
    score tiles of every batch row and head are live at once, so smaller tiles stay in cache
    and skip more of a masked band. Measured on the 2-core CPU machine, batch 8 x 4 heads of
    64, forward + backward, ms at tiles 64 / 128 / 256: causal T=256 25 / 28 / 25, T=512
    74 / 79 / 100, T=1024 292 / 316 / 311; a window of 64 at T=512 (tiles 16 / 32 / 64 /
    128): 56 / 33 / 36 / 62, window 16: 25 / 26 / - / -, window 256 (64 / 128): 72 / 86;
    heads of 16, T=64, window 16 (tiles 16 / 32 / 64): 1.8 / 1.4 / 1.0.
    """
    if all_visible:
        return ALL_VISIBLE_BLOCK_Q, DEFAULT_BLOCK_K
    if platform != "cpu":
        return DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K
    if isinstance(window, (int, np.integer)):
        size = 64 if tq <= 64 or window > 128 else 32
    else:
        size = DEFAULT_BLOCK_Q if tq <= DEFAULT_BLOCK_Q else 64
    return size, size


def _pad_time(x, multiple):
    t = x.shape[1]
    pad = (-t) % multiple
    if pad == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))


def all_visible(mask: MaskSpec, query_offset, k_time: int) -> bool:
    """True when it is known without tracing that every query sees every key: no window, no
    skip, and the first query sits after the last key (the persistent memory's layout)."""
    return (mask.window is None and isinstance(mask.skip, int) and mask.skip == 0
            and isinstance(query_offset, (int, np.integer)) and query_offset >= k_time)


def _heads_major(x_BxTxHxD: Array) -> Array:
    """``[B, T, H, D] -> [B, H, T, D]``: every tile product is then a plain batched matmul."""
    return jnp.transpose(x_BxTxHxD, (0, 2, 1, 3))


def _tile_scores(q_BxHxQxK, k_BxHxCxK, beta_HxQ, q_pos_Q, k_pos_C, k_time, mask,
                 has_bandwidth=True, all_visible=False):
    """fp32 scores of one tile pair with hidden entries at -inf, and the raw ``<q, k>``.

    ``all_visible``: every query sees every real key; only keys past ``k_time`` (padding)
    are hidden."""
    raw_BxHxQxC = jnp.einsum(
        "bhqk,bhck->bhqc", q_BxHxQxK, k_BxHxCxK, preferred_element_type=jnp.float32
    )
    s_BxHxQxC = raw_BxHxQxC * beta_HxQ[None, :, :, None] if has_bandwidth else raw_BxHxQxC
    if all_visible:
        if k_time % k_BxHxCxK.shape[2] == 0:  # no padded keys
            return s_BxHxQxC, raw_BxHxQxC
        return jnp.where((k_pos_C < k_time)[None, :], s_BxHxQxC, -jnp.inf), raw_BxHxQxC
    visible_QxC = visible_mask(q_pos_Q, k_pos_C, mask) & (k_pos_C < k_time)[None, :]
    return jnp.where(visible_QxC, s_BxHxQxC, -jnp.inf), raw_BxHxQxC


def retrieve_blocked(
    q_BxQxHxK: Array,
    k_BxTxHxK: Array,
    v_BxTxHxV: Array,
    beta_QxH: Array,
    mask: MaskSpec,
    query_offset: Array,
    *,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    has_bandwidth: bool = True,
    all_visible: bool = False,
) -> Array:
    """Blocked online-softmax retrieval with O(T) memory in forward and backward.

    Same arguments as :func:`mmjax.ops.dense.retrieve_reference`; ``block_q``/``block_k``
    are the tile sizes (clipped to the sequence lengths); ``has_bandwidth=False`` ignores
    ``beta_QxH`` (a constant 1; its cotangent is 0) and skips the bandwidth gradient;
    ``all_visible=True`` (every query sees every key: the caller knows it statically) skips
    the mask.
    """
    tq, tk = q_BxQxHxK.shape[1], k_BxTxHxK.shape[1]
    block_q = int(max(1, min(block_q, tq)))
    block_k = int(max(1, min(block_k, tk)))
    limits = (mask.window_scalar(), mask.skip_scalar(), jnp.asarray(query_offset, jnp.int32))
    flags = (has_bandwidth, all_visible)
    return _blocked(q_BxQxHxK, k_BxTxHxK, v_BxTxHxV, beta_QxH, limits, block_q, block_k,
                    flags)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blocked(q, k, v, beta, limits, block_q, block_k, flags):
    return _blocked_fwd(q, k, v, beta, limits, block_q, block_k, flags)[0]


def _blocked_fwd(q, k, v, beta, limits, block_q, block_k, flags):
    has_bandwidth, all_visible = flags
    window, skip, offset = limits
    mask = MaskSpec(window=window, skip=skip)
    b, tq, h, _ = q.shape
    tk, dv = k.shape[1], v.shape[3]
    qh = _heads_major(_pad_time(q, block_q))
    kh, vh = _heads_major(_pad_time(k, block_k)), _heads_major(_pad_time(v, block_k))
    beta_HxQ = jnp.pad(beta, ((0, (-tq) % block_q), (0, 0))).T
    num_q_tiles = qh.shape[2] // block_q

    def q_tile(qi):
        q_start = qi * block_q
        q_BxHxQxK = jax.lax.dynamic_slice_in_dim(qh, q_start, block_q, axis=2)
        beta_t = jax.lax.dynamic_slice_in_dim(beta_HxQ, q_start, block_q, axis=1)
        q_pos = offset + q_start + jnp.arange(block_q, dtype=jnp.int32)
        lo, hi = kv_tile_range(q_start, jnp.minimum(q_start + block_q, tq), tk, block_k,
                               mask, offset)

        def kv_step(kj, carry):
            m_BxHxQ, l_BxHxQ, acc_BxHxQxV = carry
            k_start = kj * block_k
            k_BxHxCxK = jax.lax.dynamic_slice_in_dim(kh, k_start, block_k, axis=2)
            v_BxHxCxV = jax.lax.dynamic_slice_in_dim(vh, k_start, block_k, axis=2)
            k_pos = k_start + jnp.arange(block_k, dtype=jnp.int32)
            s_BxHxQxC, _ = _tile_scores(q_BxHxQxK, k_BxHxCxK, beta_t, q_pos, k_pos, tk, mask,
                                        has_bandwidth, all_visible)
            m_new = jnp.maximum(m_BxHxQ, jnp.max(s_BxHxQxC, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            alpha = jnp.exp(m_BxHxQ - m_safe)
            p_BxHxQxC = jnp.exp(s_BxHxQxC - m_safe[..., None])
            l_new = alpha * l_BxHxQ + jnp.sum(p_BxHxQxC, axis=-1)
            pv = jnp.einsum("bhqc,bhcv->bhqv", p_BxHxQxC.astype(v.dtype), v_BxHxCxV,
                            preferred_element_type=jnp.float32)
            return m_new, l_new, alpha[..., None] * acc_BxHxQxV + pv

        init = (
            jnp.full((b, h, block_q), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, block_q), jnp.float32),
            jnp.zeros((b, h, block_q, dv), jnp.float32),
        )
        m_BxHxQ, l_BxHxQ, acc_BxHxQxV = jax.lax.fori_loop(lo, hi + 1, kv_step, init)
        nonempty = l_BxHxQ > 0
        y_BxHxQxV = acc_BxHxQxV / jnp.where(nonempty, l_BxHxQ, 1.0)[..., None]
        # log-sum-exp per row; +inf for empty rows so that exp(s - lse) = 0 in the backward.
        lse_BxHxQ = jnp.where(nonempty, m_BxHxQ + jnp.log(jnp.where(nonempty, l_BxHxQ, 1.0)),
                              jnp.inf)
        return y_BxHxQxV, lse_BxHxQ

    y_IxBxHxQxV, lse_IxBxHxQ = jax.lax.map(q_tile, jnp.arange(num_q_tiles))
    y = jnp.transpose(y_IxBxHxQxV, (1, 0, 3, 2, 4)).reshape(b, -1, h, dv)[:, :tq]
    lse_BxHxQ = jnp.transpose(lse_IxBxHxQ, (1, 2, 0, 3)).reshape(b, h, -1)[..., :tq]
    y = y.astype(v.dtype)
    return y, (q, k, v, beta, limits, y, lse_BxHxQ)


def _blocked_bwd(block_q, block_k, flags, residuals, dy):
    has_bandwidth, all_visible = flags
    q, k, v, beta, limits, y, lse = residuals
    window, skip, offset = limits
    mask = MaskSpec(window=window, skip=skip)
    tq, tk = q.shape[1], k.shape[1]
    qh, dyh = _heads_major(_pad_time(q, block_q)), _heads_major(_pad_time(dy, block_q))
    kh, vh = _heads_major(_pad_time(k, block_k)), _heads_major(_pad_time(v, block_k))
    beta_HxQ = jnp.pad(beta, ((0, (-tq) % block_q), (0, 0))).T
    # D_t = <dy_t, y_t>: the softmax Jacobian's row term.
    delta_BxHxQ = jnp.einsum("bqhv,bqhv->bhq", dy.astype(jnp.float32), y.astype(jnp.float32))
    pad_q = qh.shape[2] - tq
    delta_BxHxQ = jnp.pad(delta_BxHxQ, ((0, 0), (0, 0), (0, pad_q)))
    lse_BxHxQ = jnp.pad(lse, ((0, 0), (0, 0), (0, pad_q)), constant_values=jnp.inf)
    num_q_tiles = qh.shape[2] // block_q

    def q_tile(qi, carry):
        dq_acc, dk_acc, dv_acc, dbeta_acc = carry
        q_start = qi * block_q
        sl = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=q_start,
                               slice_size=block_q, axis=2)
        q_BxHxQxK, dy_BxHxQxV = sl(qh), sl(dyh)
        lse_t, delta_t = sl(lse_BxHxQ), sl(delta_BxHxQ)
        beta_t = jax.lax.dynamic_slice_in_dim(beta_HxQ, q_start, block_q, axis=1)
        q_pos = offset + q_start + jnp.arange(block_q, dtype=jnp.int32)
        lo, hi = kv_tile_range(q_start, jnp.minimum(q_start + block_q, tq), tk, block_k,
                               mask, offset)
        q32, dy32 = q_BxHxQxK.astype(jnp.float32), dy_BxHxQxV.astype(jnp.float32)

        def kv_step(kj, inner):
            dq_BxHxQxK, dbeta_BxHxQ, dk_acc, dv_acc = inner
            k_start = kj * block_k
            k_BxHxCxK = jax.lax.dynamic_slice_in_dim(kh, k_start, block_k, axis=2)
            v_BxHxCxV = jax.lax.dynamic_slice_in_dim(vh, k_start, block_k, axis=2)
            k_pos = k_start + jnp.arange(block_k, dtype=jnp.int32)
            s_BxHxQxC, raw_BxHxQxC = _tile_scores(q_BxHxQxK, k_BxHxCxK, beta_t, q_pos, k_pos,
                                                  tk, mask, has_bandwidth, all_visible)
            p_BxHxQxC = jnp.exp(s_BxHxQxC - lse_t[..., None])
            dv_tile = jnp.einsum("bhqc,bhqv->bhcv", p_BxHxQxC, dy32)
            dp_BxHxQxC = jnp.einsum("bhqv,bhcv->bhqc", dy_BxHxQxV, v_BxHxCxV,
                                    preferred_element_type=jnp.float32)
            # dS: gradient w.r.t. the scaled scores beta_t <q_t, k_i>.
            ds_BxHxQxC = p_BxHxQxC * (dp_BxHxQxC - delta_t[..., None])
            if has_bandwidth:
                dbeta_BxHxQ = dbeta_BxHxQ + jnp.sum(ds_BxHxQxC * raw_BxHxQxC, axis=-1)
                ds_BxHxQxC = ds_BxHxQxC * beta_t[None, :, :, None]
            dq_BxHxQxK = dq_BxHxQxK + jnp.einsum("bhqc,bhck->bhqk", ds_BxHxQxC,
                                                 k_BxHxCxK.astype(jnp.float32))
            dk_tile = jnp.einsum("bhqc,bhqk->bhck", ds_BxHxQxC, q32)
            dk_acc = _add_slice(dk_acc, dk_tile, k_start)
            dv_acc = _add_slice(dv_acc, dv_tile, k_start)
            return dq_BxHxQxK, dbeta_BxHxQ, dk_acc, dv_acc

        b, h, _, dk = qh.shape
        init = (jnp.zeros((b, h, block_q, dk), jnp.float32),
                jnp.zeros((b, h, block_q), jnp.float32), dk_acc, dv_acc)
        dq_BxHxQxK, dbeta_BxHxQ, dk_acc, dv_acc = jax.lax.fori_loop(lo, hi + 1, kv_step, init)
        dq_acc = jax.lax.dynamic_update_slice_in_dim(dq_acc, dq_BxHxQxK, q_start, axis=2)
        dbeta_acc = jax.lax.dynamic_update_slice_in_dim(
            dbeta_acc, jnp.sum(dbeta_BxHxQ, axis=0), q_start, axis=1)
        return dq_acc, dk_acc, dv_acc, dbeta_acc

    init = (
        jnp.zeros(qh.shape, jnp.float32),
        jnp.zeros(kh.shape, jnp.float32),
        jnp.zeros(vh.shape, jnp.float32),
        jnp.zeros(beta_HxQ.shape, jnp.float32),
    )
    dq, dk, dv, dbeta = jax.lax.fori_loop(0, num_q_tiles, q_tile, init)
    return (
        _heads_major(dq)[:, :tq].astype(q.dtype),
        _heads_major(dk)[:, :tk].astype(k.dtype),
        _heads_major(dv)[:, :tk].astype(v.dtype),
        dbeta.T[:tq].astype(beta.dtype),
        jax.tree_util.tree_map(_zero_cotangent, limits),
    )


def _add_slice(acc_BxHxTxD, tile_BxHxCxD, start):
    current = jax.lax.dynamic_slice_in_dim(acc_BxHxTxD, start, tile_BxHxCxD.shape[2], axis=2)
    return jax.lax.dynamic_update_slice_in_dim(acc_BxHxTxD, current + tile_BxHxCxD, start,
                                               axis=2)


def _zero_cotangent(x):
    return np.zeros(np.shape(x), jax.dtypes.float0)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
