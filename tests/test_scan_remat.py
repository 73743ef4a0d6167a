"""Scanned layers and remat policies: the same function as the unrolled, stored network."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.layers.common import REMAT_POLICIES
from mmjax.models import build_model

CONFIGS = {
    "memory_mosaic": dict(name="memory_mosaic", vocab_size=64, num_layers=3, num_heads=2,
                          embed_dim=32, pmem_size=16, impl="xla"),
    "memory_mosaic_v2": dict(name="memory_mosaic_v2", vocab_size=64, num_layers=3,
                             num_heads=2, embed_dim=32, mlp_dim=48, short_term_window=8,
                             long_term_skip_range=(2, 6), inference_long_term_skip=2,
                             impl="xla"),
    "gpt2": dict(name="gpt2", vocab_size=64, context_length=16, num_layers=3, num_heads=2,
                 embed_dim=32, impl="xla"),
    "llama": dict(name="llama", vocab_size=64, num_layers=3, num_heads=2, embed_dim=32,
                  mlp_dim=48, impl="xla"),
}


def stack_blocks(params, num_layers):
    """Unrolled ``block_i`` parameters -> the scanned ``blocks/layer`` layout."""
    params = dict(params)
    blocks = [params.pop(f"block_{i}") for i in range(num_layers)]
    params["blocks"] = {"layer": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    return params


def _loss_and_grads(model, params, ids, **kwargs):
    def loss(p):
        return jnp.mean(model.apply({"params": p}, ids, **kwargs) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("name", CONFIGS)
def test_scanned_layers_equal_unrolled(name):
    config = CONFIGS[name]
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    unrolled = build_model(config)
    params = flax.core.meta.unbox(unrolled.init(jax.random.key(0), ids)["params"])
    scanned = build_model({**config, "scan_layers": True})
    scanned_init = flax.core.meta.unbox(scanned.init(jax.random.key(0), ids)["params"])
    stacked = stack_blocks(params, config["num_layers"])
    assert jax.tree.map(jnp.shape, scanned_init) == jax.tree.map(jnp.shape, stacked)
    loss_u, grads_u = _loss_and_grads(unrolled, params, ids)
    loss_s, grads_s = _loss_and_grads(scanned, stacked, ids)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads_s, stack_blocks(grads_u, config["num_layers"]))


@pytest.mark.parametrize("policy", sorted(set(REMAT_POLICIES) - {"none"}))
def test_remat_policies_keep_values_and_gradients(policy):
    config = {**CONFIGS["memory_mosaic_v2"], "scan_layers": True}
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    model = build_model(config)
    params = flax.core.meta.unbox(model.init(jax.random.key(0), ids)["params"])
    loss, grads = _loss_and_grads(model, params, ids)
    loss_r, grads_r = _loss_and_grads(build_model({**config, "remat": policy}), params, ids)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads_r, grads)


def _jaxpr_size(config, num_layers):
    model = build_model({**config, "num_layers": num_layers})
    ids = jnp.zeros((1, 16), jnp.int32)
    params = jax.eval_shape(lambda: flax.core.meta.unbox(
        model.init(jax.random.key(0), ids)["params"]))
    grad = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, ids)))
    return len(str(jax.make_jaxpr(grad)(params)))


@pytest.mark.parametrize("name", ["memory_mosaic", "memory_mosaic_v2"])
def test_scanned_program_does_not_grow_with_depth(name):
    """What the compiler sees: the same program at 2 and 32 layers when scanned."""
    config = {**CONFIGS[name], "scan_layers": True, "remat": "full"}
    small, deep = _jaxpr_size(config, 2), _jaxpr_size(config, 32)
    assert abs(deep - small) < 0.01 * small  # only the numbers in the shapes differ
    unrolled = {**CONFIGS[name], "remat": "full"}
    assert _jaxpr_size(unrolled, 8) > 3 * _jaxpr_size(unrolled, 2)


def test_bad_remat_policy_is_one_clear_error():
    """Raised when the model is built, before anything is traced."""
    with pytest.raises(ValueError, match=r"model.remat='sometimes' must be one of \['dots'"):
        build_model({**CONFIGS["gpt2"], "remat": "sometimes"})
