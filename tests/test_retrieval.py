"""mmjax.ops.retrieve: the reference against a plain numpy formula, the blocked XLA path
against the reference (values and gradients), masks, bandwidth forms, dtypes, bad input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.ops import MaskSpec, retrieve, retrieve_blocked, retrieve_reference, visible_count
from mmjax.ops.masks import kv_tile_range, q_tile_range


def numpy_retrieve(q, k, v, beta_qh, window, skip, offset):
    """y_t = sum_{i visible} softmax(beta_t <q_t, k_i>) v_i, written out loop by loop."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, tq, h, _ = q.shape
    out = np.zeros((b, tq, h, v.shape[-1]))
    for bi, hi, t in itertools.product(range(b), range(h), range(tq)):
        pos = offset + t
        lo = 0 if window is None else max(0, pos - window)
        idx = np.arange(lo, min(pos - skip, k.shape[1]))
        if idx.size == 0:
            continue
        s = beta_qh[t, hi] * (k[bi, idx, hi] @ q[bi, t, hi])
        w = np.exp(s - s.max())
        out[bi, t, hi] = (w / w.sum()) @ v[bi, idx, hi]
    return out


def make_inputs(seed, b, tq, tk, h, dk, dv, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, tq, h, dk)).astype(np.float32)
    k = rng.normal(size=(b, tk, h, dk)).astype(np.float32)
    v = rng.normal(size=(b, tk, h, dv)).astype(np.float32)
    beta = rng.uniform(0.3, 1.5, size=(tq, h)).astype(np.float32)
    return [jnp.asarray(a, dtype) for a in (q, k, v)] + [jnp.asarray(beta)]


MASKS = {
    "causal": (None, 0),
    "window": (5, 0),
    "skip": (None, 3),
    "window_skip": (9, 4),
    "window1": (1, 0),
}


@pytest.mark.parametrize("mask_name", sorted(MASKS))
@pytest.mark.parametrize("offset", [0, 6])
def test_reference_matches_numpy_formula(mask_name, offset):
    window, skip = MASKS[mask_name]
    q, k, v, beta = make_inputs(0, 2, 11, 17, 3, 4, 5)
    got = retrieve(k, v, queries=q, bandwidth=beta, mask=MaskSpec(window, skip),
                   query_offset=offset, impl="reference")
    want = numpy_retrieve(q, k, v, np.asarray(beta), window, skip, offset)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)


def _loss(impl, mask, offset, **blocks):
    def f(q, k, v, beta):
        if impl == "blocked":
            y = retrieve_blocked(q, k, v, beta, mask, jnp.int32(offset), **blocks)
        else:
            y = retrieve_reference(q, k, v, beta, mask, jnp.int32(offset))
        w = jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))
        return jnp.sum(y.astype(jnp.float32) * w)
    return f


CASES = [
    # (tq, tk, offset, block_q, block_k)
    (37, 37, 0, 8, 8),     # not a multiple of the tiles
    (37, 37, 0, 16, 4),    # unequal tiles
    (1, 1, 0, 8, 8),       # length 1: the only row is empty
    (64, 64, 0, 16, 16),   # exact multiple
    (5, 40, 35, 4, 8),     # decoding-style: few queries late in a long key sequence
]


@pytest.mark.parametrize("mask_name", sorted(MASKS))
@pytest.mark.parametrize("case", CASES)
def test_blocked_matches_reference_value_and_grads(mask_name, case):
    tq, tk, offset, bq, bk = case
    mask = MaskSpec(*MASKS[mask_name])
    q, k, v, beta = make_inputs(1, 2, tq, tk, 2, 8, 4)
    args = (q, k, v, beta)
    ref = _loss("reference", mask, offset)
    blk = _loss("blocked", mask, offset, block_q=bq, block_k=bk)
    np.testing.assert_allclose(blk(*args), ref(*args), rtol=1e-5, atol=1e-5)
    y_ref = retrieve_reference(q, k, v, beta, mask, jnp.int32(offset))
    y_blk = retrieve_blocked(q, k, v, beta, mask, jnp.int32(offset), block_q=bq, block_k=bk)
    np.testing.assert_allclose(y_blk, y_ref, atol=1e-5)
    g_ref = jax.grad(ref, argnums=(0, 1, 2, 3))(*args)
    g_blk = jax.grad(blk, argnums=(0, 1, 2, 3))(*args)
    for name, a, b in zip(("queries", "keys", "values", "bandwidth"), g_blk, g_ref):
        assert np.all(np.isfinite(a)), name
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=name)


def test_bf16_blocked_matches_reference():
    q, k, v, beta = make_inputs(2, 2, 45, 45, 2, 16, 8, dtype=jnp.bfloat16)
    mask = MaskSpec(window=20, skip=2)
    y_ref = retrieve_reference(q, k, v, beta, mask, jnp.int32(0))
    y_blk = retrieve_blocked(q, k, v, beta, mask, jnp.int32(0), block_q=16, block_k=16)
    assert y_blk.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(y_blk), np.float32(y_ref), atol=2e-2)
    ref, blk = _loss("reference", mask, 0), _loss("blocked", mask, 0, block_q=16, block_k=16)
    g_ref = jax.grad(ref, argnums=(0, 1, 2, 3))(q, k, v, beta)
    g_blk = jax.grad(blk, argnums=(0, 1, 2, 3))(q, k, v, beta)
    for a, b in zip(g_blk, g_ref):
        assert a.dtype == b.dtype
        scale = float(np.max(np.abs(np.float32(b)))) + 1e-6
        np.testing.assert_allclose(np.float32(a) / scale, np.float32(b) / scale, atol=2e-2)


def test_bf16_reference_close_to_fp32():
    q, k, v, beta = make_inputs(3, 1, 30, 30, 2, 8, 8)
    y32 = retrieve(k, v, queries=q, bandwidth=beta, impl="reference")
    y16 = retrieve(k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                   queries=q.astype(jnp.bfloat16), bandwidth=beta, impl="reference")
    np.testing.assert_allclose(np.float32(y16), y32, atol=3e-2)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_queries_default_to_keys_and_grad_adds_both_roles(impl):
    _, k, v, _ = make_inputs(4, 1, 13, 13, 2, 4, 4)
    f_default = lambda k: jnp.sum(retrieve(k, v, impl=impl) ** 2)
    f_explicit = lambda q, k: jnp.sum(retrieve(k, v, queries=q, impl=impl) ** 2)
    np.testing.assert_allclose(f_default(k), f_explicit(k, k), rtol=1e-6)
    gq, gk = jax.grad(f_explicit, argnums=(0, 1))(k, k)
    np.testing.assert_allclose(jax.grad(f_default)(k), gq + gk, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("form", ["none", "heads", "rows"])
def test_bandwidth_forms_and_gradient_shape(impl, form):
    q, k, v, beta_rows = make_inputs(5, 1, 9, 9, 3, 4, 4)
    bandwidth = {"none": None, "heads": beta_rows[0], "rows": beta_rows}[form]
    y = retrieve(k, v, queries=q, bandwidth=bandwidth, impl=impl)
    full = {"none": jnp.ones_like(beta_rows), "heads": jnp.broadcast_to(beta_rows[0], (9, 3)),
            "rows": beta_rows}[form]
    np.testing.assert_allclose(y, numpy_retrieve(q, k, v, np.asarray(full), None, 0, 0),
                               atol=2e-6)
    if bandwidth is not None:
        g = jax.grad(lambda b: jnp.sum(retrieve(k, v, queries=q, bandwidth=b, impl=impl) ** 2))(
            bandwidth)
        assert g.shape == bandwidth.shape and np.all(np.isfinite(g)) and np.any(g != 0)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_empty_rows_are_zero_with_finite_gradients(impl):
    q, k, v, beta = make_inputs(6, 2, 10, 10, 2, 4, 4)
    mask = MaskSpec(skip=4)  # rows t <= 4 see nothing
    f = lambda q, k, v, b: retrieve(k, v, queries=q, bandwidth=b, mask=mask, impl=impl)
    y = f(q, k, v, beta)
    assert np.all(np.asarray(y[:, :5]) == 0.0)
    assert np.all(np.abs(np.asarray(y[:, 5:])) > 0)
    grads = jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2, 3))(q, k, v, beta)
    for g in grads:
        assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(grads[3][:5], 0.0)


def test_huge_scores_stay_finite():
    q, k, v, _ = make_inputs(7, 1, 20, 20, 1, 4, 4)
    beta = jnp.full((20, 1), 1e4)
    for impl in ("reference", "xla"):
        y, g = jax.value_and_grad(
            lambda k, impl=impl: jnp.sum(retrieve(k, v, queries=q, bandwidth=beta, impl=impl)))(k)
        assert np.isfinite(y) and np.all(np.isfinite(g)), impl


def test_traced_mask_and_offset_do_not_recompile():
    q, k, v, beta = make_inputs(8, 1, 16, 16, 2, 4, 4)
    traces = []

    @jax.jit
    def f(window, skip, offset):
        traces.append(1)
        return retrieve(k, v, queries=q, bandwidth=beta, mask=MaskSpec(window, skip),
                        query_offset=offset, impl="xla")

    outs = [f(jnp.int32(w), jnp.int32(s), jnp.int32(o)) for w, s, o in [(4, 0, 0), (7, 2, 3)]]
    assert len(traces) == 1
    for (w, s, o), y in zip([(4, 0, 0), (7, 2, 3)], outs):
        np.testing.assert_allclose(y, numpy_retrieve(q, k, v, np.asarray(beta), w, s, o),
                                   atol=2e-6)


def test_grad_under_jit_with_traced_skip():
    q, k, v, beta = make_inputs(9, 1, 12, 12, 1, 4, 4)
    g = jax.jit(jax.grad(lambda k, s: jnp.sum(
        retrieve(k, v, mask=MaskSpec(skip=s), impl="xla") ** 2)))(k, jnp.int32(2))
    g_ref = jax.grad(lambda k: jnp.sum(
        retrieve(k, v, mask=MaskSpec(skip=2), impl="reference") ** 2))(k)
    np.testing.assert_allclose(g, g_ref, atol=1e-5)


def test_visible_count_matches_mask():
    t = jnp.arange(40)
    for window, skip in [(None, 0), (8, 0), (None, 5), (8, 3), (1, 0)]:
        want = [numpy_count(int(tt), window, skip) for tt in t]
        np.testing.assert_array_equal(visible_count(t, window, skip), want)


def numpy_count(t, window, skip):
    lo = 0 if window is None else max(0, t - window)
    return max(0, t - skip - lo)


def test_tile_ranges_skip_hidden_tiles():
    """Window masks visit O(window / block) key tiles per query tile, not O(T / block)."""
    tk, block = 4096, 256
    mask = MaskSpec(window=256)
    counts = []
    for qi in range(tk // block):
        lo, hi = kv_tile_range(qi * block, (qi + 1) * block, tk, block, mask, 0)
        counts.append(int(hi) - int(lo) + 1)
    assert max(counts) == 2
    full = [int(h) - int(lo) + 1 for lo, h in
            (kv_tile_range(qi * block, (qi + 1) * block, tk, block, MaskSpec(), 0)
             for qi in range(tk // block))]
    assert full == list(range(1, tk // block + 1))
    # skip hides the recent band: the first query tile sees nothing when skip >= block
    lo, hi = kv_tile_range(0, block, tk, block, MaskSpec(skip=256), 0)
    assert int(hi) < int(lo)


def test_q_tile_range_is_the_transpose_of_kv_tile_range():
    t, bq, bk = 100, 8, 16
    for window, skip, offset in [(None, 0, 0), (10, 3, 0), (None, 20, 5), (30, 0, 7)]:
        mask = MaskSpec(window, skip)
        for kj in range(-(-t // bk)):
            lo, hi = q_tile_range(kj * bk, min((kj + 1) * bk, t), t, bq, mask, offset)
            seen = {qi for qi in range(-(-t // bq))
                    if kv_tile_range(qi * bq, min((qi + 1) * bq, t), t, bk, mask, offset)[0]
                    <= kj <= kv_tile_range(qi * bq, min((qi + 1) * bq, t), t, bk, mask,
                                           offset)[1]}
            assert seen == set(range(int(lo), int(hi) + 1)), (window, skip, offset, kj)


def test_blocked_memory_is_linear_in_time():
    """Forward+backward temporaries of the XLA path stay far below one T x T score matrix."""
    t = 4096
    spec = jax.ShapeDtypeStruct((1, t, 2, 32), jnp.float32)
    f = jax.jit(jax.grad(lambda k, v: jnp.sum(retrieve(k, v, impl="xla"))))
    temp = f.lower(spec, spec).compile().memory_analysis().temp_size_in_bytes
    dense = t * t * 2 * 4  # one fp32 [T, T] score matrix per head
    assert temp < dense / 20, (temp, dense)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(keys=np.zeros((2, 3, 4))), "keys must have rank 4"),
        (dict(values=np.zeros((2, 5, 2, 4))), "values must be"),
        (dict(queries=np.zeros((2, 3, 3, 4))), "queries must be"),
        (dict(bandwidth=np.ones((3,))), "bandwidth must be"),
        (dict(impl="cuda"), "impl must be one of"),
        (dict(query_offset=-1), "query_offset must be >= 0"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, match):
    args = dict(keys=np.zeros((2, 3, 2, 4), np.float32), values=np.zeros((2, 3, 2, 4),
                np.float32))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        retrieve(args.pop("keys"), args.pop("values"), **args)


@pytest.mark.parametrize("window, skip, match", [(0, 0, "mask.window must be >= 1"),
                                                 (None, -1, "mask.skip must be >= 0"),
                                                 (2.5, 0, "mask.window must be an integer")])
def test_mask_spec_validation(window, skip, match):
    with pytest.raises(ValueError, match=match):
        MaskSpec(window=window, skip=skip)


def test_mask_must_be_a_mask_spec():
    k = jnp.zeros((1, 3, 1, 2))
    with pytest.raises(TypeError, match="mask must be a MaskSpec"):
        retrieve(k, k, mask=(None, 0))


def test_default_tiles_follow_platform_length_and_window():
    from mmjax.ops.blocked import ALL_VISIBLE_BLOCK_Q, default_blocks

    assert default_blocks(4096, 256, False, "tpu") == (256, 256)
    assert default_blocks(4096, None, True, "cpu") == (ALL_VISIBLE_BLOCK_Q, 256)
    assert default_blocks(512, 64, False, "cpu") == (32, 32)  # a narrow band: small tiles
    assert default_blocks(512, 256, False, "cpu") == (64, 64)
    assert default_blocks(64, 16, False, "cpu") == (64, 64)  # one tile of a short sequence
    assert default_blocks(256, None, False, "cpu") == (256, 256)
    assert default_blocks(512, None, False, "cpu") == (64, 64)
    traced_window = jnp.int32(64)  # an array (traced under jit) cannot size tiles: causal rule
    assert default_blocks(512, traced_window, False, "cpu") == (64, 64)


@pytest.mark.parametrize("window", [40, None])
def test_default_cpu_tiles_match_the_reference(window):
    """retrieve's default tiles on CPU (32 or 64 here; 300 is a multiple of neither)
    give the reference's values and gradients."""
    mask = MaskSpec(window=window, skip=3)
    q, k, v, beta = make_inputs(2, 2, 300, 300, 2, 8, 4)
    loss = lambda impl: lambda k, v, beta: jnp.sum(jnp.sin(retrieve(
        k, v, bandwidth=beta, mask=mask, impl=impl)))
    np.testing.assert_allclose(loss("xla")(k, v, beta), loss("reference")(k, v, beta),
                               rtol=1e-5)
    for a, b in zip(jax.grad(loss("xla"), (0, 1, 2))(k, v, beta),
                    jax.grad(loss("reference"), (0, 1, 2))(k, v, beta), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
