"""The pure functions of mmjax.ops (v1 keys, the shared value extractor, the v2 bandwidth,
tiers and skip schedule), each run as is and under jit, against formulas written out here."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from mmjax import ops


def _unit(x):
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(n > 0, x / np.where(n > 0, n, 1), 0)


class OpsTest(chex.TestCase, parameterized.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_adaptive_bandwidth_formula(self):
        count = jnp.array([0, 1, 5, 4096])
        beta0, beta1, alpha = jnp.array([0.5, 0.0]), jnp.array([1.0, 2.0]), jnp.array([.25, .5])
        got = self.variant(ops.adaptive_bandwidth)(count, beta0, beta1, alpha)
        n = np.asarray(count, np.float64)[:, None]
        want = np.where(n > 0, np.asarray(beta1) * n ** np.asarray(alpha), 0) + np.asarray(beta0)
        chex.assert_shape(got, (4, 2))
        np.testing.assert_allclose(got, want, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_tier_bandwidth_counts_the_visible_pairs(self):
        params = (jnp.array([0.1]), jnp.array([1.0]), jnp.array([0.5]))
        short, long = ops.tier_masks(3, 2)
        fn = self.variant(lambda m: ops.tier_bandwidth(jnp.arange(8), m, *params))
        for mask in (short, long):
            n = [sum(1 for i in range(8) if i <= t - 1 - mask.skip
                     and (mask.window is None or i >= t - mask.window)) for t in range(8)]
            want = np.where(np.array(n) > 0, np.sqrt(n), 0.0) + 0.1
            np.testing.assert_allclose(fn(mask)[:, 0], want, rtol=1e-6)

    def test_tier_masks(self):
        short, long = ops.tier_masks(256, 64)
        assert (short.window, short.skip) == (256, 0)
        assert (long.window, long.skip) == (None, 64)

    @chex.variants(with_jit=True, without_jit=True)
    def test_long_term_skip_schedule(self):
        draw = self.variant(lambda key: ops.select_long_term_skip(
            None, deterministic=False, rng=key, skip_range=(4, 6), inference_skip=1))
        drawn = {int(draw(jax.random.key(i))) for i in range(40)}
        assert drawn == {4, 5, 6}
        assert ops.select_long_term_skip(None, deterministic=True, rng=None, skip_range=(4, 6),
                                  inference_skip=1) == 1
        assert ops.select_long_term_skip(9, deterministic=False, rng=None, skip_range=(4, 6),
                                  inference_skip=1) == 9
        with pytest.raises(ValueError, match="rng"):
            ops.select_long_term_skip(None, deterministic=False, rng=None, skip_range=(4, 6),
                               inference_skip=1)

    @chex.variants(with_jit=True, without_jit=True)
    def test_extract_values_formula(self):
        u = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
        mix, beta = jnp.array([0.0, 0.3, 1.0]), jnp.array([-0.05, 0.0, 0.1])
        got = self.variant(ops.extract_values)(u, mix, beta)
        un = np.asarray(u, np.float64)
        ahead = np.concatenate([un[:, 1:], np.zeros_like(un[:, :1])], axis=1)
        c = np.asarray(mix)[:, None]
        want = _unit((1 - c) * ahead + c * un) * np.exp(10 * np.asarray(beta))[:, None]
        np.testing.assert_allclose(got, want, atol=1e-6)
        np.testing.assert_array_equal(got[:, -1, 0], 0.0)  # c = 0: v_{T-1} peeks at u_T = 0

    @chex.variants(with_jit=True, without_jit=True)
    def test_leaky_keys_formula(self):
        k = jax.random.normal(jax.random.key(1), (1, 6, 2, 3))
        leaky, kernel = jnp.array([0.05, 0.3]), jnp.array([0.1, 0.9])  # 0.9: clamped at e^5
        got = self.variant(ops.leaky_keys, static_argnums=3)(k, leaky, kernel, 2)
        kn = np.asarray(k, np.float64)
        decay = np.exp(-10 * np.abs(np.asarray(leaky)))[:, None]
        kbar, want = np.zeros(kn[:, 0].shape), np.zeros(kn.shape)
        for t in range(6):
            kbar = decay * kbar + (1 - decay) * kn[:, t]
            want[:, t] = _unit(kbar)
        want *= (np.exp(np.minimum(10 * np.asarray(kernel), 5.0)) ** 2)[:, None]
        np.testing.assert_allclose(got, want, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gated_keys_are_unit(self):
        k = jax.random.normal(jax.random.key(2), (2, 7, 3, 4))
        z = jax.random.normal(jax.random.key(3), (2, 2, 7, 3))
        got = self.variant(ops.gated_keys, static_argnums=3)(k, z[0], z[1], 10.0)
        np.testing.assert_allclose(jnp.linalg.norm(got, axis=-1), 1.0, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(1, 3, 16)
    def test_retrieve_block_size_matches_reference(self, block_size):
        q, k, v = jax.random.normal(jax.random.key(4), (3, 2, 11, 2, 4))
        fn = self.variant(lambda *a: ops.retrieve(*a[1:], queries=a[0], impl="xla",
                                                  block_size=block_size))
        want = ops.retrieve(k, v, queries=q, impl="reference")
        np.testing.assert_allclose(fn(q, k, v), want, atol=1e-5)

    def test_bad_shapes_fail_at_the_entry_point(self):
        with pytest.raises(AssertionError):
            ops.adaptive_bandwidth(jnp.zeros((2, 2)), jnp.ones(3), jnp.ones(2), jnp.ones(3))
        with pytest.raises(AssertionError):
            ops.extract_values(jnp.zeros((1, 4, 3, 2)), jnp.zeros(2), jnp.zeros(3))
        with pytest.raises(AssertionError):
            ops.leaky_average(jnp.zeros((4, 3, 2)), jnp.zeros(3))
        with pytest.raises(AssertionError):
            ops.peek_ahead_values(jnp.zeros((1, 4, 3, 2)), jnp.zeros(2))
        with pytest.raises(ValueError, match="block_size"):
            ops.retrieve(jnp.zeros((1, 4, 1, 2)), jnp.zeros((1, 4, 1, 2)), block_size=0)
