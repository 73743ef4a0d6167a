"""``mmjax.ops.project``: the weight matmul with its own backward."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.ops import project


def _loss(matmul):
    # a GELU between two projections: the cotangent of the first is a fused elementwise chain
    return lambda x, w1, w2: jnp.sum(jnp.sin(matmul(jax.nn.gelu(matmul(x, w1)), w2)))


def _einsum(x, w):
    return jnp.tensordot(x, w, axes=1)


@pytest.mark.parametrize("shapes", [((2, 5, 8), (8, 24), (24, 8)),    # x smaller than dy
                                    ((2, 5, 24), (24, 8), (8, 24)),   # dy smaller than x
                                    ((3, 8), (8, 6), (6, 8))])
def test_values_and_gradients_equal_the_plain_matmul(shapes):
    keys = jax.random.split(jax.random.key(0), 3)
    x, w1, w2 = (jax.random.normal(k, s) for k, s in zip(keys, shapes))
    np.testing.assert_allclose(project(x, w1), _einsum(x, w1), rtol=1e-6, atol=1e-6)
    got = jax.grad(_loss(project), argnums=(0, 1, 2))(x, w1, w2)
    want = jax.grad(_loss(_einsum), argnums=(0, 1, 2))(x, w1, w2)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_several_contracted_axes_and_head_shaped_weights():
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (2, 3, 8))
    w_DxHxK = jax.random.normal(keys[1], (8, 2, 4))
    y = jax.random.normal(keys[2], (2, 3, 2, 4))
    w_HxKxD = jax.random.normal(keys[3], (2, 4, 8))
    np.testing.assert_allclose(project(x, w_DxHxK), jnp.einsum("btd,dhk->bthk", x, w_DxHxK),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(project(y, w_HxKxD, 2), jnp.einsum("bthk,hkd->btd", y, w_HxKxD),
                               rtol=1e-6, atol=1e-6)
    for fn, ref, args in [(lambda a, b: project(a, b), "btd,dhk->bthk", (x, w_DxHxK)),
                          (lambda a, b: project(a, b, 2), "bthk,hkd->btd", (y, w_HxKxD))]:
        got = jax.grad(lambda a, b, fn=fn: jnp.sum(jnp.cos(fn(a, b))), argnums=(0, 1))(*args)
        want = jax.grad(lambda a, b, ref=ref: jnp.sum(jnp.cos(jnp.einsum(ref, a, b))),
                        argnums=(0, 1))(*args)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_keep_their_dtypes():
    x = jnp.ones((2, 4, 8), jnp.bfloat16)
    w = jnp.ones((8, 16), jnp.bfloat16)
    dx, dw = jax.grad(lambda a, b: jnp.sum(project(a, b).astype(jnp.float32)),
                      argnums=(0, 1))(x, w)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dw, np.float32), 8.0)


def test_mismatched_contracted_axes_are_an_error():
    with pytest.raises(ValueError, match="do not share their 1 contracted axes"):
        project(jnp.ones((2, 8)), jnp.ones((4, 8)))


def _transposed_big_cotangent(matmul, b, t, d, f) -> bool:
    """Whether XLA's compiled gradient stores an ``[f, b t]`` tensor: the ``[b, t, f]`` GELU
    cotangent, transposed for the weight-gradient matmul."""
    n = b * t
    x = jnp.ones((b, t, d))
    w1, w2 = jnp.ones((d, f)), jnp.ones((f, d))
    hlo = jax.jit(jax.grad(_loss(matmul), argnums=(1, 2))).lower(x, w1, w2).compile().as_text()
    return re.search(rf"= f32\[{f},{n}\]\{{1,0\}} fusion", hlo) is not None


def test_the_weight_gradient_transposes_the_smaller_operand():
    # the plain matmul's gradient transposes the wide [n, f] cotangent (on CPU, a strided
    # loop that cost the GPT2 MLP 35-70 ms per layer); project's transposes x [n, d] instead
    if jax.default_backend() == "cpu":
        assert _transposed_big_cotangent(_einsum, 4, 24, 16, 48)
    assert not _transposed_big_cotangent(project, 4, 24, 16, 48)


def test_remat_dots_policy_still_keeps_the_projection_outputs():
    x, w1, w2 = jnp.ones((4, 8)), jnp.ones((8, 16)), jnp.ones((16, 8))
    fn = jax.checkpoint(_loss(project), policy=jax.checkpoint_policies.dots_saveable)
    jaxpr = str(jax.make_jaxpr(jax.grad(fn, argnums=(1, 2)))(x, w1, w2))
    # forward: 2 matmuls, kept; backward: 2 per projection (the unused dx is dropped by XLA)
    assert jaxpr.count("dot_general") == 6
