"""Training: loss, a run that learns, sharding on a fake 8-device mesh, exact resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.config import default_config
from mmjax.ops import cross_entropy
from mmjax.train.loop import Reporter, Trainer, train_and_evaluate


def small_config(num_steps=20, mesh=(-1, 1, 1)):
    config = default_config()
    config.model.update(dict(vocab_size=16, num_layers=1, num_heads=2, embed_dim=16,
                             pmem_size=8))
    config.data.update(dict(context_length=24, batch_size=8))
    config.data.corpus_options.update(dict(num_states=3, edges_per_state=2))
    config.optimizer.update(dict(learning_rate=1e-2, warmup_steps=2, total_steps=num_steps))
    config.train.update(dict(num_steps=num_steps, log_every=5, eval_every=0, eval_batches=1))
    config.sharding.mesh = mesh
    return config


def test_cross_entropy_ignores_minus_one():
    logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    loss, per_pos, tokens = cross_entropy(logits, jnp.array([[0, -1, 1]]))
    np.testing.assert_allclose(loss, -(np.log(0.5) + np.log(0.8)) / 2, rtol=1e-6)
    np.testing.assert_allclose(per_pos, [-np.log(0.5), 0.0, -np.log(0.8)], rtol=1e-6)
    assert int(tokens) == 2


def test_training_lowers_the_loss():
    out = train_and_evaluate(small_config(num_steps=60), progress=False)
    losses = [h["loss"] for h in out["history"]]
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 0.2
    assert out["eval_loss_per_position"].shape == (24,)


def test_sharded_mesh_matches_data_parallel():
    """Params sharded over fsdp x tensor give the same step as plain data parallelism."""
    assert jax.device_count() == 8
    results = []
    for mesh in [(8, 1, 1), (2, 2, 2)]:
        trainer = Trainer(small_config(mesh=mesh))
        state = trainer.init_state()
        state, metrics = trainer.train_step(state, trainer.batch(0))
        results.append((float(metrics["loss"]), jax.device_get(state.params)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_sharding_annotations_split_parameters():
    trainer = Trainer(small_config(mesh=(2, 2, 2)))
    state = trainer.init_state()
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
    assert any("fsdp" in s for s in specs), specs
    assert any("tensor" in s for s in specs), specs


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    config = small_config(num_steps=6)
    config.checkpoint.save_every = 3
    straight = train_and_evaluate(config, str(tmp_path / "a"), progress=False)
    config.train.num_steps = 3
    train_and_evaluate(config, str(tmp_path / "b"), progress=False)
    config.train.num_steps = 6
    resumed = train_and_evaluate(config, str(tmp_path / "b"), progress=False)
    assert int(resumed["state"].step) == 6
    assert [h["step"] for h in resumed["history"]] == [4, 5, 6]
    for a, b in zip(jax.tree.leaves(straight["state"].params),
                    jax.tree.leaves(resumed["state"].params)):
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "b" / "metrics.jsonl").read_text().count("\n") >= 3


def test_config_errors_name_the_problem():
    config = small_config(mesh=(8, 1, 1))
    config.data.batch_size = 4
    with pytest.raises(ValueError, match="batch_size=4 must be a multiple"):
        Trainer(config)
    config = small_config()
    config.data.vocab_size = 32
    with pytest.raises(ValueError, match="said once, in model.vocab_size"):
        Trainer(config)
    config = small_config(mesh=(3, 1, 1))
    with pytest.raises(ValueError, match="devices"):
        Trainer(config)


def test_trainer_is_ready_when_constructed():
    """No hidden call order: shardings and steps exist before any state is made, and the
    eval step runs on a state made afterwards (or on any params with those shardings)."""
    trainer = Trainer(small_config(mesh=(2, 2, 2)))
    assert set(vars(trainer.state_shardings)) == {"step", "params", "opt_state", "rng"}
    ev = trainer.evaluate(trainer.init_state().params)
    assert np.isfinite(ev["eval_loss"])
    with trainer.mesh_context():
        assert jax.sharding.get_abstract_mesh().shape == trainer.mesh.shape


def test_reporter_reads_metrics_one_step_late():
    class Writer:
        def __init__(self):
            self.rows = []

        def write(self, step, metrics):
            self.rows.append(step)

    class Bar:
        def set_postfix(self, **kwargs):
            pass

    writer = Writer()
    reporter = Reporter(writer, Bar(), log_every=2, tokens_per_step=10)
    for step in (1, 2, 3):
        reporter.record(step, {"loss": jnp.float32(step), "grad_norm": jnp.float32(0)})
    assert [h["step"] for h in reporter.history] == [1, 2]  # step 3 is still pending
    reporter.flush()
    assert [h["step"] for h in reporter.history] == [1, 2, 3]
    assert writer.rows == [1, 2, 3] and reporter.tokens_seen == 30
