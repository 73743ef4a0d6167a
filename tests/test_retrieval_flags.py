"""The blocked path skips work its caller does not need: the bandwidth gradient when there is
no bandwidth (v1 folds it into the keys), and the mask when every query sees every key (the
persistent memory). Results are unchanged; the traced backward is smaller."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.ops import MaskSpec, retrieve


def _inputs(tq=40, tk=24, b=2, h=3, d=8):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, tq, h, d))
    k = jax.random.normal(keys[1], (b, tk, h, d))
    v = jax.random.normal(keys[2], (b, tk, h, d))
    return q, k, v


def _grad_fn(bandwidth, *, query_offset=0, block_size=8, impl="xla"):
    def loss(q, k, v):
        y = retrieve(k, v, queries=q, bandwidth=bandwidth, mask=MaskSpec(),
                     query_offset=query_offset, impl=impl, block_size=block_size)
        return jnp.sum(jnp.sin(y))
    return jax.grad(loss, argnums=(0, 1, 2))


def _count(fn, args, primitive: str) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count(primitive)


@pytest.mark.parametrize("query_offset", [0, 5, 24])
def test_no_bandwidth_equals_bandwidth_one(query_offset):
    args = _inputs()
    h = args[0].shape[2]
    want = _grad_fn(jnp.ones((h,)), query_offset=query_offset)(*args)
    got = _grad_fn(None, query_offset=query_offset)(*args)
    ref = _grad_fn(None, query_offset=query_offset, impl="reference")(*args)
    for g, w, r in zip(got, want, ref, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_no_bandwidth_backward_has_no_extra_score_product():
    """With a bandwidth the backward needs the raw scores <q, k> for d(bandwidth); they come
    from the tile's own score product, and without a bandwidth nothing is spent on them."""
    args = _inputs()
    with_bw = _count(_grad_fn(jnp.ones((args[0].shape[2],))), args, "dot_general")
    without = _count(_grad_fn(None), args, "dot_general")
    # forward: 2 products per tile; backward: the row term <dy, y>, then per tile scores, dp,
    # dv, dq, dk; no 9th product recomputing <q, k> for d(bandwidth)
    assert with_bw == without == 8
    assert (_count(_grad_fn(jnp.ones((args[0].shape[2],))), args, "reduce_sum")
            > _count(_grad_fn(None), args, "reduce_sum"))


@pytest.mark.parametrize("tk, block", [(24, 8), (20, 8)])
def test_every_key_visible_skips_the_mask(tk, block):
    """Queries placed after every key (a Python int offset >= k_time): no visibility mask is
    built; only padded keys are hidden. Values and gradients equal the masked computation."""
    q, k, v = _inputs(tk=tk)
    static = _grad_fn(None, query_offset=tk, block_size=block)
    traced = jax.jit(lambda q, k, v, off: jax.grad(
        lambda q, k, v: jnp.sum(jnp.sin(retrieve(k, v, queries=q, mask=MaskSpec(),
                                                 query_offset=off, impl="xla",
                                                 block_size=block))),
        argnums=(0, 1, 2))(q, k, v))
    for g, w in zip(static(q, k, v), traced(q, k, v, jnp.int32(tk)), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    masked = _count(jax.grad(lambda q, k, v, off: jnp.sum(retrieve(
        k, v, queries=q, mask=MaskSpec(), query_offset=off, impl="xla", block_size=block)),
        argnums=(0, 1, 2)), (q, k, v, jnp.int32(tk)), " and ")
    assert _count(static, (q, k, v), " and ") < masked


def test_every_key_visible_uses_tall_query_tiles(monkeypatch):
    """By default the all-visible layout runs ALL_VISIBLE_BLOCK_Q queries per tile (fewer,
    larger matmuls), the masked layouts DEFAULT_BLOCK_Q; results equal the reference,
    including a last query tile that is mostly padding."""
    from mmjax.ops import blocked

    seen = []
    original = blocked.retrieve_blocked
    monkeypatch.setattr(blocked, "retrieve_blocked",
                        lambda *a, **kw: seen.append(kw["block_q"]) or original(*a, **kw))
    q, k, v = _inputs(tq=blocked.ALL_VISIBLE_BLOCK_Q + 37, tk=20, b=1, h=2)
    for offset in (20, 0):
        got = retrieve(k, v, queries=q, mask=MaskSpec(), query_offset=offset, impl="xla")
        want = retrieve(k, v, queries=q, mask=MaskSpec(), query_offset=offset,
                        impl="reference")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert seen == [blocked.ALL_VISIBLE_BLOCK_Q, blocked.DEFAULT_BLOCK_Q]
