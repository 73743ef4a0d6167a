"""GELU MLP and SwiGLU against direct formulas."""

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.layers.mlp import MLP, SwiGLU


def _plain(params):
    return flax.core.meta.unbox(params)


def test_mlp_is_tanh_gelu_mlp():
    x = jax.random.normal(jax.random.key(0), (2, 3, 4))
    mod = MLP(hidden_dim=16, use_bias=True)
    p = _plain(mod.init(jax.random.key(1), x)["params"])
    h = x @ p["c_fc"]["kernel"] + p["c_fc"]["bias"]
    gelu = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    want = gelu @ p["c_proj"]["kernel"] + p["c_proj"]["bias"]
    np.testing.assert_allclose(mod.apply({"params": p}, x), want, atol=1e-5)


def test_swiglu_formula_and_no_bias():
    x = jax.random.normal(jax.random.key(2), (2, 3, 4))
    mod = SwiGLU(hidden_dim=8)
    p = _plain(mod.init(jax.random.key(3), x)["params"])
    assert set(p) == {"w_gate", "w_up", "w_down"}
    assert all(set(v) == {"kernel"} for v in p.values())
    g = x @ p["w_gate"]["kernel"]
    want = (g * jax.nn.sigmoid(g) * (x @ p["w_up"]["kernel"])) @ p["w_down"]["kernel"]
    np.testing.assert_allclose(mod.apply({"params": p}, x), want, atol=1e-5)


def test_mlp_init_std_and_logical_axes():
    x = jnp.zeros((1, 1, 256))
    boxed = MLP(hidden_dim=1024, init_std=0.02, out_init_std=0.005).init(jax.random.key(4), x)
    assert boxed["params"]["c_fc"]["kernel"].names == ("embed", "mlp")
    p = _plain(boxed["params"])
    np.testing.assert_allclose(np.std(p["c_fc"]["kernel"]), 0.02, rtol=0.05)
    np.testing.assert_allclose(np.std(p["c_proj"]["kernel"]), 0.005, rtol=0.05)
