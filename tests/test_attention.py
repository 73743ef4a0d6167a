"""Attention over retrieve: RoPE, the diagonal-inclusive mask, dropout, errors."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.layers.attention import (
    AttentionHeads,
    CausalSelfAttention,
    apply_rope,
    causal_attention,
)
from mmjax.layers.common import per_head_dim


def _dense_attention(q, k, v, window, skip):
    """Slow reference: softmax(q.k / sqrt(K)) over t-window < i <= t - skip."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, dk = q.shape
    out = np.zeros(v.shape)
    for bi in range(b):
        for hi in range(h):
            for ti in range(t):
                lo = 0 if window is None else max(0, ti - window + 1)
                idx = np.arange(lo, ti - skip + 1)
                if idx.size == 0:
                    continue
                s = k[bi, idx, hi] @ q[bi, ti, hi] / np.sqrt(dk)
                w = np.exp(s - s.max())
                out[bi, ti, hi] = (w / w.sum()) @ v[bi, idx, hi]
    return out


@pytest.mark.parametrize("window,skip", [(None, 0), (3, 0), (None, 2), (4, 1)])
def test_causal_attention_matches_dense_reference(window, skip):
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 9, 2, 4))
    out = causal_attention(q, k, v, window=window, skip=skip, impl="xla")
    np.testing.assert_allclose(out, _dense_attention(q, k, v, window, skip), atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    q, k = jax.random.normal(jax.random.key(1), (2, 1, 5, 2, 8))
    pos = jnp.arange(5)
    s1 = jnp.einsum("bqhk,bthk->bhqt", apply_rope(q, pos, 100.0), apply_rope(k, pos, 100.0))
    s2 = jnp.einsum("bqhk,bthk->bhqt", apply_rope(q, pos + 7, 100.0),
                    apply_rope(k, pos + 7, 100.0))
    np.testing.assert_allclose(s1, s2, atol=1e-4)
    np.testing.assert_allclose(jnp.linalg.norm(apply_rope(q, pos, 100.0), axis=-1),
                               jnp.linalg.norm(q, axis=-1), rtol=1e-5)
    # position 0 is the identity; other positions rotate
    np.testing.assert_allclose(apply_rope(q, pos, 100.0)[:, 0], q[:, 0], atol=1e-6)
    assert not np.allclose(apply_rope(q, pos, 100.0)[:, 1], q[:, 1])


def test_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rope(jnp.zeros((1, 2, 1, 3)), jnp.arange(2), 10.0)


def test_attention_heads_is_projection_then_dense_attention():
    x = jax.random.normal(jax.random.key(2), (2, 7, 6))
    mod = AttentionHeads(num_heads=2, head_dim=3, window=4, impl="reference")
    params = flax.core.meta.unbox(mod.init(jax.random.key(3), x)["params"])
    out = mod.apply({"params": params}, x, skip=1)
    q, k, v = (jnp.einsum("btd,dhk->bthk", x, params[n]) for n in ("query", "key", "value"))
    np.testing.assert_allclose(out, _dense_attention(q, k, v, 4, 1), atol=1e-5)


def test_attention_dropout_only_when_not_deterministic():
    x = jax.random.normal(jax.random.key(4), (2, 6, 8))
    mod = CausalSelfAttention(num_heads=2, attention_dropout=0.5, residual_dropout=0.0)
    params = mod.init(jax.random.key(5), x)
    y0 = mod.apply(params, x)
    np.testing.assert_array_equal(y0, mod.apply(params, x))
    y1 = mod.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(6)})
    assert not np.allclose(y0, y1)


def test_per_head_dim_error():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        per_head_dim(10, 3)
