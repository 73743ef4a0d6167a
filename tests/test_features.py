"""mmjax.ops.features: leaky averages against their explicit sums, values, normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.ops import l2_normalize, leaky_average, linear_recurrence, peek_ahead_values
from mmjax.ops.features import gated_leaky_average


def explicit_leaky(x, decay):
    """kbar_t = sum_{s<=t} decay^(t-s) (1-decay) x_s: the official T x T matrix form."""
    t = x.shape[1]
    i, j = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
    out = np.zeros(x.shape)
    for h, d in enumerate(decay):
        m = np.where(j <= i, d ** np.maximum(i - j, 0) * (1 - d), 0.0)
        out[:, :, h] = np.einsum("ts,bsk->btk", m, x[:, :, h])
    return out


def test_leaky_average_matches_explicit_sum():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 50, 3, 4))
    lam = 10 * np.abs(np.linspace(0.5, 5, 3) / 10)
    decay = np.exp(-lam)
    got = leaky_average(jnp.asarray(x, jnp.float32), jnp.asarray(decay, jnp.float32))
    np.testing.assert_allclose(got, explicit_leaky(x, decay), atol=1e-5)


def test_gated_leaky_average_matches_loop():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 30, 2, 3))
    gate = np.exp(rng.normal(size=(2, 30, 2)) * 0.3)
    decay = np.exp(-np.abs(rng.normal(size=(2, 30, 2))))
    want = np.zeros_like(x)
    h = np.zeros((2, 2, 3))
    for t in range(30):
        h = gate[:, t, :, None] * x[:, t] + decay[:, t, :, None] * h
        want[:, t] = h
    got = gated_leaky_average(*(jnp.asarray(a, jnp.float32) for a in (x, gate, decay)))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_linear_recurrence_is_causal_and_o_t():
    """The scan never builds a T x T array: compiled temporaries stay linear in T."""
    t = 8192
    spec = jax.ShapeDtypeStruct((1, t, 4, 16), jnp.float32)
    decay = jax.ShapeDtypeStruct((1, 1, 4, 1), jnp.float32)
    temp = jax.jit(linear_recurrence).lower(decay, spec).compile().memory_analysis()
    assert temp.temp_size_in_bytes < 64 * t * 4 * 16 * 4
    x = jnp.zeros((1, 10, 1, 1)).at[0, 5].set(1.0)
    y = linear_recurrence(jnp.full((1, 1, 1, 1), 0.5), x)
    np.testing.assert_allclose(y[0, :, 0, 0], [0] * 5 + [0.5**k for k in range(5)], atol=1e-7)


def test_leaky_average_bf16_input_runs_in_fp32():
    x = jnp.ones((1, 300, 1, 2), jnp.bfloat16)
    y = leaky_average(x, jnp.array([0.99]))
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y[0, -1, 0, 0], 1 - 0.99**300, rtol=1e-4)


def test_peek_ahead_values():
    u = jnp.arange(12.0).reshape(1, 4, 1, 3)
    c = jnp.array([0.25])
    v = peek_ahead_values(u, c)
    want = 0.75 * np.concatenate([np.asarray(u[:, 1:]), np.zeros((1, 1, 1, 3))], 1) \
        + 0.25 * np.asarray(u)
    np.testing.assert_allclose(v, want)


def test_l2_normalize_exact_and_zero_safe():
    x = jnp.array([[3.0, 4.0], [0.0, 0.0], [1e-20, 0.0]])
    y = l2_normalize(x)
    np.testing.assert_array_equal(y[0], jnp.array([3.0, 4.0]) / 5.0)
    np.testing.assert_array_equal(y[1], [0.0, 0.0])
    g = jax.grad(lambda x: jnp.sum(l2_normalize(x) * jnp.array([1.0, 2.0])))(x)
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_l2_normalize_keeps_dtype(dtype):
    x = jnp.ones((2, 3, 4), dtype)
    assert l2_normalize(x).dtype == dtype


def test_cpu_recurrence_is_a_sequential_scan_equal_to_the_log_depth_one():
    a = jax.nn.sigmoid(jax.random.normal(jax.random.key(0), (2, 37, 3, 1)))
    b = jax.random.normal(jax.random.key(1), (2, 37, 3, 4))
    jaxpr = str(jax.make_jaxpr(linear_recurrence)(a, b))
    assert "scan[" in jaxpr and "pad" not in jaxpr  # one step per token, no interleaving

    def log_depth(a, b):
        a = jnp.broadcast_to(a, b.shape)
        return jax.lax.associative_scan(lambda x, y: (x[0] * y[0], y[0] * x[1] + y[1]),
                                        (a, b), axis=1)[1]

    np.testing.assert_allclose(linear_recurrence(a, b), log_depth(a, b), rtol=1e-5, atol=1e-6)
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))
    for got, want in zip(jax.grad(loss(linear_recurrence), (0, 1))(a, b),
                         jax.grad(loss(log_depth), (0, 1))(a, b), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("decay_dims", [1, 4])
def test_recurrence_adjoint_matches_autodiff_of_the_scan(sequential, decay_dims):
    """The hand-written backward (a reverse-time recurrence) gives autodiff's gradients, for
    both forms of the scan and for per-head and per-dimension decays."""
    from mmjax.ops.features import _recurrence, _scan

    a = jax.nn.sigmoid(jax.random.normal(jax.random.key(2), (2, 29, 3, decay_dims)))
    b = jax.random.normal(jax.random.key(3), (2, 29, 3, 4))
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)) * jnp.arange(4.0))
    got = jax.grad(loss(lambda a, b: _recurrence(a, b, sequential)), (0, 1))(a, b)
    want = jax.grad(loss(lambda a, b: _scan(a, b, sequential, reverse=False)), (0, 1))(a, b)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_recurrence_backward_keeps_no_scan_intermediates():
    """The log-depth scan's training memory: decays and states only, not the tree of
    partial products that autodiff of ``associative_scan`` keeps."""
    from mmjax.ops.features import _recurrence, _scan

    a = jax.ShapeDtypeStruct((1, 4096, 4, 1), jnp.float32)
    b = jax.ShapeDtypeStruct((1, 4096, 4, 16), jnp.float32)

    def temp(f):
        grad = jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b) ** 2), (0, 1)))
        return grad.lower(a, b).compile().memory_analysis().temp_size_in_bytes

    adjoint = temp(lambda a, b: _recurrence(a, b, False))
    autodiff = temp(lambda a, b: _scan(a, b, False, reverse=False))
    assert adjoint < 0.9 * autodiff, (adjoint, autodiff)
