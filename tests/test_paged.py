"""mmjax.ops.paged: exact when the kept pages cover every visible page (values and
gradients), the top pages by the key bound otherwise (against a numpy formula), a needle
found with one page, chunking that changes nothing, bad input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.ops import MaskSpec, l2_normalize, retrieve
from mmjax.ops.paged import (
    page_bounds,
    page_scores,
    quantize_pages,
    retrieve_from_pages,
    retrieve_paged,
    to_pages,
    top_indices,
)

MASKS = [MaskSpec(), MaskSpec(skip=5), MaskSpec(window=7), MaskSpec(window=9, skip=3)]


def inputs(seed, b=2, t=50, h=3, k=8):
    ks = jax.random.split(jax.random.key(seed), 4)
    keys = l2_normalize(jax.random.normal(ks[0], (b, t, h, k)))
    values = jax.random.normal(ks[1], (b, t, h, k))
    queries = jax.random.normal(ks[2], (b, t, h, k))
    beta = jax.random.uniform(ks[3], (t, h), minval=0.5, maxval=2.0)
    return queries, keys, values, beta


def numpy_paged(q, k, v, beta, mask, page_size, top):
    """Each query: the page of its newest visible pair, the ``top - 1`` best other pages by
    their bound, then the softmax over their visible pairs, written out loop by loop."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, _ = q.shape
    out = np.zeros(q.shape[:3] + v.shape[-1:])
    for bi, hi, pos in itertools.product(range(b), range(h), range(t)):
        first = 0 if mask.window is None else max(0, pos - mask.window)
        last = min(pos - 1 - mask.skip, t - 1)
        if last < first:
            continue
        newest = last // page_size
        bound = {}
        for a in range(first // page_size, newest):  # complete pages compete
            rows, query = k[bi, a * page_size:(a + 1) * page_size, hi], q[bi, pos, hi]
            mid = (rows.min(0) + rows.max(0)) / 2
            radius = np.linalg.norm(rows - mid, axis=1).max()
            bound[a] = query @ mid + np.linalg.norm(query) * radius
        kept = [newest] + sorted(bound, key=lambda a: -bound[a])[:top - 1]
        idx = np.array([i for a in kept for i in range(a * page_size, (a + 1) * page_size)
                        if first <= i <= last])
        s = beta[pos, hi] * (k[bi, idx, hi] @ q[bi, pos, hi])
        w = np.exp(s - s.max())
        out[bi, pos, hi] = (w / w.sum()) @ v[bi, idx, hi]
    return out


@pytest.mark.parametrize("mask,page_size", [(m, 7) for m in MASKS]
                         + [(MaskSpec(), 1), (MaskSpec(skip=5), 64)])
def test_all_pages_kept_equals_exact_retrieval_values_and_gradients(mask, page_size):
    q, k, v, beta = inputs(0)
    pages = -(-k.shape[1] // page_size)
    exact = lambda *a: retrieve(a[1], a[2], queries=a[0], bandwidth=a[3], mask=mask,
                                impl="reference")
    paged = lambda *a: retrieve_paged(a[1], a[2], queries=a[0], bandwidth=a[3], mask=mask,
                                      page_size=page_size, top_pages=pages, query_chunk=16)
    np.testing.assert_allclose(paged(q, k, v, beta), exact(q, k, v, beta), atol=1e-5)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    grads = jax.grad(loss(paged), argnums=(0, 1, 2, 3))(q, k, v, beta)
    expected = jax.grad(loss(exact), argnums=(0, 1, 2, 3))(q, k, v, beta)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask,page_size,top", [(MaskSpec(), 4, 2), (MaskSpec(skip=5), 7, 1),
                                                (MaskSpec(window=20, skip=2), 5, 2),
                                                (MaskSpec(), 3, 5)])
def test_kept_pages_are_the_best_by_the_key_bound(mask, page_size, top):
    q, k, v, beta = inputs(1)
    got = retrieve_paged(k, v, queries=q, bandwidth=beta, mask=mask, page_size=page_size,
                         top_pages=top)
    want = numpy_paged(q, k, v, np.asarray(beta), mask, page_size, top)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # fewer pages than the query sees: not the exact result
    exact = retrieve(k, v, queries=q, bandwidth=beta, mask=mask, impl="reference")
    assert float(jnp.max(jnp.abs(got - exact))) > 1e-2


@pytest.mark.parametrize("size,k", [(1003, 15), (16385, 15), (64, 3), (40, 1)])
def test_two_stage_top_indices_are_top_k_s(size, k):
    """Top-k over the maxima of groups, then over those groups: the same indices in the same
    order as one top-k, with masked (-inf) scores and rows of fewer than k finite ones."""
    rng = np.random.default_rng(size)
    scores = rng.normal(size=(2, 3, size)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.5] = -np.inf
    scores[1, 2, :] = -np.inf
    scores[1, 2, [5, size - 1]] = [1.0, 2.0]  # two finite scores, one of them in no group
    got = np.asarray(top_indices(jnp.asarray(scores), k))
    want = np.asarray(jax.lax.top_k(jnp.asarray(scores), k)[1])
    finite = np.isfinite(np.take_along_axis(scores, want, -1))
    np.testing.assert_array_equal(np.where(finite, got, -1), np.where(finite, want, -1))
    assert all(len(set(row)) == k for row in got.reshape(-1, k))  # no page twice


def test_one_page_finds_a_needle_among_similar_keys():
    """Filler keys near one direction; the needle's key is the query's direction."""
    b, t, h, d = 1, 4096, 1, 16
    rng = np.random.default_rng(0)
    keys = np.zeros((b, t, h, d), np.float32)
    keys[..., 0] = 1.0
    keys[..., 2:] = 0.05 * rng.normal(size=(b, t, h, d - 2))
    keys[0, 777, 0] = np.eye(d)[1]
    values = rng.normal(size=(b, t, h, d)).astype(np.float32)
    query = np.zeros((b, 1, h, d), np.float32)
    query[..., 1] = 1.0
    keys = l2_normalize(jnp.asarray(keys))
    y = retrieve_paged(keys, jnp.asarray(values), queries=jnp.asarray(query),
                       bandwidth=jnp.full((1, h), 30.0), query_offset=t, page_size=64,
                       top_pages=2)  # the newest page, and the best other one
    np.testing.assert_allclose(y[0, 0, 0], values[0, 777, 0], atol=1e-5)


def test_chunks_of_queries_change_nothing():
    """The pages are chosen per query: one query at a time (decoding) is a prefill chunk."""
    q, k, v, beta = inputs(2, t=37)
    run = lambda chunk: retrieve_paged(k, v, queries=q, bandwidth=beta, mask=MaskSpec(skip=2),
                                       page_size=4, top_pages=2, query_chunk=chunk)
    np.testing.assert_array_equal(run(1), run(7))
    np.testing.assert_array_equal(run(1), run(64))


def test_traced_skip_and_offset_under_jit():
    q, k, v, beta = inputs(3, t=24)

    @jax.jit
    def run(skip):
        return retrieve_paged(k, v, queries=q[:, :8], bandwidth=beta[:8], query_offset=16,
                              mask=MaskSpec(skip=skip), page_size=4, top_pages=6)

    exact = retrieve(k, v, queries=q[:, :8], bandwidth=beta[:8], query_offset=16,
                     mask=MaskSpec(skip=3), impl="reference")
    np.testing.assert_allclose(run(jnp.int32(3)), exact, atol=1e-5)


def test_rows_that_see_nothing_are_zero_with_finite_gradients():
    q, k, v, beta = inputs(4, t=12)
    f = lambda k: retrieve_paged(k, v, queries=q, bandwidth=beta, mask=MaskSpec(skip=4),
                                 page_size=4, top_pages=1)
    y = f(k)
    np.testing.assert_array_equal(y[:, :5], 0.0)
    assert bool(jnp.all(jnp.isfinite(jax.grad(lambda k: jnp.sum(f(k)))(k))))


def test_page_bounds_bound_every_score_of_their_page():
    """The ball about the midpoint of a page's box bounds every score of its page from
    above; on unit keys it is mostly tighter than the box itself; unwritten slots are left
    out."""
    q, k, _, _ = inputs(5, t=40)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)  # unit keys, as a v2 memory's
    pages = to_pages(k, 8)  # [B * H, 5, 8, K]
    q_n = np.asarray(q).transpose(0, 2, 1, 3).reshape(pages.shape[0], 40, -1)
    best = np.einsum("nqk,nauk->nqau", q_n, np.asarray(pages)).max(-1)
    mid, radius = np.split(np.asarray(page_bounds(pages)), [8], axis=-1)
    np.testing.assert_allclose(mid, (np.asarray(pages).max(2) + np.asarray(pages).min(2)) / 2)
    ball = (np.einsum("nqk,nak->nqa", q_n, mid)
            + np.linalg.norm(q_n, axis=-1)[..., None] * radius[..., 0][:, None])
    assert np.all(ball >= best - 1e-5)
    np.testing.assert_allclose(page_scores(jnp.asarray(q_n), page_bounds(pages)), ball,
                               rtol=1e-5, atol=1e-5)
    box = (np.einsum("nqk,nak->nqa", np.maximum(q_n, 0), np.asarray(pages).max(2))
           + np.einsum("nqk,nak->nqa", np.minimum(q_n, 0), np.asarray(pages).min(2)))
    assert np.mean(ball < box) > 0.5  # on most (query, page) pairs
    written = jnp.arange(8) < jnp.array([[8], [8], [3], [1], [0]])  # [A, U]
    garbled = jnp.where(written[None, :, :, None], pages, 100.0)  # unwritten slots: junk
    partial = np.asarray(page_bounds(garbled, written))
    np.testing.assert_allclose(partial[:, 2], page_bounds(pages[:, 2:3, :3])[:, 0], rtol=1e-6)
    assert np.all(partial[:, 3, -1] == 0) and np.all(partial[:, 4, -1] == -np.inf)


def test_int8_pages_round_each_value_within_half_its_page_scale():
    _, _, v, _ = inputs(7, t=40)
    pages = to_pages(v * jnp.arange(1, 41)[None, :, None, None], 8)  # pages of growing size
    q, scale = quantize_pages(pages)
    assert q.dtype == jnp.int8 and scale.shape == pages.shape[:2]
    np.testing.assert_allclose(scale, np.abs(np.asarray(pages)).max(axis=(2, 3)) / 127,
                               rtol=1e-6)
    error = np.abs(np.asarray(q, np.float32) * np.asarray(scale)[..., None, None] - pages)
    assert np.all(error <= 0.5 * np.asarray(scale)[..., None, None] * (1 + 1e-5))
    assert int(jnp.max(jnp.abs(q.astype(jnp.int32)))) == 127
    zero_q, zero_scale = quantize_pages(jnp.zeros((1, 2, 4, 3)))
    assert not jnp.any(zero_q) and not jnp.any(zero_scale)


def test_scaled_int8_pages_retrieve_what_their_rounded_values_retrieve():
    """int8 pages with scales give the retrieval of the float pages they stand for: the
    scales multiply the kept pages' scores and weights, and nothing is dequantized first."""
    q, k, v, beta = inputs(8, t=32)
    (kq, ks), (vq, vs) = quantize_pages(to_pages(k, 4)), quantize_pages(to_pages(v, 4))
    rounded = lambda x, s: x.astype(jnp.float32) * s[..., None, None]
    kr, vr = rounded(kq, ks), rounded(vq, vs)
    args = dict(key_count=32, query_positions=jnp.arange(32), mask=MaskSpec(skip=2),
                bandwidth=beta, top_pages=3)
    want = retrieve_from_pages(q, kr, vr, page_bounds(kr), **args)
    got = retrieve_from_pages(q, kq, vq, page_bounds(kr), scales=(ks, vs), **args)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(page_size=0, top_pages=1), "page_size must be an integer >= 1, got 0"),
    (dict(page_size=4, top_pages=2.0), "top_pages must be an integer >= 1, got 2.0"),
    (dict(page_size=4, top_pages=1, query_chunk=0), "query_chunk must be an integer >= 1"),
])
def test_bad_settings_raise_one_line_errors(kwargs, message):
    _, k, v, _ = inputs(6, t=8)
    with pytest.raises(ValueError, match=message):
        retrieve_paged(k, v, **kwargs)


def test_an_unknown_impl_raises():
    keys = jnp.zeros((2, 3, 4, 8))
    with pytest.raises(ValueError, match="impl must be 'xla', 'pallas_tpu' or 'auto', got 'cuda'"):
        retrieve_from_pages(jnp.zeros((1, 1, 2, 8)), keys, keys, page_bounds(keys), key_count=8,
                            query_positions=jnp.array([9]), mask=MaskSpec(),
                            bandwidth=jnp.ones((1, 2)), top_pages=2, impl="cuda")


def test_bad_rank_raises():
    _, k, v, _ = inputs(6, t=8)
    with pytest.raises(ValueError, match="keys must have rank 4"):
        retrieve_paged(k[0], v, page_size=4, top_pages=1)


@pytest.mark.parametrize("page_dtype,lane_rows,mask,top", [
    ("float32", False, MaskSpec(), 3),
    ("bfloat16", True, MaskSpec(window=30, skip=5), 2),
    ("int8", True, MaskSpec(skip=3), 8),
])
def test_the_tpu_kernel_reads_the_kept_pages_as_the_gathering_path_does(page_dtype, lane_rows,
                                                                         mask, top):
    """mmjax.kernels.paged_tpu in interpret mode against the XLA gather path: pages as
    ``[U, K]`` or in rows of 128 lanes, 16-bit and int8 pages, pages not kept, queries
    that see nothing (bfloat16 against the gathering path on the same values in fp32: that
    path rounds its weights to the values' dtype, the kernel does not)."""
    b, h, num_pages, page, d = 2, 2, 6, 16, 16
    ks = jax.random.split(jax.random.key(9), 4)
    keys = l2_normalize(jax.random.normal(ks[0], (b * h, num_pages, page, d)))
    values = jax.random.normal(ks[1], (b * h, num_pages, page, d))
    scales = None
    if page_dtype == "int8":
        (keys, k_scale), (values, v_scale) = quantize_pages(keys), quantize_pages(values)
        scales = (k_scale, v_scale)
        bounds = page_bounds(keys.astype(jnp.float32) * k_scale[..., None, None])
    else:
        keys, values = keys.astype(page_dtype), values.astype(page_dtype)
        bounds = page_bounds(keys)
    as_rows = lambda x: x.reshape(b * h, num_pages, page * d // 128, 128) if lane_rows else x
    args = dict(page_size=page, scales=scales, key_count=jnp.array([88, 96]),
                query_positions=jnp.array([[40, 41, 60, 90, 3], [20, 70, 71, 95, 2]]),
                mask=mask, top_pages=top, query_chunk=4,
                bandwidth=jax.random.uniform(ks[3], (b, 5, h), minval=0.5, maxval=3.0))
    q = jax.random.normal(ks[2], (b, 5, h, d))
    got = retrieve_from_pages(q, as_rows(keys), as_rows(values), bounds, impl="pallas_tpu",
                              **args)
    wide = (lambda x: x) if page_dtype == "int8" else (lambda x: x.astype(jnp.float32))
    want = retrieve_from_pages(q, as_rows(wide(keys)), as_rows(wide(values)), bounds,
                               impl="xla", **args)
    np.testing.assert_allclose(got, want, atol=2e-6)
    if mask.skip >= 2:  # position 2 sees nothing
        np.testing.assert_array_equal(got[1, 4], 0.0)
