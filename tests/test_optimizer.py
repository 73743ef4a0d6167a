"""The optimiser factory: weight-decay rule, schedules, clipping, Adam with and without bias
correction (the one factory of the language models and the three-moons net)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.models import build_model
from mmjax.train import decay_mask, learning_rate_schedule, make_optimizer
from mmjax.train.optimizer import scale_by_adam_uncorrected

TINY = dict(vocab_size=17, num_layers=2, num_heads=2, embed_dim=16, pmem_size=6)


def test_decay_mask_follows_rank_and_bias_names():
    model = build_model(dict(name="memory_mosaic", **TINY, use_bias=True))
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


def test_linear_schedule_is_the_three_moons_one():
    linear = learning_rate_schedule(1e-2, total_steps=500, min_lr=5e-6, schedule="linear")
    reference = optax.linear_schedule(1e-2, 5e-6, 500)
    for step in (0, 1, 250, 499, 500, 800):
        assert float(linear(step)) == float(reference(step))
    warm = learning_rate_schedule(1e-2, warmup_steps=10, total_steps=110, min_lr=0.0,
                                  schedule="linear")
    assert float(warm(5)) == pytest.approx(5e-3) and float(warm(60)) == pytest.approx(5e-3)
    with pytest.raises(ValueError, match="schedule"):
        learning_rate_schedule(1e-2, schedule="step")


def test_without_bias_correction_is_mlx_adam_on_the_schedule():
    params = {"w": jnp.array([[1.0, -2.0]])}
    grads = {"w": jnp.array([[0.3, -0.01]])}
    opt = make_optimizer(1e-2, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=None,
                         total_steps=500, min_lr=5e-6, schedule="linear", bias_correction=False)
    reference = optax.chain(scale_by_adam_uncorrected(0.9, 0.999, 1e-8),
                            optax.scale_by_learning_rate(optax.linear_schedule(1e-2, 5e-6, 500)))
    state, ref_state = opt.init(params), reference.init(params)
    for _ in range(3):
        updates, state = opt.update(grads, state, params)
        want, ref_state = reference.update(grads, ref_state, params)
        np.testing.assert_array_equal(updates["w"], want["w"])
    corrected = make_optimizer(1e-2, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                               grad_clip=None)
    first, _ = corrected.update(grads, corrected.init(params), params)
    uncorrected, _ = opt.update(grads, opt.init(params), params)
    # step 1: the uncorrected step is (1 - b1) / sqrt(1 - b2) = 3.16 times larger
    np.testing.assert_allclose(uncorrected["w"] / first["w"], 0.1 / math.sqrt(0.001),
                               rtol=1e-3)

