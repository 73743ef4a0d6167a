import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.moons import (
    MoonsMemory,
    complex_matmul,
    complex_weights,
    identity_params,
)
from mmjax.moons import data
from mmjax.moons.evaluate import is_disentangled, rollout_errors, row_dominance


def _params(heads, seed=0):
    x = jnp.zeros((1, 4, 6))
    return nn.meta.unbox(MoonsMemory(num_heads=heads).init(jax.random.key(seed), x)["params"])


@pytest.mark.parametrize("heads", [1, 3])
def test_parameter_count_is_54(heads):
    params = _params(heads)
    assert sum(p.size for p in jax.tree.leaves(params)) == 54
    assert set(params) == {"W_k", "W_v", "W_z"}
    boxed = MoonsMemory(num_heads=heads).init(jax.random.key(0), jnp.zeros((1, 4, 6)))
    assert boxed["params"]["W_k"].names == ("complex", "moons_out", "moons_in")


def test_complex_matmul_matches_numpy_complex():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 3, 3)).astype(np.float32)
    x = rng.normal(size=(2, 5, 6)).astype(np.float32)
    got = np.asarray(complex_matmul(jnp.asarray(w), jnp.asarray(x)))
    xc = x[..., 0::2] + 1j * x[..., 1::2]
    want = np.einsum("om,btm->bto", w[0] + 1j * w[1], xc)
    np.testing.assert_allclose(got[..., 0::2], want.real, atol=1e-5)
    np.testing.assert_allclose(got[..., 1::2], want.imag, atol=1e-5)
    with pytest.raises(ValueError, match="last dimension"):
        complex_matmul(jnp.asarray(w), jnp.zeros((2, 5, 4)))


def test_bad_config_and_input_errors():
    with pytest.raises(ValueError, match="num_heads must divide num_moons"):
        MoonsMemory(num_heads=2).init(jax.random.key(0), jnp.zeros((1, 4, 6)))
    with pytest.raises(ValueError, match=r"x must be \[batch, time, 2 \* num_moons = 6\]"):
        MoonsMemory().init(jax.random.key(0), jnp.zeros((1, 4, 5)))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        MoonsMemory().apply({"params": identity_params()}, jnp.zeros((1, 4, 6)), 2, 0,
                            method=MoonsMemory.rollout)


def test_first_prediction_is_zero_and_causal():
    params = _params(1, seed=1)
    x = jnp.asarray(data.sample_batch(np.random.default_rng(0), [[1.0, 2.0, 3.0]], 2, 20)[0])
    out = MoonsMemory().apply({"params": params}, x)
    np.testing.assert_array_equal(np.asarray(out[:, 0]), 0.0)
    # changing x_10 does not change predictions z_0..z_8 (z_9 uses v_8 = W_v x_9 only)
    out2 = MoonsMemory().apply({"params": params}, x.at[:, 10].add(1.0))
    np.testing.assert_allclose(np.asarray(out2[:, :10]), np.asarray(out[:, :10]), atol=1e-6)
    assert np.abs(np.asarray(out2[:, 11]) - np.asarray(out[:, 11])).max() > 1e-4


@pytest.mark.parametrize("heads,skip", [(1, 0), (3, 0), (3, 2)])
def test_cached_rollout_equals_rerunning_the_sequence(heads, skip):
    model = MoonsMemory(num_heads=heads, impl="reference", skip=skip)
    params = _params(heads, seed=2)
    params = jax.tree.map(lambda p: 2.0 * p, params)  # sharper retrieval: a stricter check
    x = jnp.asarray(data.sample_batch(np.random.default_rng(1), data.TRAIN_PERIODS, 3, 40)[0])
    length, steps = 17, 6
    cached = model.apply({"params": params}, x, length, steps, method=MoonsMemory.rollout)
    # Rerunning on the prompt and the first i predictions gives prediction i: the causal
    # model reads all of them in one pass over the prompt and the predictions but the last.
    seq = jnp.concatenate([x[:, :length], cached[:, :-1]], axis=1)
    rerun = model.apply({"params": params}, seq)[:, length - 1:]
    np.testing.assert_allclose(np.asarray(cached), np.asarray(rerun), atol=2e-5)
    # a traced length gives the same result (one compiled function for every context)
    jitted = jax.jit(lambda t: model.apply({"params": params}, x, t, steps,
                                           method=MoonsMemory.rollout))
    np.testing.assert_allclose(np.asarray(jitted(length)), np.asarray(cached), atol=1e-6)


def test_identity_solution_predicts_once_memory_holds_a_full_lcm():
    x, _ = data.sample_batch(np.random.default_rng(0), [[1.0, 2.0, 3.0]], 16, 340)
    params = identity_params()
    lcm_steps = 6.0 / data.DT  # 266.7
    contexts = np.array([150, 250, 300, 310])
    one = np.asarray(rollout_errors(MoonsMemory(num_heads=1), params, x, contexts, 25))
    three = np.asarray(rollout_errors(MoonsMemory(num_heads=3), params, x, contexts, 25))
    assert contexts[1] < lcm_steps < contexts[2]
    assert (one[:2] > 0.4).all(), one   # no full period of the system in memory yet
    assert (one[2:] < 0.2).all(), one   # a full lcm in memory
    assert (three[:2] < 0.35).all(), three  # each head needs only its own moon's period
    # the identity is permutation-like; a random init is not
    assert is_disentangled(params)
    np.testing.assert_allclose(row_dominance(params)["W_k"], 1.0)
    assert not is_disentangled(_params(3, seed=0))
    assert set(complex_weights(params)) == {"W_k", "W_v", "W_z"}
    # with the 3 most recent pairs hidden, the identity predicts almost exactly after the lcm
    hidden = np.asarray(rollout_errors(MoonsMemory(num_heads=1, skip=3), params, x,
                                       contexts[2:], 25))
    assert (hidden < 0.02).all(), hidden


def test_rollout_errors_rejects_contexts_out_of_range():
    x = jnp.zeros((1, 30, 6))
    with pytest.raises(ValueError, match=r"contexts must lie in \[1, 5\]"):
        rollout_errors(MoonsMemory(), identity_params(), x, np.array([3, 6]), 25)


def test_retrieval_paths_agree():
    params = _params(3, seed=4)
    x = jnp.asarray(data.sample_batch(np.random.default_rng(2), data.TRAIN_PERIODS, 2, 150)[0])
    outs = [np.asarray(MoonsMemory(num_heads=3, impl=impl, block_size=bs).apply(
        {"params": params}, x)) for impl, bs in (("xla", 64), ("xla", None), ("reference", 64))]
    np.testing.assert_allclose(outs[0], outs[2], atol=1e-5)
    np.testing.assert_allclose(outs[1], outs[2], atol=1e-5)
