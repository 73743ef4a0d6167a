"""Text batches feeding the existing trainer: a killed and resumed run equals an uninterrupted one.

Uses only the trainer's public pieces (``Trainer``: ``init_state``, ``train_step``,
``batch_sharding``) and Orbax directly, saving the grain iterator beside the train state as
the trainer integration will.
"""

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmjax.config import default_config
from mmjax.data import make_batches, stories
from mmjax.train.loop import Trainer

CONTEXT, BATCH = 32, 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    store_dir, tok = stories.make_story_store(root, 600, seed=5)
    config = default_config()
    config.model.vocab_size = tok.vocab_size
    config.model.num_layers = 1
    config.model.embed_dim = 32
    config.model.pmem_size = 64
    # the trainer reads the synthetic corpus of this config; the batches below come from the store
    if "vocab_size" in config.data:  # said twice by older configs
        config.data.vocab_size = tok.vocab_size
    config.data.context_length, config.data.batch_size = CONTEXT, BATCH
    data = dict(corpus="tokens", path=str(store_dir), context_length=CONTEXT,
                batch_size=BATCH)
    return {"trainer": Trainer(config), "data": data}


def run(trainer, state, it, steps):
    seen = []
    for _ in range(steps):
        batch = next(it)
        seen.append(np.asarray(batch))
        state, metrics = trainer.train_step(state, batch)
        # one step in flight at a time: hundreds of queued steps on 8 fake CPU devices can
        # starve XLA's all-reduce rendezvous on 2 cores (a 40 s abort, not a data problem)
        jax.block_until_ready(metrics)
    return state, seen


def test_killed_and_resumed_run_equals_an_uninterrupted_one(setup, tmp_path):
    trainer, data = setup["trainer"], setup["data"]
    total, kill_at = 9, int(np.random.default_rng().integers(1, 8))

    def batches():
        return make_batches(data, vocab_size=trainer.config.model.vocab_size, seed=11,
                            sharding=trainer.batch_sharding)

    reference, reference_batches = run(trainer, trainer.init_state(), batches(), total)
    reference_params = jax.device_get(reference.params)

    # the run that is killed after `kill_at` steps, right after a checkpoint
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    it = batches()
    state, first = run(trainer, trainer.init_state(), it, kill_at)
    manager.save(kill_at, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    del state, it

    # a fresh process would do this: build everything again, restore both, go on
    fresh_state, fresh_it = trainer.init_state(), batches()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          fresh_state)
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=grain.checkpoint.CheckpointRestore(fresh_it)))
    manager.close()
    assert int(restored["state"].step) == kill_at
    final, rest = run(trainer, restored["state"], fresh_it, total - kill_at)

    np.testing.assert_array_equal(np.stack(first + rest), np.stack(reference_batches))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(final.params), reference_params)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the store's token frequencies: the loss of the best context-free
    predictor, which a language model must beat."""
    p = np.bincount(tokens, minlength=vocab_size) / len(tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_tiny_model_learns_the_stories_below_the_unigram_entropy(setup):
    import functools

    from flax import linen as nn

    from mmjax.data import TokenStore
    from mmjax.train.step import eval_step

    trainer, data = setup["trainer"], setup["data"]
    store = TokenStore(data["path"])
    assert store.vocab_size == trainer.config.model.vocab_size
    entropy = unigram_entropy(np.asarray(store.split("train").tokens), store.vocab_size)
    vocab_size = trainer.config.model.vocab_size
    state, _ = run(trainer, trainer.init_state(), make_batches(
        data, vocab_size=vocab_size, seed=0, sharding=trainer.batch_sharding), 250)
    evaluate = jax.jit(functools.partial(eval_step, model=trainer.model))
    val = make_batches(data, vocab_size=vocab_size, split="val", sharding=trainer.batch_sharding)
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
        losses = [float(evaluate(state.params, next(val))["loss"]) for _ in range(4)]
    val_loss = float(np.mean(losses))
    print(f"val loss {val_loss:.3f}, unigram entropy {entropy:.3f}")
    assert val_loss < 0.6 * entropy, (val_loss, entropy)
