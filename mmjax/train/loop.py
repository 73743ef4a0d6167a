"""The training loop: build from a config, shard, step, log, evaluate.

``train_and_evaluate(config, workdir)`` is what ``python -m mmjax.train`` calls. The loop reads
each step's metrics one step late, so the host never waits on the device between steps.
"""

from __future__ import annotations

import functools
import time

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from tqdm.auto import tqdm

from mmjax.data import make_corpus
from mmjax.models import build_model
from mmjax.train import sharding as sharding_lib
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.metrics import MetricWriter
from mmjax.train.optimizer import make_optimizer
from mmjax.train.state import create_train_state, init_variables
from mmjax.train.step import eval_step, train_step

# Optional settings a config may leave out, with the values the loop then uses.
OPTIONAL_SETTINGS = {
    "train": {"eval_every": 0, "eval_batches": 4},
    "sharding": {"mesh": (-1, 1, 1), "rules": None},
    "checkpoint": {"save_every": 0, "max_to_keep": 3},
}


def with_optional_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the optional sections and keys filled in."""
    config = ml_collections.ConfigDict(config.to_dict())
    for section, settings in OPTIONAL_SETTINGS.items():
        if section not in config:
            config[section] = ml_collections.ConfigDict()
        for key, value in settings.items():
            if key not in config[section]:
                config[section][key] = value
    return config


class Trainer:
    """Everything built from a config: model, optimiser, corpus, mesh and jitted steps."""

    def __init__(self, config: ml_collections.ConfigDict):
        config = with_optional_settings(config)
        self.config = config
        self.model = build_model(config.model)
        self.optimizer = make_optimizer(**config.optimizer)
        data = config.data
        if data.vocab_size != config.model.vocab_size:
            raise ValueError(f"data.vocab_size={data.vocab_size} differs from "
                             f"model.vocab_size={config.model.vocab_size}")
        self.corpus = make_corpus(data.corpus, vocab_size=data.vocab_size,
                                  seed=config.train.seed, **dict(data.get("corpus_options", {})))
        self.mesh = sharding_lib.make_mesh(config.sharding.mesh)
        self.rules = tuple(config.sharding.rules or sharding_lib.DEFAULT_RULES)
        batch_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if data.batch_size % batch_devices:
            raise ValueError(f"data.batch_size={data.batch_size} must be a multiple of the "
                             f"data x fsdp mesh size {batch_devices}")
        self.batch_sharding = sharding_lib.batch_sharding(self.mesh, self.rules)

    def _context(self):
        return _Contexts(jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules))

    def init_state(self):
        """A train state with parameters laid out on the mesh by their logical axes."""
        cfg = self.config
        init_rng, state_rng = jax.random.split(jax.random.key(cfg.train.seed))
        init = functools.partial(init_variables, self.model, batch_size=1,
                                 length=cfg.data.context_length)
        with self._context():
            abstract = jax.eval_shape(init, init_rng)
            shardings = sharding_lib.param_shardings(abstract, self.mesh, self.rules)["params"]
            params = jax.jit(lambda r: nn.meta.unbox(init(r))["params"],
                             out_shardings=shardings)(init_rng)
            state = jax.jit(create_train_state, static_argnums=1)(params, self.optimizer,
                                                                  state_rng)
        self.state_shardings = jax.tree.map(lambda x: x.sharding, state)
        replicated = sharding_lib.replicated(self.mesh)
        self._train_step = jax.jit(
            functools.partial(train_step, model=self.model, optimizer=self.optimizer),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,
        )
        self._eval_step = jax.jit(
            functools.partial(eval_step, model=self.model),
            in_shardings=(self.state_shardings.params, self.batch_sharding),
            out_shardings=replicated,
        )
        return state

    def batch(self, step: int, split: str = "train") -> jax.Array:
        d = self.config.data
        tokens = self.corpus.batch(step, d.batch_size, d.context_length + 1, split=split)
        # Every process makes the same global batch (a pure function of the step) and hands
        # over only the shards of its own devices: correct on multi-host pods too.
        return jax.make_array_from_callback(tokens.shape, self.batch_sharding,
                                            lambda index: tokens[index])

    def train_step(self, state, tokens):
        with self._context():
            return self._train_step(state, tokens)

    def evaluate(self, params) -> dict:
        """Mean loss and per-position loss over ``train.eval_batches`` held-out batches."""
        results = []
        with self._context():
            for i in range(self.config.train.eval_batches):
                results.append(jax.device_get(self._eval_step(params, self.batch(i, "eval"))))
        weights = np.array([r["tokens"] for r in results], np.float64)
        loss = float(np.average([r["loss"] for r in results], weights=weights))
        per_position = np.mean([r["loss_per_position"] for r in results], axis=0)
        return {"eval_loss": loss, "eval_loss_per_position": per_position}


class _Contexts:
    def __init__(self, *contexts):
        self.contexts = contexts

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None = None,
                       *, progress: bool = True) -> dict:
    """Train ``config.train.num_steps`` steps; returns the final train and eval metrics."""
    trainer = Trainer(config)
    config = trainer.config
    state = trainer.init_state()
    tcfg = config.train
    checkpointer = _make_checkpointer(config, workdir)
    if checkpointer is not None and checkpointer.latest_step() is not None:
        state = checkpointer.restore(state)
        _log(f"resumed from {checkpointer.directory} at step {int(state.step)}")
    writer = MetricWriter(workdir)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    _log(f"model {config.model.name}: {num_params:,} parameters; mesh {dict(trainer.mesh.shape)}")
    history, pending, tokens_seen = [], None, 0
    tokens_per_step = config.data.batch_size * config.data.context_length
    start_step = int(state.step)
    start = time.perf_counter()
    bar = tqdm(range(start_step, tcfg.num_steps), initial=start_step, total=tcfg.num_steps,
               disable=not progress or jax.process_index() != 0, desc="train",
               dynamic_ncols=True)
    for step in bar:
        state, metrics = trainer.train_step(state, trainer.batch(step))
        if pending is not None:  # read the previous step's metrics: no host sync per step
            _report(pending, bar, history, writer, tcfg.log_every, tokens_seen, start)
        tokens_seen += tokens_per_step
        pending = (step + 1, metrics)
        if checkpointer is not None:
            checkpointer.save(step + 1, state, force=checkpointer.preempted)
            if checkpointer.preempted:
                _log(f"SIGTERM: saved step {step + 1} and stopping")
                break
        if tcfg.eval_every and (step + 1) % tcfg.eval_every == 0 and step + 1 < tcfg.num_steps:
            ev = trainer.evaluate(state.params)
            writer.write(step + 1, {"eval_loss": ev["eval_loss"]})
            _log(f"step {step + 1}: eval_loss {ev['eval_loss']:.4f}")
    if pending is not None:
        _report(pending, bar, history, writer, 1, tokens_seen, start)
    final = trainer.evaluate(state.params)
    writer.write(int(state.step), {"eval_loss": final["eval_loss"]})
    writer.close()
    if checkpointer is not None:
        if not checkpointer.preempted:
            checkpointer.save(int(state.step), state, force=True)
        checkpointer.close()
    last = f"train_loss {history[-1]['loss']:.4f} " if history else ""
    _log(f"final (step {int(state.step)}): {last}eval_loss {final['eval_loss']:.4f}")
    per_position = final["eval_loss_per_position"]
    quarter = max(1, len(per_position) // 4)
    _log(f"eval loss by position (in-context learning): first quarter "
         f"{per_position[:quarter].mean():.4f}, last quarter {per_position[-quarter:].mean():.4f}")
    return {"history": history, "state": state, **final}


def _make_checkpointer(config, workdir):
    ckpt = config.checkpoint
    if workdir is None or not ckpt.save_every:
        return None
    checkpointer = Checkpointer(workdir, save_every=ckpt.save_every,
                                max_to_keep=ckpt.max_to_keep, config=config)
    checkpointer.install_sigterm_handler()
    return checkpointer


def _report(pending, bar, history, writer, every, tokens_seen, start):
    step, metrics = pending
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    history.append({"step": step, **metrics})
    bar.set_postfix(loss=f"{metrics['loss']:.4f}")
    if step % every == 0 or step == 1:
        rate = tokens_seen / max(time.perf_counter() - start, 1e-9)
        writer.write(step, {**metrics, "tokens_per_second": rate})
        _log(f"step {step}: loss {metrics['loss']:.4f} grad_norm {metrics['grad_norm']:.3f} "
             f"tokens/s {rate:,.0f}")


def _log(message: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(message)


__all__ = ["Trainer", "train_and_evaluate"]
