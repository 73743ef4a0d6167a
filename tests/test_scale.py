"""Scale features of the train step: gradient accumulation, bf16 moments, and the same
training on every mesh layout of 8 fake devices for each model family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import small_config

from mmjax.train.loop import Trainer, train_and_evaluate
from mmjax.train.optimizer import make_optimizer

MODELS = {
    "memory_mosaic": dict(name="memory_mosaic", vocab_size=16, num_layers=2, num_heads=4,
                          embed_dim=32, pmem_size=8),
    "memory_mosaic_v2": dict(name="memory_mosaic_v2", vocab_size=16, num_layers=2,
                             num_heads=4, embed_dim=32, mlp_dim=48, short_term_window=8,
                             long_term_skip_range=(2, 6), inference_long_term_skip=2,
                             dtype="float32", scan_layers=True),
    "gpt2": dict(name="gpt2", vocab_size=16, context_length=24, num_layers=2, num_heads=4,
                 embed_dim=32, dtype="float32"),
    "llama": dict(name="llama", vocab_size=16, num_layers=2, num_heads=4, embed_dim=32,
                  mlp_dim=48, dtype="float32", scan_layers=True, remat="dots"),
}


def _config(model="memory_mosaic", mesh=(8, 1, 1), num_steps=3, **train):
    config = small_config(num_steps=num_steps, mesh=mesh)
    config.model = MODELS[model]
    config.train.update(train)
    return config


def _run(config, steps):
    trainer = Trainer(config)
    state = trainer.init_state()
    losses = []
    for step in range(steps):
        state, metrics = trainer.train_step(state, trainer.batch(step))
        losses.append(float(metrics["loss"]))  # blocks: one step in flight at a time
    return losses, jax.device_get(state.params)


@pytest.mark.parametrize("model", ["memory_mosaic", "memory_mosaic_v2"])
def test_gradient_accumulation_equals_the_large_batch(model):
    """4 micro-batches of 2 rows: the same loss and parameters as one batch of 8."""
    mesh = (2, 1, 4)  # 2 batch shards of 4 rows: each micro-batch keeps one row per shard
    large, params_large = _run(_config(model, mesh), 3)
    accum, params_accum = _run(_config(model, mesh, grad_accum_steps=4), 3)
    np.testing.assert_allclose(accum, large, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params_accum), jax.tree.leaves(params_large)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_must_divide_the_batch():
    with pytest.raises(ValueError, match="grad_accum_steps=3: data.batch_size=8 must be a "
                                         "multiple of grad_accum_steps"):
        Trainer(_config(mesh=(2, 1, 4), grad_accum_steps=3))
    with pytest.raises(ValueError, match="grad_accum_steps=2"):
        Trainer(_config(grad_accum_steps=2))  # 2 x 8 data devices > 8 rows


def test_bf16_first_moment_with_fp32_parameters():
    optimizer = make_optimizer(1e-3, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8,
                               grad_clip=1.0, moment_dtype="bfloat16")
    params = {"w": jnp.ones((4, 4), jnp.float32)}
    state = optimizer.init(params)
    dtypes = {(type(s).__name__, x.dtype.name) for s in jax.tree.leaves(
        state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")
        for x in (s.mu["w"], s.nu["w"])}
    assert dtypes == {("ScaleByAdamState", "bfloat16"), ("ScaleByAdamState", "float32")}
    config = _config()
    config.optimizer.moment_dtype = "bfloat16"
    out = train_and_evaluate(config, progress=False)
    assert all(np.isfinite(h["loss"]) for h in out["history"])
    assert {x.dtype.name for x in jax.tree.leaves(out["state"].params)} == {"float32"}


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_every_mesh_layout_gives_the_same_steps(model):
    """Data, FSDP and tensor parallel layouts: the same 3 losses within 1e-5."""
    results = {mesh: _run(_config(model, mesh=mesh), 3)[0]
               for mesh in [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]}
    base = results[(8, 1, 1)]
    for mesh, losses in results.items():
        np.testing.assert_allclose(losses, base, rtol=1e-5, err_msg=str(mesh))


def test_optimizer_moments_are_laid_out_like_the_parameters():
    """FSDP must split Adam's moments too, not only the parameters (they are 2/3 of the
    state); left to XLA, the zero-initialised moments came out replicated."""
    trainer = Trainer(_config("llama", mesh=(1, 4, 2)))
    shardings = trainer.state_shardings
    adam = next(s for s in jax.tree.leaves(shardings.opt_state, is_leaf=lambda s: hasattr(
        s, "mu")) if hasattr(s, "mu"))
    for moments in (adam.mu, adam.nu):
        for param, moment in zip(jax.tree.leaves(shardings.params), jax.tree.leaves(moments),
                                 strict=True):
            assert moment.spec == param.spec
    assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(adam.mu))
