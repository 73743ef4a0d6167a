"""GPU kernel (Pallas, Triton lowering) for masked kernel-regression retrieval.

Three kernels under one ``jax.custom_vjp``, all on the API layout ``[batch, time, heads, dim]``
(Triton addresses the strided tiles directly, no transposes):

* forward: one program per (query tile, batch, head); it loops over exactly the key tiles
  that the mask leaves visible to its query tile (``kv_tile_range``), keeping the running max,
  sum and output in fp32 (online softmax), and writes the output and the row log-sum-exp.
* dkv: one program per key tile; it loops over the query tiles that see the tile
  (``q_tile_range``) and accumulates dk and dv.
* dq: one program per query tile; it loops over the visible key tiles and accumulates dq and
  the bandwidth gradient ``dbeta_t = sum_i dS_ti <q_t, k_i>``.

``window``, ``skip`` and ``query_offset`` arrive in a small int32 array read inside the
kernels, so changing them does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mmjax.kernels import common
from mmjax.ops.masks import MaskSpec, kv_tile_range, q_tile_range

Array = jax.Array
NEG = -1e30  # finite "minus infinity": hidden scores never turn into NaN
NT_DIMS = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call (hashable: it is a custom_vjp nondiff argument)."""

    q_time: int
    k_time: int
    blocks: common.BlockSizes  # already fitted to the sequence lengths
    q_pad: int  # padded lengths: multiples of every query / key block
    k_pad: int
    interpret: Any


def retrieve_gpu(
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
    """Retrieval with the GPU kernels; same contract as ``mmjax.ops.retrieve_reference``.

    Args:
      q_BxQxHxK, k_BxTxHxK, v_BxTxHxV: queries, keys, values (one dtype: fp32 or bf16).
      beta_QxH: fp32 per-row bandwidth. mask: a MaskSpec. query_offset: int32 scalar.
      block_sizes: tiles (default ``BlockSizes.for_platform("gpu")``).
      interpret: run the kernels in Pallas interpret mode (any platform).
    Returns:
      ``[batch, q_time, heads, dv]`` in the dtype of the values.
    """
    blocks, q_pad, k_pad = common.prepare(q_BxQxHxK, k_BxTxHxK, v_BxTxHxV, mask, query_offset,
                                          block_sizes, "gpu")
    tq, tk = q_BxQxHxK.shape[1], k_BxTxHxK.shape[1]
    cfg = _Config(q_time=tq, k_time=tk, blocks=blocks, q_pad=q_pad, k_pad=k_pad,
                  interpret=interpret)
    scalars = common.mask_scalars(mask, query_offset)
    beta_QxH = jnp.asarray(beta_QxH, jnp.float32)
    return _retrieve(q_BxQxHxK, k_BxTxHxK, v_BxTxHxV, beta_QxH, scalars, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _retrieve(q, k, v, beta, scalars, cfg):
    return _retrieve_fwd(q, k, v, beta, scalars, cfg)[0]


def _params(cfg):
    return pltriton.CompilerParams(num_warps=cfg.blocks.num_warps,
                                   num_stages=cfg.blocks.num_stages)


def _padded_inputs(q, k, v, beta, cfg):
    qp = common.pad_time(q, 1, cfg.q_pad)
    kp, vp = common.pad_time(k, 1, cfg.k_pad), common.pad_time(v, 1, cfg.k_pad)
    beta_HxQ = common.pad_time(beta.T, 1, cfg.q_pad)
    return qp, kp, vp, beta_HxQ


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(scalars_ref, q_ref, k_ref, v_ref, beta_ref, y_ref, lse_ref, *, cfg):
    mask, offset = common.unpack_scalars(scalars_ref)
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
    q_start = pl.program_id(0) * bq
    lo, hi = kv_tile_range(q_start, jnp.minimum(q_start + bq, cfg.q_time), cfg.k_time, bk,
                           mask, offset)
    q_QxK = q_ref[...]
    beta_Qx1 = beta_ref[...][:, None]
    q_pos_Qx1 = (offset + q_start + jnp.arange(bq, dtype=jnp.int32))[:, None]

    def body(j, carry):
        m_Q, l_Q, acc_QxV = carry
        k_CxK = k_ref[pl.ds(j * bk, bk), :]
        v_CxV = v_ref[pl.ds(j * bk, bk), :]
        k_pos_1xC = (j * bk + jnp.arange(bk, dtype=jnp.int32))[None, :]
        visible_QxC = common.tile_visible(q_pos_Qx1, k_pos_1xC, mask, offset + cfg.q_time,
                                          cfg.k_time)
        raw_QxC = jax.lax.dot_general(q_QxK, k_CxK, NT_DIMS, preferred_element_type=jnp.float32)
        s_QxC = jnp.where(visible_QxC, raw_QxC * beta_Qx1, NEG)
        m_new = jnp.maximum(m_Q, jnp.max(s_QxC, axis=1))
        alpha_Q = jnp.exp(m_Q - m_new)
        p_QxC = jnp.where(visible_QxC, jnp.exp(s_QxC - m_new[:, None]), 0.0)
        l_new = alpha_Q * l_Q + jnp.sum(p_QxC, axis=1)
        pv_QxV = jnp.dot(p_QxC.astype(v_CxV.dtype), v_CxV, preferred_element_type=jnp.float32)
        return m_new, l_new, alpha_Q[:, None] * acc_QxV + pv_QxV

    init = (jnp.full((bq,), NEG, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, v_ref.shape[-1]), jnp.float32))
    m_Q, l_Q, acc_QxV = jax.lax.fori_loop(lo, hi + 1, body, init)
    nonempty_Q = l_Q > 0
    l_safe = jnp.where(nonempty_Q, l_Q, 1.0)
    y_ref[...] = (acc_QxV / l_safe[:, None]).astype(y_ref.dtype)
    # Empty rows: lse 0 (any finite value works, the backward masks them out).
    lse_ref[...] = jnp.where(nonempty_Q, m_Q + jnp.log(l_safe), 0.0)


def _retrieve_fwd(q, k, v, beta, scalars, cfg):
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    bq = cfg.blocks.block_q
    qp, kp, vp, beta_HxQ = _padded_inputs(q, k, v, beta, cfg)
    y, lse_BxHxQ = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(cfg.q_pad // bq, b, h),
        in_specs=[
            pl.BlockSpec((4,), lambda i, bi, hi: (0,)),
            pl.BlockSpec((None, bq, None, dk), lambda i, bi, hi: (bi, i, hi, 0)),
            pl.BlockSpec((None, cfg.k_pad, None, dk), lambda i, bi, hi: (bi, 0, hi, 0)),
            pl.BlockSpec((None, cfg.k_pad, None, dv), lambda i, bi, hi: (bi, 0, hi, 0)),
            pl.BlockSpec((None, bq), lambda i, bi, hi: (hi, i)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, dv), lambda i, bi, hi: (bi, i, hi, 0)),
            pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, cfg.q_pad, h, dv), v.dtype),
                   jax.ShapeDtypeStruct((b, h, cfg.q_pad), jnp.float32)],
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        name="mmjax_retrieve_fwd_gpu",
    )(scalars, qp, kp, vp, beta_HxQ)
    y = y[:, :cfg.q_time]
    return y, (q, k, v, beta, scalars, y, lse_BxHxQ)


# ----------------------------------------------------------------------------- backward


def _dkv_kernel(scalars_ref, q_ref, k_ref, v_ref, dy_ref, beta_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, cfg):
    """dk, dv of one key tile, in transposed form ([keys, queries]) throughout."""
    mask, offset = common.unpack_scalars(scalars_ref)
    bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
    k_start = pl.program_id(0) * bk
    lo, hi = q_tile_range(k_start, jnp.minimum(k_start + bk, cfg.k_time), cfg.q_time, bq,
                          mask, offset)
    k_CxK, v_CxV = k_ref[...], v_ref[...]
    k_pos_Cx1 = (k_start + jnp.arange(bk, dtype=jnp.int32))[:, None]

    def body(i, carry):
        dk_CxK, dv_CxV = carry
        rows = pl.ds(i * bq, bq)
        q_QxK, dy_QxV = q_ref[rows, :], dy_ref[rows, :]
        beta_1xQ = beta_ref[rows][None, :]
        lse_1xQ, delta_1xQ = lse_ref[rows][None, :], delta_ref[rows][None, :]
        q_pos_1xQ = (offset + i * bq + jnp.arange(bq, dtype=jnp.int32))[None, :]
        visible_CxQ = common.tile_visible(q_pos_1xQ, k_pos_Cx1, mask, offset + cfg.q_time,
                                          cfg.k_time)
        raw_CxQ = jax.lax.dot_general(k_CxK, q_QxK, NT_DIMS, preferred_element_type=jnp.float32)
        p_CxQ = jnp.where(visible_CxQ, jnp.exp(raw_CxQ * beta_1xQ - lse_1xQ), 0.0)
        dv_CxV = dv_CxV + jnp.dot(p_CxQ.astype(dy_QxV.dtype), dy_QxV,
                                  preferred_element_type=jnp.float32)
        dp_CxQ = jax.lax.dot_general(v_CxV, dy_QxV, NT_DIMS, preferred_element_type=jnp.float32)
        # gradient w.r.t. the raw scores <q_t, k_i>: dS_ti * beta_t
        draw_CxQ = p_CxQ * (dp_CxQ - delta_1xQ) * beta_1xQ
        dk_CxK = dk_CxK + jnp.dot(draw_CxQ.astype(q_QxK.dtype), q_QxK,
                                  preferred_element_type=jnp.float32)
        return dk_CxK, dv_CxV

    init = (jnp.zeros(k_CxK.shape, jnp.float32), jnp.zeros(v_CxV.shape, jnp.float32))
    dk_CxK, dv_CxV = jax.lax.fori_loop(lo, hi + 1, body, init)
    dk_ref[...] = dk_CxK.astype(dk_ref.dtype)
    dv_ref[...] = dv_CxV.astype(dv_ref.dtype)


def _dq_kernel(scalars_ref, q_ref, k_ref, v_ref, dy_ref, beta_ref, lse_ref, delta_ref,
               dq_ref, dbeta_ref, *, cfg):
    """dq and dbeta of one query tile."""
    mask, offset = common.unpack_scalars(scalars_ref)
    bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
    q_start = pl.program_id(0) * bq
    lo, hi = kv_tile_range(q_start, jnp.minimum(q_start + bq, cfg.q_time), cfg.k_time, bk,
                           mask, offset)
    q_QxK, dy_QxV = q_ref[...], dy_ref[...]
    beta_Qx1 = beta_ref[...][:, None]
    lse_Qx1, delta_Qx1 = lse_ref[...][:, None], delta_ref[...][:, None]
    q_pos_Qx1 = (offset + q_start + jnp.arange(bq, dtype=jnp.int32))[:, None]

    def body(j, carry):
        dq_QxK, dbeta_Q = carry
        k_CxK = k_ref[pl.ds(j * bk, bk), :]
        v_CxV = v_ref[pl.ds(j * bk, bk), :]
        k_pos_1xC = (j * bk + jnp.arange(bk, dtype=jnp.int32))[None, :]
        visible_QxC = common.tile_visible(q_pos_Qx1, k_pos_1xC, mask, offset + cfg.q_time,
                                          cfg.k_time)
        raw_QxC = jax.lax.dot_general(q_QxK, k_CxK, NT_DIMS, preferred_element_type=jnp.float32)
        p_QxC = jnp.where(visible_QxC, jnp.exp(raw_QxC * beta_Qx1 - lse_Qx1), 0.0)
        dp_QxC = jax.lax.dot_general(dy_QxV, v_CxV, NT_DIMS, preferred_element_type=jnp.float32)
        ds_QxC = p_QxC * (dp_QxC - delta_Qx1)  # gradient w.r.t. the scaled scores
        dbeta_Q = dbeta_Q + jnp.sum(ds_QxC * raw_QxC, axis=1)
        dq_QxK = dq_QxK + jnp.dot((ds_QxC * beta_Qx1).astype(k_CxK.dtype), k_CxK,
                                  preferred_element_type=jnp.float32)
        return dq_QxK, dbeta_Q

    init = (jnp.zeros(q_QxK.shape, jnp.float32), jnp.zeros((bq,), jnp.float32))
    dq_QxK, dbeta_Q = jax.lax.fori_loop(lo, hi + 1, body, init)
    dq_ref[...] = dq_QxK.astype(dq_ref.dtype)
    dbeta_ref[...] = dbeta_Q


def _retrieve_bwd(cfg, residuals, dy):
    q, k, v, beta, scalars, y, lse_BxHxQ = residuals
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    qp, kp, vp, beta_HxQ = _padded_inputs(q, k, v, beta, cfg)
    dyp = common.pad_time(dy, 1, cfg.q_pad)
    # D_t = <dy_t, y_t>, the row term of the softmax Jacobian.
    delta_BxHxQ = jnp.einsum("bqhv,bqhv->bhq", dy.astype(jnp.float32), y.astype(jnp.float32))
    delta_BxHxQ = common.pad_time(delta_BxHxQ, 2, cfg.q_pad)
    operands = (scalars, qp, kp, vp, dyp, beta_HxQ, lse_BxHxQ, delta_BxHxQ)

    bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
    full_q = lambda d: pl.BlockSpec((None, cfg.q_pad, None, d), lambda j, bi, hi: (bi, 0, hi, 0))
    tile_k = lambda d: pl.BlockSpec((None, bk, None, d), lambda j, bi, hi: (bi, j, hi, 0))
    row_full = pl.BlockSpec((None, None, cfg.q_pad), lambda j, bi, hi: (bi, hi, 0))
    dk_pad, dv_pad = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(cfg.k_pad // bk, b, h),
        in_specs=[pl.BlockSpec((4,), lambda j, bi, hi: (0,)), full_q(dk), tile_k(dk),
                  tile_k(dv), full_q(dv),
                  pl.BlockSpec((None, cfg.q_pad), lambda j, bi, hi: (hi, 0)),
                  row_full, row_full],
        out_specs=[tile_k(dk), tile_k(dv)],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype),
                   jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        name="mmjax_retrieve_dkv_gpu",
    )(*operands)

    bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
    tile_q = lambda d: pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0))
    full_k = lambda d: pl.BlockSpec((None, cfg.k_pad, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
    row_tile = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
    dq_pad, dbeta_BxHxQ = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(cfg.q_pad // bq, b, h),
        in_specs=[pl.BlockSpec((4,), lambda i, bi, hi: (0,)), tile_q(dk), full_k(dk),
                  full_k(dv), tile_q(dv), pl.BlockSpec((None, bq), lambda i, bi, hi: (hi, i)),
                  row_tile, row_tile],
        out_specs=[tile_q(dk), row_tile],
        out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, cfg.q_pad), jnp.float32)],
        compiler_params=_params(cfg),
        interpret=cfg.interpret,
        name="mmjax_retrieve_dq_gpu",
    )(*operands)
    dbeta_QxH = jnp.sum(dbeta_BxHxQ, axis=0).T[:cfg.q_time]
    return (dq_pad[:, :cfg.q_time], dk_pad[:, :cfg.k_time], dv_pad[:, :cfg.k_time],
            dbeta_QxH.astype(beta.dtype), None)


_retrieve.defvjp(_retrieve_fwd, _retrieve_bwd)
