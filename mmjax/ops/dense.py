"""Dense retrieval: the specification every other path is tested against, and the decoding
path whose rows sit at different positions.

O(queries x keys) memory; see :mod:`mmjax.ops.retrieval` for the math.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mmjax.ops.masks import MaskSpec, visible_mask

Array = jax.Array


def retrieval_weights(
    q_BxQxHxK: Array,
    k_BxTxHxK: Array,
    beta_QxH: Array,
    mask: MaskSpec,
    query_offset: Array,
) -> Array:
    """Dense fp32 softmax weights ``[batch, heads, q_time, k_time]``; hidden entries are 0.

    The weights of :func:`retrieve_reference`, exposed for the rare caller that must act on
    them before they meet the values (dropout on the probabilities, attention maps). Rows
    with no visible pair are all 0.
    """
    b, tq, h, _ = q_BxQxHxK.shape
    tk = k_BxTxHxK.shape[1]
    q_pos_Q = query_offset + jnp.arange(tq, dtype=jnp.int32)
    scores_NxQxT = _masked_scores(fold_heads(q_BxQxHxK), fold_heads(k_BxTxHxK),
                                  jnp.broadcast_to(beta_QxH, (b, tq, h)), mask, q_pos_Q,
                                  jnp.arange(tk, dtype=jnp.int32))
    return _softmax_parts([scores_NxQxT])[0].reshape(b, h, tq, tk)


def fold_heads(x_BxTxHxD: Array) -> Array:
    """``[B, T, H, D] -> [B * H, T, D]`` (row ``b * H + h``)."""
    b, t, h, d = x_BxTxHxD.shape
    return jnp.transpose(x_BxTxHxD, (0, 2, 1, 3)).reshape(b * h, t, d)


def _masked_scores(q_NxQxK, k_NxTxK, beta_BxQxH, mask, q_pos, k_pos) -> Array:
    """fp32 ``beta * <q, k>`` ``[N, Q, T]`` (``N = B * H`` folded rows) with hidden entries at
    ``-inf``; positions ``[Q]``/``[T]`` or one row per batch row ``[B, Q]``/``[B, T]``."""
    b, tq, h = beta_BxQxH.shape
    if tq == 1:
        # One query per row (a decoding step): a matrix-vector product per row, which XLA
        # runs on the keys as they lie (the general form made CPU transpose the cache).
        s_NxQxT = jnp.einsum("ntk,nk->nt", k_NxTxK, q_NxQxK[:, 0],
                             preferred_element_type=jnp.float32)[:, None, :]
    else:
        s_NxQxT = jnp.einsum("nqk,ntk->nqt", q_NxQxK, k_NxTxK,
                             preferred_element_type=jnp.float32)
    beta_NxQ = jnp.transpose(beta_BxQxH.astype(jnp.float32), (0, 2, 1)).reshape(b * h, tq)
    s_NxQxT = s_NxQxT * beta_NxQ[..., None]
    rows = lambda pos: jnp.broadcast_to(jnp.asarray(pos, jnp.int32),
                                        (b,) + jnp.shape(pos)[-1:])
    visible_BxQxT = visible_mask(rows(q_pos), rows(k_pos), mask)
    visible_NxQxT = jnp.repeat(visible_BxQxT, h, axis=0)
    return jnp.where(visible_NxQxT, s_NxQxT, -jnp.inf)


def _softmax_parts(scores):
    """Softmax over the last axis of several score blocks taken together; rows with no
    visible key are all 0."""
    m = functools.reduce(jnp.maximum, [jnp.max(s, axis=-1) for s in scores])
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    probs = [jnp.exp(s - m[..., None]) for s in scores]
    total = sum(jnp.sum(p, axis=-1) for p in probs)
    inverse = 1.0 / jnp.where(total > 0, total, 1.0)[..., None]
    return [p * inverse for p in probs]


def retrieve_dense(
    q_BxQxHxK: Array,
    parts,
    *,
    query_positions: Array,
    mask: MaskSpec = MaskSpec(),
    bandwidth: Array | None = None,
) -> Array:
    """Dense retrieval with explicit absolute positions, possibly different for each row.

    The decoding path (:mod:`mmjax.layers.cache`): rows of a batch sit at different
    positions, ring-buffer caches hold keys out of order, and a prefill chunk on a ring
    reads the ring and its own pairs together. Same mask rule as :func:`retrieve`; keys at
    negative positions (empty slots) are hidden.

    Args:
      q_BxQxHxK: queries.
      parts: ``(keys [B * H, T_i, K], values [B * H, T_i, V], key positions [T_i] or
        [B, T_i])`` blocks, one softmax over all of them. Keys and values fold batch and
        heads (row ``b * H + h``), the layout of the caches: a step reads each head's keys in
        order, with no transpose or copy of the cache (about 10x faster on CPU at 4096
        cached tokens than ``[B, T, H, K]``).
      query_positions: int ``[Q]`` or ``[B, Q]``.
      mask: a :class:`MaskSpec`.
      bandwidth: ``None`` (1), ``[H]``, ``[Q, H]`` or ``[B, Q, H]``.
    Returns:
      ``[B, Q, H, V]`` in the dtype of the values; rows with no visible pair are 0.
    """
    b, tq, h, _ = q_BxQxHxK.shape
    beta = jnp.ones((h,), jnp.float32) if bandwidth is None else bandwidth
    beta_BxQxH = jnp.broadcast_to(jnp.asarray(beta, jnp.float32), (b, tq, h))
    q_NxQxK = fold_heads(q_BxQxHxK)
    scores = [_masked_scores(q_NxQxK, k, beta_BxQxH, mask, query_positions, pos)
              for k, _, pos in parts]
    dtype = parts[0][1].dtype
    y_NxQxV = 0.0
    for p_NxQxT, (_, v_NxTxV, _) in zip(_softmax_parts(scores), parts, strict=True):
        if tq == 1:
            y_NxQxV = y_NxQxV + jnp.einsum("nt,ntv->nv", p_NxQxT[:, 0].astype(dtype), v_NxTxV,
                                           preferred_element_type=jnp.float32)[:, None]
        else:
            y_NxQxV = y_NxQxV + jnp.einsum("nqt,ntv->nqv", p_NxQxT.astype(dtype), v_NxTxV,
                                           preferred_element_type=jnp.float32)
    y_BxQxHxV = jnp.transpose(y_NxQxV.reshape(b, h, tq, -1), (0, 2, 1, 3))
    return y_BxQxHxV.astype(dtype)


def retrieve_reference(
    q_BxQxHxK: Array,
    k_BxTxHxK: Array,
    v_BxTxHxV: Array,
    beta_QxH: Array,
    mask: MaskSpec,
    query_offset: Array,
) -> Array:
    """Dense retrieval, O(Q*T) memory: the specification the other paths are tested against."""
    p_BxHxQxT = retrieval_weights(q_BxQxHxK, k_BxTxHxK, beta_QxH, mask, query_offset)
    y_BxQxHxV = jnp.einsum(
        "bhqt,bthv->bqhv",
        p_BxHxQxT.astype(v_BxTxHxV.dtype),
        v_BxTxHxV,
        preferred_element_type=jnp.float32,
    )
    return y_BxQxHxV.astype(v_BxTxHxV.dtype)
