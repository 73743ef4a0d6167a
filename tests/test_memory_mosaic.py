"""v1 Memory Mosaic: modules, model, causality, dropout, optimiser rules, config presets."""

import importlib.util
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.layers.memory import ContextualMemory, MemoryUnitConfig, PersistentMemory
from mmjax.models import build_model
from mmjax.models.memory_mosaic import MemoryMosaic, MemoryMosaicBlock
from mmjax.ops import MaskSpec, retrieval_weights, retrieve_reference
from mmjax.train import decay_mask, learning_rate_schedule, make_optimizer

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
TINY = dict(vocab_size=17, num_layers=2, num_heads=2, embed_dim=16, pmem_size=6)


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
    block = MemoryMosaicBlock(config=model.unit_config())

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
    model = MemoryMosaic(**TINY, ic_dropout=0.3, hd_dropout=0.3, impl="xla")
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
    """hd_dropout = 0: only ic_dropout on the slot probabilities changes the output."""
    x = jax.random.normal(jax.random.key(1), (2, 6, 8))
    module = PersistentMemory(config=MemoryUnitConfig(num_heads=2, pmem_size=4, pmem_count=2,
                                                      ic_dropout=0.5))
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
    with pytest.raises(ValueError, match="embed_dim=16 must be divisible by num_heads=3"):
        MemoryMosaic(**{**TINY, "num_heads": 3}).init(jax.random.key(0), jnp.zeros((1, 4),
                                                                                  jnp.int32))
    with pytest.raises(ValueError, match="hd_dropout"):
        MemoryMosaic(**TINY, hd_dropout=1.5).init(jax.random.key(0), jnp.zeros((1, 4),
                                                                              jnp.int32))
    with pytest.raises(ValueError, match="x must be"):
        ContextualMemory(config=MemoryUnitConfig(num_heads=2)).init(jax.random.key(0),
                                                                    jnp.zeros((4, 8)))


# ----------------------------------------------------------------------------- optimiser


def test_decay_mask_follows_rank_and_bias_names():
    model = MemoryMosaic(**TINY, use_bias=True)
    boxed = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    for params in (boxed, nn.unbox(boxed)):
        mask = nn.unbox(decay_mask(params))
        ctx, per = mask["block_0"]["mixer"], mask["block_0"]["ffn"]
        assert mask["embedding"]["wte"] and ctx["key"] and ctx["value"]
        assert ctx["out"]["kernel"] and per["memory_keys"] and per["memory_values"]
        assert not any([ctx["key_bias"], ctx["value_bias"], ctx["out"]["bias"],
                        ctx["leaky_key_beta"], ctx["kernel_beta"], ctx["value_beta"],
                        ctx["value_mix"], mask["final_norm"]["scale"],
                        mask["final_norm"]["bias"]])


def _official_cosine_lr(it, learning_rate, min_lr, lr_decay_iters, warmup_iters):
    """The official schedule (Library utils.get_cosine_lr), restated for the test."""
    if it < warmup_iters:
        return learning_rate * it / warmup_iters
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def test_schedule_is_the_official_warmup_cosine():
    schedule = learning_rate_schedule(5e-3, warmup_steps=20, total_steps=100, min_lr=1e-4)
    for step in (0, 1, 10, 20, 21, 50, 99, 100, 150):
        assert float(schedule(step)) == pytest.approx(
            _official_cosine_lr(step, 5e-3, 1e-4, 100, 20), rel=1e-5, abs=1e-9)
    constant = learning_rate_schedule(1e-3)
    assert float(constant(0)) == float(constant(10_000)) == pytest.approx(1e-3)
    warm = learning_rate_schedule(1e-3, warmup_steps=10)
    assert float(warm(5)) == pytest.approx(5e-4) and float(warm(500)) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="total_steps"):
        learning_rate_schedule(1e-3, warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="min_lr"):
        learning_rate_schedule(1e-3, min_lr=1e-4)


def test_optimizer_clips_and_decays_matrices_only():
    params = {"kernel": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
    grads = {"kernel": jnp.full((2, 2), 50.0), "scale": jnp.zeros((2,))}  # global norm 100
    # eps = 1 makes Adam's first step lr * g / (|g| + 1): it sees the gradient's magnitude.
    kwargs = dict(weight_decay=0.5, b1=0.9, b2=0.95, eps=1.0)
    for grad_clip, g in ((1.0, 0.5), (None, 50.0)):  # clipped: 50 * 1/100 = 0.5
        opt = make_optimizer(0.1, grad_clip=grad_clip, **kwargs)
        updates, _ = opt.update(grads, opt.init(params), params)
        np.testing.assert_allclose(updates["kernel"], -0.1 * g / (g + 1.0) - 0.1 * 0.5,
                                   rtol=1e-5)
        np.testing.assert_allclose(updates["scale"], 0.0, atol=1e-7)  # no decay on vectors
    with pytest.raises(ValueError, match="grad_clip"):
        make_optimizer(0.1, weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, grad_clip=-1.0)


# ----------------------------------------------------------------------------- configs


def _load_config(path, arg=None):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("preset", [None, "tiny"])
def test_mm_v1_small_presets_build(preset):
    config = _load_config(CONFIGS / "mm_v1_small.py", preset)
    model = build_model(config.model)
    assert isinstance(model, MemoryMosaic)
    ids = jax.ShapeDtypeStruct((2, config.data.context_length), jnp.int32)
    shapes = jax.eval_shape(lambda ids: model.init(jax.random.key(0), ids), ids)
    logits = jax.eval_shape(
        lambda p, ids: model.apply(p, ids), shapes, ids)
    assert logits.shape == (2, config.data.context_length, config.model.vocab_size)
    assert "vocab_size" not in config.data
    optimizer = make_optimizer(**config.optimizer)
    jax.eval_shape(optimizer.init, nn.unbox(shapes["params"]))
    if preset is None:
        count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
        # 12 * 12 * 768^2 (GPT2-small-like block budget) + tied 50304 x 768 embedding
        assert count == pytest.approx(12 * 12 * 768**2 + 50304 * 768, rel=1e-3)


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="preset"):
        _load_config(CONFIGS / "mm_v1_small.py", "huge")
