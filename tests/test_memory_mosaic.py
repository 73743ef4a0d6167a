"""v1 Memory Mosaic: modules, model, causality, dropout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.layers.memory import ContextualMemory, MemoryUnitConfig, PersistentMemory
from mmjax.models import build_model
from mmjax.models.memory_mosaic import MemoryMosaicBlock
from mmjax.ops import MaskSpec, retrieval_weights, retrieve_reference

TINY = dict(vocab_size=17, num_layers=2, num_heads=2, embed_dim=16, pmem_size=6)


def MemoryMosaic(**fields):  # noqa: N802 (reads as the class it builds)
    """The v1 model from flat config keys, as a config builds it."""
    return build_model({"name": "memory_mosaic", **fields})


def _init(module, x, **kwargs):
    return nn.unbox(module.init(jax.random.key(0), x, **kwargs)["params"])


def test_memory_units_shapes_and_parameter_axes():
    x = jax.random.normal(jax.random.key(1), (2, 7, 16))
    config = MemoryUnitConfig(num_heads=4, pmem_size=5, pmem_count=2)
    for module in (ContextualMemory(config=config), PersistentMemory(config=config)):
        boxed = module.init(jax.random.key(0), x)["params"]
        y = module.apply({"params": boxed}, x)
        assert y.shape == x.shape and y.dtype == jnp.float32
        assert boxed["key"].names == ("embed", "heads", "head_dim")
        assert boxed["out"]["kernel"].names == ("heads", "head_dim", "embed")
        assert boxed["kernel_beta"].names == ("heads",)
    assert boxed["memory_keys"].value.shape == (2, 5, 4, 4)
    assert boxed["memory_keys"].names == ("banks", "slots", "heads", "head_dim")


def test_contextual_memory_is_zero_at_first_position_before_projection():
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    module = ContextualMemory(config=MemoryUnitConfig(num_heads=2, use_bias=True))
    params = _init(module, x)
    _, state = module.apply({"params": params}, x, mutable=["intermediates"])
    retrieved = state["intermediates"]["retrieved"][0]
    np.testing.assert_array_equal(retrieved[:, 0], 0.0)
    assert np.all(np.abs(retrieved[:, 1:]) > 0)


def test_official_initial_values():
    model = MemoryMosaic(vocab_size=64, num_layers=4, num_heads=4, embed_dim=256, pmem_size=64)
    params = _init(model, jnp.zeros((1, 3), jnp.int32))
    ctx = params["block_0"]["mixer"]
    np.testing.assert_allclose(ctx["leaky_key_beta"], np.linspace(0.5, 5, 4) / 10, rtol=1e-6)
    np.testing.assert_allclose(ctx["kernel_beta"], 0.1)
    np.testing.assert_allclose(ctx["value_beta"], -0.05)
    assert np.all((ctx["value_mix"] >= 0) & (ctx["value_mix"] < 1))
    std = lambda a: float(np.std(np.asarray(a)))
    assert std(params["embedding"]["wte"]) == pytest.approx(256**-0.5, rel=0.05)
    assert std(ctx["key"]) == pytest.approx(256**-0.5, rel=0.05)
    assert std(ctx["out"]["kernel"]) == pytest.approx(256**-0.5 / 2, rel=0.05)  # 1/sqrt(L)
    assert std(params["block_0"]["ffn"]["memory_keys"]) == pytest.approx(64**-0.5,
                                                                                rel=0.05)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_blocks_are_causal_by_gradient(impl):
    """Block outputs at t have zero gradient w.r.t. inputs after t (and nonzero up to t)."""
    model = MemoryMosaic(**TINY, impl=impl)
    params = _init(model, jnp.zeros((1, 9), jnp.int32))
    block = MemoryMosaicBlock(config=model.config, memory=model.unit_config())

    def stack(x_BxTxD):
        for i in range(TINY["num_layers"]):
            x_BxTxD = block.apply({"params": params[f"block_{i}"]}, x_BxTxD)
        return x_BxTxD

    x = jax.random.normal(jax.random.key(3), (1, 9, 16))
    jac_TxT = np.abs(np.asarray(
        jax.jacrev(lambda x: jnp.sum(stack(x)[0] ** 2, axis=-1))(x)[:, 0])).sum(axis=-1)
    np.testing.assert_array_equal(np.triu(jac_TxT, k=1), 0.0)  # output t vs input s > t
    assert np.all(np.tril(jac_TxT)[np.tril_indices(9)] > 0)


def test_logits_do_not_change_when_future_tokens_change():
    model = MemoryMosaic(**TINY, impl="xla")
    ids = jax.random.randint(jax.random.key(2), (2, 9), 0, TINY["vocab_size"])
    params = _init(model, ids)
    base = model.apply({"params": params}, ids)
    t = 4
    changed = ids.at[:, t + 1].set((ids[:, t + 1] + 5) % TINY["vocab_size"])
    out = model.apply({"params": params}, changed)
    np.testing.assert_array_equal(out[:, : t + 1], base[:, : t + 1])
    assert not np.allclose(out[:, t + 1:], base[:, t + 1:])


def test_model_output_shape_dtype_and_bf16_compute():
    ids = jnp.zeros((3, 5), jnp.int32)
    for dtype in (jnp.float32, jnp.bfloat16):
        model = MemoryMosaic(**TINY, dtype=dtype, impl="xla")
        params = _init(model, ids)
        assert params["embedding"]["wte"].dtype == jnp.float32
        logits = model.apply({"params": params}, ids)
        assert logits.shape == (3, 5, TINY["vocab_size"]) and logits.dtype == jnp.float32
        assert np.all(np.isfinite(logits))


def test_dropout_only_when_not_deterministic():
    model = MemoryMosaic(**TINY, pmem_attention_dropout=0.3, dropout_rate=0.3, impl="xla")
    ids = jax.random.randint(jax.random.key(2), (2, 8), 0, TINY["vocab_size"])
    params = _init(model, ids)
    apply = lambda rng, deterministic: model.apply(
        {"params": params}, ids, deterministic=deterministic, rngs={"dropout": rng})
    eval_a, eval_b = apply(jax.random.key(1), True), apply(jax.random.key(2), True)
    np.testing.assert_array_equal(eval_a, eval_b)
    plain = MemoryMosaic(**TINY, impl="xla").apply({"params": params}, ids)
    np.testing.assert_allclose(eval_a, plain, atol=1e-6)
    train_a, train_b = apply(jax.random.key(1), False), apply(jax.random.key(2), False)
    assert not np.allclose(train_a, eval_a) and not np.allclose(train_a, train_b)


def test_persistent_dropout_acts_on_probabilities():
    """dropout_rate = 0: only pmem_attention_dropout on the slot probabilities changes the
    output."""
    x = jax.random.normal(jax.random.key(1), (2, 6, 8))
    module = PersistentMemory(config=MemoryUnitConfig(num_heads=2, pmem_size=4, pmem_count=2,
                                                      pmem_attention_dropout=0.5))
    params = _init(module, x)
    y_eval = module.apply({"params": params}, x)
    draws = [module.apply({"params": params}, x, deterministic=False,
                          rngs={"dropout": jax.random.key(i)}) for i in range(200)]
    assert not np.allclose(draws[0], y_eval)
    # inverted dropout keeps the expectation: the mean over draws approaches the eval output
    np.testing.assert_allclose(np.mean(draws, axis=0), y_eval, atol=0.15 * np.abs(y_eval).max())


def test_retrieval_weights_times_values_is_the_reference():
    k = jax.random.normal(jax.random.key(0), (2, 7, 3, 4))
    v = jax.random.normal(jax.random.key(1), (2, 7, 3, 5))
    beta = jnp.full((7, 3), 0.7)
    w = retrieval_weights(k, k, beta, MaskSpec(), jnp.int32(0))
    np.testing.assert_array_equal(w[:, :, 0], 0.0)
    np.testing.assert_allclose(w[:, :, 1:].sum(-1), 1.0, rtol=1e-6)
    y = jnp.einsum("bhqt,bthv->bqhv", w, v)
    np.testing.assert_allclose(y, retrieve_reference(k, k, v, beta, MaskSpec(), jnp.int32(0)),
                               rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    model = MemoryMosaic(**TINY)
    params = _init(model, jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="input_ids"):
        model.apply({"params": params}, jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match="input_ids"):
        model.apply({"params": params}, jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="num_heads=3 must divide model.embed_dim=16"):
        MemoryMosaic(**{**TINY, "num_heads": 3})
    with pytest.raises(ValueError, match="dropout_rate"):
        MemoryMosaic(**TINY, dropout_rate=1.5)
    with pytest.raises(ValueError, match="pmem_attention_dropout"):
        MemoryMosaic(**TINY, pmem_attention_dropout=1.5).init(
            jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="x must be"):
        ContextualMemory(config=MemoryUnitConfig(num_heads=2)).init(jax.random.key(0),
                                                                    jnp.zeros((4, 8)))
