"""The fused, chunked LM head + cross-entropy (mmjax.ops.lm_head_loss) equals the dense one,
in value and gradients; never materialises the batch's logits; never lets a target wrap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.config import default_config, validate_config, with_defaults
from mmjax.ops import cross_entropy, lm_head_loss
from mmjax.train.loop import Trainer


def _case(b=3, t=20, d=16, n=50, dtype=jnp.float32, ignore_all=False):
    ks = jax.random.split(jax.random.key(1), 3)
    h = jax.random.normal(ks[0], (b, t, d)).astype(dtype)
    w = (0.3 * jax.random.normal(ks[1], (d, n))).astype(dtype)
    y = jax.random.randint(ks[2], (b, t), -1, n)
    if ignore_all:
        y = jnp.full((b, t), -1)
    return h, w, y


def _dense(h, w, y, scale):
    logits = jnp.einsum("btd,dn->btn", h.astype(jnp.float32), w.astype(jnp.float32)) * scale
    return cross_entropy(logits, y)


@pytest.mark.parametrize("chunk", [1, 7, 20, 64])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_chunked_equals_dense_in_value_and_gradient(chunk, scale):
    h, w, y = _case()

    def value(fn):
        def loss(h, w):
            total, per_position, tokens = fn(h, w)
            return total + 0.1 * jnp.sum(per_position ** 2), (per_position, tokens)
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(h, w)

    (want, (want_pp, want_n)), want_g = value(lambda h, w: _dense(h, w, y, scale))
    (got, (got_pp, got_n)), got_g = value(
        lambda h, w: lm_head_loss(h, w, y, logit_scale=scale, chunk=chunk))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got_pp, want_pp, rtol=1e-6)
    assert int(got_n) == int(want_n) == int(jnp.sum(y != -1))
    for g, w_ in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(g, w_, rtol=1e-5, atol=1e-7)


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    h, w, y = _case(ignore_all=True)
    loss, grads = jax.value_and_grad(
        lambda h, w: lm_head_loss(h, w, y, chunk=8)[0], argnums=(0, 1))(h, w)
    assert float(loss) == 0.0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def test_bf16_hidden_matches_dense_bf16_products():
    h, w, y = _case(dtype=jnp.bfloat16)
    want = cross_entropy(jnp.einsum("btd,dn->btn", h, w, preferred_element_type=jnp.float32), y)
    got = lm_head_loss(h, w, y, chunk=8)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    dh = jax.grad(lambda h: lm_head_loss(h, w, y, chunk=8)[0])(h)
    assert dh.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(dh.astype(jnp.float32))))


@pytest.mark.parametrize("bad", [50, 999, -2])
def test_out_of_range_targets_never_wrap(bad):
    h, w, y = _case()
    y = y.at[1, 3].set(bad)
    for chunk in (0, 8):
        with pytest.raises(ValueError, match=rf"target id {bad} at position \(1, 3\) is "
                                             r"outside the vocabulary \[0, 50\)"):
            lm_head_loss(h, w, y, chunk=chunk)
        traced = jax.jit(lambda h, w, y, c=chunk: lm_head_loss(h, w, y, chunk=c)[0])(h, w, y)
        assert np.isnan(float(traced))


def test_chunked_loss_never_holds_the_batch_logits():
    """Compiled loss and gradients: XLA's temporaries stay far below one fp32 copy of the
    [batch, time, vocab] logits (the dense path needs several)."""
    b, t, d, n = 4, 512, 32, 4096
    h, w, y = _case(b=b, t=t, d=d, n=n)
    logits_bytes = b * t * n * 4

    def temp(chunk):
        fn = jax.jit(jax.grad(lambda h, w: lm_head_loss(h, w, y, chunk=chunk)[0],
                              argnums=(0, 1)))
        return fn.lower(h, w).compile().memory_analysis().temp_size_in_bytes

    assert temp(0) >= logits_bytes
    assert temp(32) < logits_bytes / 4


def _tiny(name):
    config = default_config()
    if name == "gpt2":
        config.model = dict(name="gpt2", vocab_size=64, num_layers=1, num_heads=2,
                            embed_dim=16, context_length=24, mlp_dim=32, dropout_rate=0.0)
    else:
        config.model.update(vocab_size=64, num_layers=1, num_heads=2, embed_dim=16,
                            pmem_size=8)
    config.data.update(context_length=24, batch_size=8)
    config.train.update(num_steps=2, eval_batches=1)
    return config


@pytest.mark.parametrize("name", ["memory_mosaic", "gpt2"])
def test_train_step_with_and_without_chunks_agree(name):
    results = []
    for chunk in (0, 5):
        config = _tiny(name)
        config.train.loss_chunk = chunk
        trainer = Trainer(config)
        state = trainer.init_state()
        losses = []
        for step in range(2):
            state, metrics = trainer.train_step(state, trainer.batch(step))
            losses.append(float(metrics["loss"]))
        results.append((losses, state.params))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [-1, 1.5, "8"])
def test_loss_chunk_is_validated(value):
    config = _tiny("gpt2")
    config.train = dict(config.train.to_dict(), loss_chunk=value)
    config = with_defaults(config)
    with pytest.raises(ValueError, match=rf"train.loss_chunk={value!r}: must be an integer >= 0"):
        validate_config(config)
