"""GPT2, LLaMA and the separate short/long attention ablation."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import build_model

TINY = {"vocab_size": 32, "num_layers": 2, "num_heads": 2, "embed_dim": 16}
GPT2 = {"name": "gpt2", "context_length": 24, **TINY}
LLAMA = {"name": "llama", "mlp_dim": 24, **TINY}
SHORT_LONG = {**LLAMA, "name": "llama_short_long", "short_term_window": 4,
              "long_term_skip_range": (2, 5), "inference_long_term_skip": 3}


def _init(config, length=12, seed=0):
    model = build_model(config)
    ids = jax.random.randint(jax.random.key(seed), (2, length), 0, config["vocab_size"])
    params = flax.core.meta.unbox(model.init(jax.random.key(1), ids)["params"])
    return model, params, ids


def _changed_positions(model, params, ids, j, **kwargs):
    """Positions whose logits change when token j changes."""
    other = ids.at[:, j].set((ids[:, j] + 1) % 32)
    a = model.apply({"params": params}, ids, **kwargs)
    b = model.apply({"params": params}, other, **kwargs)
    return set(np.nonzero(np.abs(a - b).max(axis=(0, 2)) > 1e-6)[0].tolist())


@pytest.mark.parametrize("config", [GPT2, LLAMA, SHORT_LONG], ids=lambda c: c["name"])
def test_causal(config):
    model, params, ids = _init(config)
    logits = model.apply({"params": params}, ids)
    assert logits.shape == (2, 12, 32) and logits.dtype == jnp.float32
    assert _changed_positions(model, params, ids, 5) <= set(range(5, 12))
    assert 5 in _changed_positions(model, params, ids, 5)


def test_gpt2_parameter_count_and_tied_head():
    model = build_model({"name": "gpt2"})
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(shapes["params"]), sep="/")
    assert not any("lm_head" in k for k in flat)
    d, layers = 768, 12
    want = 50304 * d + 1024 * d + layers * (12 * d * d + 2 * d) + d  # no biases
    assert sum(np.prod(v.shape) for v in flat.values()) == want


def test_gpt2_init_std_and_tied_logits():
    config = {**GPT2, "embed_dim": 64, "num_heads": 4, "vocab_size": 512, "num_layers": 8}
    model, params, ids = _init(config)
    np.testing.assert_allclose(np.std(params["embedding"]["wte"]), 0.02, rtol=0.05)
    c_proj = params["block_0"]["ffn"]["c_proj"]["kernel"]
    np.testing.assert_allclose(np.std(c_proj), 0.02 / np.sqrt(16), rtol=0.05)
    _, inter = model.apply({"params": params}, ids, capture_intermediates=True)
    hidden = inter["intermediates"]["final_norm"]["__call__"][0]
    logits = model.apply({"params": params}, ids)
    np.testing.assert_allclose(logits, hidden @ params["embedding"]["wte"].T, atol=1e-5)


def test_gpt2_rejects_sequences_past_context():
    model, params, _ = _init(GPT2)
    with pytest.raises(ValueError, match="context_length is 24"):
        model.apply({"params": params}, jnp.zeros((1, 25), jnp.int32))


def test_gpt2_dropout_uses_rng():
    config = {**GPT2, "dropout_rate": 0.3}
    model, params, ids = _init(config)
    a = model.apply({"params": params}, ids, deterministic=False,
                    rngs={"dropout": jax.random.key(0)})
    b = model.apply({"params": params}, ids, deterministic=False,
                    rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model.apply({"params": params}, ids),
                                  model.apply({"params": params}, ids))


def test_llama_untied_head_and_no_position_parameters():
    model, params, ids = _init(LLAMA)
    assert params["embedding"]["lm_head"].shape == (16, 32)
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    assert not any("wpe" in k for k in flat)
    assert not any("bias" in k for k in flat)
    assert jnp.isfinite(model.apply({"params": params}, jnp.tile(ids, (1, 4)))).all()


def test_short_long_receptive_field():
    """One layer: token j reaches t iff t - window < j <= t (short) or j <= t - m (long)."""
    config = {**SHORT_LONG, "num_layers": 1}
    model, params, ids = _init(config, length=14)
    window, m, j = 4, 6, 3
    changed = _changed_positions(model, params, ids, j, long_term_skip=m)
    want = {t for t in range(14) if t - window < j <= t or j <= t - m}
    assert changed == want
    # inference default m = 3
    changed = _changed_positions(model, params, ids, j)
    assert changed == {t for t in range(14) if t - window < j <= t or j <= t - 3}


def test_short_long_draws_skip_from_rng_without_recompiling():
    model, params, ids = _init(SHORT_LONG, length=16)
    traces = []

    @jax.jit
    def forward(rng):
        traces.append(1)
        return model.apply({"params": params}, ids, deterministic=False, rngs={"skip": rng})

    outs = [forward(jax.random.key(s)) for s in range(6)]
    assert len(traces) == 1
    assert any(not np.allclose(outs[0], o) for o in outs[1:])


def test_unknown_and_bad_inputs():
    with pytest.raises(ValueError, match="no config key"):
        build_model({**LLAMA, "num_head": 3})
    model, params, ids = _init(LLAMA)
    with pytest.raises(ValueError, match="input_ids must be integers"):
        model.apply({"params": params}, ids.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"\[batch, time\]"):
        model.apply({"params": params}, ids[0])
    with pytest.raises(ValueError, match="long_term_skip_range"):
        _init({**SHORT_LONG, "long_term_skip_range": (5, 2)})
    with pytest.raises(ValueError, match="no long-term attention"):
        model.apply({"params": params}, ids, long_term_skip=3)


@pytest.mark.parametrize("config", [GPT2, LLAMA, SHORT_LONG], ids=lambda c: c["name"])
def test_remat_same_values_and_gradients(config):
    model, params, ids = _init(config)
    remat = build_model({**config, "remat": "full"})

    def loss(m, p):
        return jnp.sum(m.apply({"params": p}, ids) ** 2)

    np.testing.assert_allclose(loss(remat, params), loss(model, params), rtol=1e-6)
    g1 = jax.jit(jax.grad(lambda p: loss(model, p)))(params)
    g2 = jax.jit(jax.grad(lambda p: loss(remat, p)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g2)
