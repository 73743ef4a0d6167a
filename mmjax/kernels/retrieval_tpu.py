"""TPU kernel (``jax.experimental.pallas.tpu``) for masked kernel-regression retrieval.

Three kernels under one ``jax.custom_vjp`` (forward, dkv, dq; see docs/kernels.md). Inside,
the layout is ``[batch, heads, time, dim]`` (the wrapper transposes from the API layout) so
that every block's last two dims are ``(tile, head_dim)``. Per-row inputs (bandwidth,
log-sum-exp, ``D_t = <dy_t, y_t>``) are lane-dense rows ``[.., 1, time]``, read as columns
with ``expand_dims`` where a kernel needs them so; per-row outputs (log-sum-exp, dbeta) leave
the kernels as columns broadcast over 128 lanes, ``[.., time, 128]``, and XLA keeps lane 0.
No in-kernel transposes.

``window``, ``skip`` and ``query_offset`` are scalar-prefetch operands: the index maps read
them to place each grid step on a visible tile, so changing them does not recompile. The
innermost grid axis walks the tiles ``lo, lo+1, ..`` of the visible range; steps beyond
``hi`` keep the last block index (Pallas skips the copy) and skip the compute. When the
window is known at trace time, that axis only has as many steps as a window can span, so the
window-256 tier costs O(T * 256) in grid steps as well as in work.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mmjax.kernels import common
from mmjax.ops.masks import MaskSpec, kv_tile_range, q_tile_range

Array = jax.Array
NEG = -1e30  # finite "minus infinity": hidden scores never turn into NaN
NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
LANES = common.TPU_LANES


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call (hashable: it is a custom_vjp nondiff argument)."""

    q_time: int
    k_time: int
    blocks: common.BlockSizes  # already fitted to the sequence lengths
    q_pad: int
    k_pad: int
    steps_fwd: int  # grid steps along the inner (visible tile) axis of each kernel
    steps_dkv: int
    steps_dq: int
    interpret: Any
    costs: tuple  # pl.CostEstimate of the forward, dkv and dq kernels


def retrieve_tpu(
    q_BxQxHxK: Array,
    k_BxTxHxK: Array,
    v_BxTxHxV: Array,
    beta_QxH: Array,
    mask: MaskSpec,
    query_offset: Array,
    *,
    block_sizes: common.BlockSizes | None = None,
    interpret: Any = False,
) -> Array:
    """Retrieval with the TPU kernels; same contract as ``mmjax.ops.retrieve_reference``.

    Args:
      q_BxQxHxK, k_BxTxHxK, v_BxTxHxV: queries, keys, values (one dtype: fp32 or bf16).
      beta_QxH: fp32 per-row bandwidth. mask: a MaskSpec. query_offset: int32 scalar.
      block_sizes: tiles (default: ``BlockSizes.for_platform("tpu")`` of this generation).
      interpret: ``False``, ``True`` or ``pltpu.InterpretParams()`` (simulated DMAs).
    Returns:
      ``[batch, q_time, heads, dv]`` in the dtype of the values.
    """
    blocks, q_pad, k_pad = common.prepare(q_BxQxHxK, k_BxTxHxK, v_BxTxHxV, mask, query_offset,
                                          block_sizes, "tpu")
    tq, tk = q_BxQxHxK.shape[1], k_BxTxHxK.shape[1]
    bound = functools.partial(common.kv_steps_bound, mask.window)
    cfg = _Config(
        q_time=tq, k_time=tk, blocks=blocks, q_pad=q_pad, k_pad=k_pad,
        steps_fwd=bound(blocks.block_q, blocks.block_k, k_pad // blocks.block_k),
        steps_dkv=bound(blocks.block_k_dkv, blocks.block_q_dkv, q_pad // blocks.block_q_dkv),
        steps_dq=bound(blocks.block_q_dq, blocks.block_k_dq, k_pad // blocks.block_k_dq),
        interpret=interpret,
        costs=_costs(q_BxQxHxK, k_BxTxHxK, v_BxTxHxV, mask, query_offset, blocks))
    scalars = common.mask_scalars(mask, query_offset)
    beta_QxH = jnp.asarray(beta_QxH, jnp.float32)
    return _retrieve(q_BxQxHxK, k_BxTxHxK, v_BxTxHxV, beta_QxH, scalars, cfg)


def _costs(q, k, v, mask, query_offset, blocks: common.BlockSizes) -> tuple:
    """The three kernels' cost estimates (:func:`mmjax.kernels.common.kernel_cost`)."""
    b, tq, h, dk = q.shape
    tk, dv = k.shape[1], v.shape[-1]
    nbytes = lambda *xs: sum(x.size * x.dtype.itemsize for x in xs)
    cost = functools.partial(common.kernel_cost, mask=mask, query_offset=query_offset,
                             q_time=tq, k_time=tk, batch_heads=b * h, dk=dk, dv=dv)
    fwd_bytes = nbytes(q, k, v) + b * tq * h * dv * v.dtype.itemsize
    return (cost("fwd", block_q=blocks.block_q, block_k=blocks.block_k,
                 operand_bytes=fwd_bytes),
            cost("dkv", block_q=blocks.block_q_dkv, block_k=blocks.block_k_dkv,
                 operand_bytes=2 * fwd_bytes + nbytes(k, v)),
            cost("dq", block_q=blocks.block_q_dq, block_k=blocks.block_k_dq,
                 operand_bytes=2 * fwd_bytes + nbytes(q)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _retrieve(q, k, v, beta, scalars, cfg):
    return _retrieve_fwd(q, k, v, beta, scalars, cfg)[0]


# ----------------------------------------------------------------------------- helpers


def _to_bhtd(x, multiple):
    """``[B, T, H, D]`` -> ``[B, H, T_pad, D]``."""
    return jnp.transpose(common.pad_time(x, 1, multiple), (0, 2, 1, 3))


def _rows(x_BxHxT, multiple):
    """Per-row statistic ``[.., T]`` -> lane-dense row ``[.., 1, T_pad]``."""
    return common.pad_time(x_BxHxT[..., None, :], x_BxHxT.ndim, multiple)


def _column(row_ref):
    """A ``[1, Q]`` row block -> a ``[Q, 1]`` column value."""
    return jnp.expand_dims(row_ref[0], -1)


def _visible_tile(i, block_rows, j, num_tiles, tile_range, scalars_ref):
    """Block index of grid step ``j`` of row tile ``i``, and whether that step computes.

    ``tile_range`` wraps ``kv_tile_range`` (rows = queries) or ``q_tile_range`` (rows = keys).
    """
    mask, offset = common.unpack_scalars(scalars_ref)
    lo, hi = tile_range(i * block_rows, mask, offset)
    index = jnp.maximum(jnp.minimum(jnp.minimum(lo + j, hi), num_tiles - 1), 0)
    return index, lo + j <= hi


def _kv_range(cfg, bq, bk):
    def tile_range(q_start, mask, offset):
        return kv_tile_range(q_start, jnp.minimum(q_start + bq, cfg.q_time), cfg.k_time, bk,
                             mask, offset)
    return tile_range


def _q_range(cfg, bq, bk):
    def tile_range(k_start, mask, offset):
        return q_tile_range(k_start, jnp.minimum(k_start + bk, cfg.k_time), cfg.q_time, bq,
                            mask, offset)
    return tile_range


def _specs(rows_block, cols_block, num_cols, tile_range):
    """BlockSpec factories for a grid (B, H, row tiles, steps) with clamped column tiles."""
    def col_index(i, j, s):
        return _visible_tile(i, rows_block, j, num_cols, tile_range, s)[0]

    row = lambda d: pl.BlockSpec((None, None, rows_block, d),
                                 lambda b, h, i, j, s: (b, h, i, 0))
    col = lambda d: pl.BlockSpec((None, None, cols_block, d),
                                 lambda b, h, i, j, s: (b, h, col_index(i, j, s), 0))
    return row, col, col_index


def _params():
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(scalars_ref, q_ref, k_ref, v_ref, beta_ref, y_ref, lse_ref, m_sc, l_sc,
                acc_sc, *, cfg):
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
    i, j = pl.program_id(2), pl.program_id(3)
    kv, active = _visible_tile(i, bq, j, cfg.k_pad // bk,
                               _kv_range(cfg, bq, bk), scalars_ref)
    mask, offset = common.unpack_scalars(scalars_ref)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(active)
    def _step():
        q_pos_QxC = offset + i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        k_pos_QxC = kv * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        visible_QxC = common.tile_visible(q_pos_QxC, k_pos_QxC, mask, offset + cfg.q_time,
                                          cfg.k_time)
        raw_QxC = jax.lax.dot_general(q_ref[...], k_ref[...], NT_DIMS,
                                      preferred_element_type=jnp.float32)
        s_QxC = jnp.where(visible_QxC, raw_QxC * _column(beta_ref), NEG)
        m_prev_QxL = m_sc[...]
        m_new_QxL = jnp.maximum(m_prev_QxL, jnp.max(s_QxC, axis=1, keepdims=True))
        alpha_QxL = jnp.exp(m_prev_QxL - m_new_QxL)
        p_QxC = jnp.where(visible_QxC, jnp.exp(s_QxC - m_new_QxL[:, :1]), 0.0)
        l_sc[...] = alpha_QxL * l_sc[...] + jnp.sum(p_QxC, axis=1, keepdims=True)
        m_sc[...] = m_new_QxL
        v_CxV = v_ref[...]
        pv_QxV = jnp.dot(p_QxC.astype(v_CxV.dtype), v_CxV, preferred_element_type=jnp.float32)
        acc_sc[...] = alpha_QxL[:, :1] * acc_sc[...] + pv_QxV

    @pl.when(j == cfg.steps_fwd - 1)
    def _finish():
        l_QxL = l_sc[...]
        nonempty_QxL = l_QxL > 0
        l_safe_QxL = jnp.where(nonempty_QxL, l_QxL, 1.0)
        y_ref[...] = (acc_sc[...] / l_safe_QxL[:, :1]).astype(y_ref.dtype)
        lse_QxL = jnp.where(nonempty_QxL, m_sc[...] + jnp.log(l_safe_QxL), 0.0)
        lse_ref[...] = lse_QxL


def _retrieve_fwd(q, k, v, beta, scalars, cfg):
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
    qp, kp, vp = _to_bhtd(q, cfg.q_pad), _to_bhtd(k, cfg.k_pad), _to_bhtd(v, cfg.k_pad)
    beta_Hx1xQ = _rows(beta.T, cfg.q_pad)
    row, col, _ = _specs(bq, bk, cfg.k_pad // bk, _kv_range(cfg, bq, bk))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, h, cfg.q_pad // bq, cfg.steps_fwd),
        in_specs=[row(dk), col(dk), col(dv),
                  pl.BlockSpec((None, 1, bq), lambda b_, h_, i, j, s: (h_, 0, i))],
        out_specs=[row(dv), row(LANES)],
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, dv), jnp.float32)],
    )
    y_BxHxQxV, lse_BxHxQxL = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, h, cfg.q_pad, dv), v.dtype),
                   jax.ShapeDtypeStruct((b, h, cfg.q_pad, LANES), jnp.float32)],
        compiler_params=_params(),
        interpret=cfg.interpret,
        name="mmjax_retrieve_fwd_tpu",
        cost_estimate=cfg.costs[0],
    )(scalars, qp, kp, vp, beta_Hx1xQ)
    y = jnp.transpose(y_BxHxQxV, (0, 2, 1, 3))[:, :cfg.q_time]
    lse_BxHx1xQ = lse_BxHxQxL[:, :, None, :, 0]
    return y, (q, k, v, beta, scalars, y, lse_BxHx1xQ)


# ----------------------------------------------------------------------------- backward


def _dkv_kernel(scalars_ref, q_ref, k_ref, v_ref, dy_ref, beta_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, dk_sc, dv_sc, *, cfg):
    """dk, dv of one key tile, in transposed form ([keys, queries]): row stats stay rows."""
    bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
    kj, j = pl.program_id(2), pl.program_id(3)
    qi, active = _visible_tile(kj, bk, j, cfg.q_pad // bq,
                               _q_range(cfg, bq, bk), scalars_ref)
    mask, offset = common.unpack_scalars(scalars_ref)

    @pl.when(j == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(active)
    def _step():
        q_QxK, k_CxK, v_CxV, dy_QxV = q_ref[...], k_ref[...], v_ref[...], dy_ref[...]
        beta_1xQ, lse_1xQ, delta_1xQ = beta_ref[...], lse_ref[...], delta_ref[...]
        q_pos_CxQ = offset + qi * bq + jax.lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
        k_pos_CxQ = kj * bk + jax.lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
        visible_CxQ = common.tile_visible(q_pos_CxQ, k_pos_CxQ, mask, offset + cfg.q_time,
                                          cfg.k_time)
        raw_CxQ = jax.lax.dot_general(k_CxK, q_QxK, NT_DIMS, preferred_element_type=jnp.float32)
        p_CxQ = jnp.where(visible_CxQ, jnp.exp(raw_CxQ * beta_1xQ - lse_1xQ), 0.0)
        dv_sc[...] += jnp.dot(p_CxQ.astype(dy_QxV.dtype), dy_QxV,
                              preferred_element_type=jnp.float32)
        dp_CxQ = jax.lax.dot_general(v_CxV, dy_QxV, NT_DIMS, preferred_element_type=jnp.float32)
        draw_CxQ = p_CxQ * (dp_CxQ - delta_1xQ) * beta_1xQ  # w.r.t. the raw scores
        dk_sc[...] += jnp.dot(draw_CxQ.astype(q_QxK.dtype), q_QxK,
                              preferred_element_type=jnp.float32)

    @pl.when(j == cfg.steps_dkv - 1)
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(scalars_ref, q_ref, k_ref, v_ref, dy_ref, beta_ref, lse_ref, delta_ref,
               dq_ref, dbeta_ref, dq_sc, dbeta_sc, *, cfg):
    """dq and the bandwidth gradient of one query tile."""
    bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
    i, j = pl.program_id(2), pl.program_id(3)
    kv, active = _visible_tile(i, bq, j, cfg.k_pad // bk,
                               _kv_range(cfg, bq, bk), scalars_ref)
    mask, offset = common.unpack_scalars(scalars_ref)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
        dbeta_sc[...] = jnp.zeros(dbeta_sc.shape, jnp.float32)

    @pl.when(active)
    def _step():
        q_QxK, k_CxK, v_CxV, dy_QxV = q_ref[...], k_ref[...], v_ref[...], dy_ref[...]
        beta_Qx1, lse_Qx1, delta_Qx1 = _column(beta_ref), _column(lse_ref), _column(delta_ref)
        q_pos_QxC = offset + i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        k_pos_QxC = kv * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        visible_QxC = common.tile_visible(q_pos_QxC, k_pos_QxC, mask, offset + cfg.q_time,
                                          cfg.k_time)
        raw_QxC = jax.lax.dot_general(q_QxK, k_CxK, NT_DIMS, preferred_element_type=jnp.float32)
        p_QxC = jnp.where(visible_QxC, jnp.exp(raw_QxC * beta_Qx1 - lse_Qx1), 0.0)
        dp_QxC = jax.lax.dot_general(dy_QxV, v_CxV, NT_DIMS, preferred_element_type=jnp.float32)
        ds_QxC = p_QxC * (dp_QxC - delta_Qx1)  # w.r.t. the scaled scores
        dbeta_sc[...] += jnp.sum(ds_QxC * raw_QxC, axis=1, keepdims=True)
        dq_sc[...] += jnp.dot((ds_QxC * beta_Qx1).astype(k_CxK.dtype), k_CxK,
                              preferred_element_type=jnp.float32)

    @pl.when(j == cfg.steps_dq - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)
        dbeta_ref[...] = dbeta_sc[...]


def _retrieve_bwd(cfg, residuals, dy):
    q, k, v, beta, scalars, y, lse_BxHx1xQ = residuals
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    qp, kp, vp = _to_bhtd(q, cfg.q_pad), _to_bhtd(k, cfg.k_pad), _to_bhtd(v, cfg.k_pad)
    dyp = _to_bhtd(dy, cfg.q_pad)
    beta_Hx1xQ = _rows(beta.T, cfg.q_pad)
    # D_t = <dy_t, y_t>, the row term of the softmax Jacobian.
    delta_BxHx1xQ = _rows(
        jnp.einsum("bqhv,bqhv->bhq", dy.astype(jnp.float32), y.astype(jnp.float32)), cfg.q_pad)
    operands = (scalars, qp, kp, vp, dyp, beta_Hx1xQ, lse_BxHx1xQ, delta_BxHx1xQ)

    # dk, dv: rows are key tiles, the inner axis walks the query tiles that see them.
    bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
    nq = cfg.q_pad // bq
    row, col, q_index = _specs(bk, bq, nq, _q_range(cfg, bq, bk))
    stat = pl.BlockSpec((None, None, 1, bq),
                        lambda b_, h_, kj, j, s: (b_, h_, 0, q_index(kj, j, s)))
    beta_spec = pl.BlockSpec((None, 1, bq),
                             lambda b_, h_, kj, j, s: (h_, 0, q_index(kj, j, s)))
    dk_pad, dv_pad = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, h, cfg.k_pad // bk, cfg.steps_dkv),
            in_specs=[col(dk), row(dk), row(dv), col(dv), beta_spec, stat, stat],
            out_specs=[row(dk), row(dv)],
            scratch_shapes=[pltpu.VMEM((bk, dk), jnp.float32),
                            pltpu.VMEM((bk, dv), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype),
                   jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        compiler_params=_params(),
        interpret=cfg.interpret,
        name="mmjax_retrieve_dkv_tpu",
        cost_estimate=cfg.costs[1],
    )(*operands)

    # dq, dbeta: rows are query tiles, the inner axis walks the visible key tiles.
    bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
    row, col, _ = _specs(bq, bk, cfg.k_pad // bk, _kv_range(cfg, bq, bk))
    stat = pl.BlockSpec((None, None, 1, bq), lambda b_, h_, i, j, s: (b_, h_, 0, i))
    beta_spec = pl.BlockSpec((None, 1, bq), lambda b_, h_, i, j, s: (h_, 0, i))
    dq_pad, dbeta_BxHxQxL = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, h, cfg.q_pad // bq, cfg.steps_dq),
            in_specs=[row(dk), col(dk), col(dv), row(dv), beta_spec, stat, stat],
            out_specs=[row(dk), row(LANES)],
            scratch_shapes=[pltpu.VMEM((bq, dk), jnp.float32),
                            pltpu.VMEM((bq, LANES), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, cfg.q_pad, LANES), jnp.float32)],
        compiler_params=_params(),
        interpret=cfg.interpret,
        name="mmjax_retrieve_dq_tpu",
        cost_estimate=cfg.costs[2],
    )(*operands)
    back = lambda x, t: jnp.transpose(x, (0, 2, 1, 3))[:, :t]
    dbeta_QxH = jnp.sum(dbeta_BxHxQxL[:, :, :cfg.q_time, 0], axis=0).T
    return (back(dq_pad, cfg.q_time), back(dk_pad, cfg.k_time), back(dv_pad, cfg.k_time),
            dbeta_QxH.astype(beta.dtype), None)


_retrieve.defvjp(_retrieve_fwd, _retrieve_bwd)
