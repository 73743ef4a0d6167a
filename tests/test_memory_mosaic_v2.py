"""The Memory Mosaics v2 network: skip sampling, length extrapolation, dtype, errors."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.models import build_model

CONFIG = {"name": "memory_mosaic_v2", "vocab_size": 32, "num_layers": 2, "num_heads": 2,
          "embed_dim": 16, "mlp_dim": 32, "short_term_window": 4,
          "long_term_skip_range": (2, 6), "inference_long_term_skip": 2, "impl": "xla"}


def _init(config=CONFIG, length=16, seed=0):
    model = build_model(config)
    ids = jax.random.randint(jax.random.key(seed), (2, length), 0, config["vocab_size"])
    params = flax.core.meta.unbox(model.init(jax.random.key(1), ids)["params"])
    return model, params, ids


def test_causal_and_no_position_parameters():
    model, params, ids = _init()
    logits = model.apply({"params": params}, ids)
    assert logits.shape == (2, 16, 32) and logits.dtype == jnp.float32
    other = ids.at[:, 9].set((ids[:, 9] + 1) % 32)
    diff = np.abs(model.apply({"params": params}, other) - logits).max(axis=(0, 2))
    assert (diff[:9] == 0).all() and diff[9:].max() > 0
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    assert not any("wpe" in k or "bias" in k for k in flat)
    assert params["embedding"]["lm_head"].shape == (16, 32)  # untied


def test_skip_drawn_per_step_changes_output_without_recompiling():
    model, params, ids = _init()
    traces = []

    @jax.jit
    def forward(rng):
        traces.append(1)
        return model.apply({"params": params}, ids, deterministic=False,
                           rngs={"skip": rng, "dropout": rng})

    outs = [forward(jax.random.key(s)) for s in range(8)]
    assert len(traces) == 1
    assert any(not np.allclose(outs[0], o) for o in outs[1:])


def test_explicit_traced_skip_one_compilation_and_inference_default():
    model, params, ids = _init()
    traces = []

    @jax.jit
    def forward(m):
        traces.append(1)
        return model.apply({"params": params}, ids, long_term_skip=m)

    outs = {m: forward(jnp.int32(m)) for m in (2, 3, 6)}
    assert len(traces) == 1
    assert not np.allclose(outs[2], outs[6])
    # deterministic without an explicit skip uses inference_long_term_skip (2)
    np.testing.assert_allclose(model.apply({"params": params}, ids), outs[2], atol=1e-5)


def test_drawn_skip_is_in_range():
    """Every drawn m gives the output of one explicit m in [low, high]."""
    model, params, ids = _init()
    explicit_fn = jax.jit(lambda m: model.apply({"params": params}, ids, long_term_skip=m))
    drawn_fn = jax.jit(lambda rng: model.apply({"params": params}, ids, deterministic=False,
                                               rngs={"skip": rng}))
    explicit = [explicit_fn(jnp.int32(m)) for m in range(0, 9)]
    for s in range(5):
        out = drawn_fn(jax.random.key(s))
        matches = [m for m, e in enumerate(explicit) if np.allclose(out, e, atol=1e-6)]
        assert matches and all(2 <= m <= 6 for m in matches)


def test_trained_at_T_runs_at_4T():
    length = 8
    model, params, ids = _init(length=length)
    opt = optax.adam(1e-2)
    state = opt.init(params)

    def loss_fn(p, rng):
        logits = model.apply({"params": p}, ids[:, :-1], deterministic=False, rngs={"skip": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @jax.jit
    def step(p, s, rng):
        grads = jax.grad(loss_fn)(p, rng)
        updates, s = opt.update(grads, s)
        return optax.apply_updates(p, updates), s

    for i in range(3):
        params, state = step(params, state, jax.random.key(i))
    long_ids = jax.random.randint(jax.random.key(7), (2, 4 * length), 0, 32)
    shapes_t = jax.eval_shape(model.init, jax.random.key(0), ids)
    shapes_4t = jax.eval_shape(model.init, jax.random.key(0), long_ids)
    assert jax.tree.map(lambda a: a.shape, shapes_t) == jax.tree.map(lambda a: a.shape, shapes_4t)
    long_logits = model.apply({"params": params}, long_ids)
    assert jnp.isfinite(long_logits).all()
    np.testing.assert_allclose(long_logits[:, :length],
                               model.apply({"params": params}, long_ids[:, :length]), atol=1e-5)


def test_no_long_term_variant():
    model, params, ids = _init({**CONFIG, "long_term": False})
    assert "long_term" not in params["block_0"]["mixer"]
    assert params["block_0"]["mixer"]["out"]["kernel"].shape == (2, 8, 16)
    assert jnp.isfinite(model.apply({"params": params}, ids)).all()


def test_bfloat16_compute_fp32_params():
    model, params, ids = _init({**CONFIG, "dtype": "bfloat16"})
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))
    out16 = model.apply({"params": params}, ids)
    out32 = build_model({**CONFIG, "dtype": "float32"}).apply({"params": params}, ids)
    assert jnp.isfinite(out16).all()
    np.testing.assert_allclose(out16, out32, atol=0.1)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="long_term_skip_range"):
        _init({**CONFIG, "long_term_skip_range": (6, 2)})
    with pytest.raises(ValueError, match="num_heads=3 must divide model.embed_dim"):
        _init({**CONFIG, "num_heads": 3})
    with pytest.raises(ValueError, match="mask.skip must be >= 0"):
        model, params, ids = _init()
        model.apply({"params": params}, ids, long_term_skip=-1)


def test_remat_same_values_and_gradients():
    config = {**CONFIG, "impl": "reference", "num_layers": 1}  # fast to compile
    model, params, ids = _init(config, length=8)
    remat = build_model({**config, "remat": "full"})
    key = jax.random.key(3)

    def value_and_grad(m):
        def loss(p):
            out = m.apply({"params": p}, ids, deterministic=False, rngs={"skip": key})
            return jnp.sum(out ** 2)
        return jax.jit(jax.value_and_grad(loss))(params)

    (v1, g1), (v2, g2) = value_and_grad(model), value_and_grad(remat)
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g2)
    # the inference path passes a Python int skip through the rematerialised blocks
    np.testing.assert_allclose(remat.apply({"params": params}, ids),
                               model.apply({"params": params}, ids), rtol=1e-5, atol=1e-6)


PAGED = {**CONFIG, "long_term_memory": "paged", "long_term_page": 4}


def test_paged_long_term_memory_covering_every_page_is_the_exact_model():
    """24 tokens are 6 pages of 4: keeping 6 is exact retrieval, in logits and gradients."""
    model, params, ids = _init(length=24)
    paged = build_model({**PAGED, "long_term_top_pages": 6})
    np.testing.assert_allclose(paged.apply({"params": params}, ids),
                               model.apply({"params": params}, ids), atol=1e-5)
    loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, ids)))
    flat = lambda g: jax.tree.leaves(g)
    for got, want in zip(flat(jax.grad(loss(paged))(params)), flat(jax.grad(loss(model))(params)),
                         strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_paged_long_term_memory_with_fewer_pages_differs_only_where_pages_are_dropped():
    model, params, ids = _init(length=24)
    paged = build_model({**PAGED, "long_term_top_pages": 1})
    got, want = paged.apply({"params": params}, ids), model.apply({"params": params}, ids)
    diff = np.abs(np.asarray(got) - np.asarray(want)).max(axis=(0, 2))
    # inference skip 2: position t sees pairs 0..t-3, one page of 4 until t = 6
    assert diff[:7].max() < 1e-5 and diff[7:].max() > 1e-3
    grads = jax.grad(lambda p: jnp.sum(paged.apply({"params": p}, ids, deterministic=False,
                                                   rngs={"skip": jax.random.key(0)})))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("key,value,message", [
    ("long_term_memory", "fuzzy", "model.long_term_memory='fuzzy' must be one of"),
    ("long_term_page", 0, "model.long_term_page=0 must be an integer >= 1"),
    ("long_term_top_pages", 1.5, "model.long_term_top_pages=1.5 must be an integer >= 1"),
    ("long_term_page_dtype", "int4", "model.long_term_page_dtype='int4' must be one of"),
])
def test_bad_long_term_memory_settings_raise(key, value, message):
    with pytest.raises(ValueError, match=message):
        _init({**PAGED, key: value})
