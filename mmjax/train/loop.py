"""The training loop: build from a config, shard, step, log, evaluate.

``train_and_evaluate(config, workdir)`` is what ``python -m mmjax.train`` calls. A
:class:`Trainer` is ready when constructed: model, optimiser, mesh, the batch iterators
(``mmjax.data.make_batches``: a synthetic corpus or a token store, one interface), the
parameter and state shardings and the jitted steps all come from ``__init__``, so its methods
may be called in any order. Data problems (a missing store, a vocabulary that differs from
``model.vocab_size``, token ids outside it) stop ``__init__`` before anything is compiled.

What is trained on comes from a :class:`Task`: the language-model task (token batches,
next-token loss, :func:`lm_task`) unless the caller passes another, as the three-moons toy
does (``mmjax.moons.train``; its config says ``task="moons"``). Everything else (mesh, steps,
checkpoints, resume, metrics) is the same for every task.

Checkpoints (with ``--workdir``) hold the train state and the train iterator's state, so a
resumed run sees exactly the batches of an uninterrupted one. ``train.init_from`` (a workdir
or a checkpoint step directory) starts a run without a checkpoint of its own from another
run's parameters, with a fresh optimiser at step 0 (fine-tuning, e.g. at a longer context).

The loop reads each step's metrics one step late (:class:`Reporter`), so the host never
waits on the device between steps (and at most two steps are in flight). The data flow of one
step is described in ``docs/architecture.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from tqdm.auto import tqdm

from mmjax.cli import EXIT_PREEMPTED
from mmjax.config import validate_config, with_defaults
from mmjax.data import make_batches, synthetic
from mmjax.data.pipeline import TextBatches
from mmjax.models import build_model
from mmjax.train import sharding as sharding_lib
from mmjax.train import storage
from mmjax.train.checkpoint import Checkpointer, WorkdirLock, keep_tokenizer, load_params
from mmjax.train.jitted import jit_train_step
from mmjax.train.metrics import MetricWriter
from mmjax.train.optimizer import make_optimizer
from mmjax.train.profile import StepProfiler
from mmjax.train.state import init_variables, state_layout
from mmjax.train.step import eval_step, guarded_train_step, lm_batch_loss


def split_seed(seed: int) -> tuple[jax.Array, jax.Array]:
    """``(init_rng, state_rng)``: the two halves of ``jax.random.key(seed)``."""
    init_rng, state_rng = jax.random.split(jax.random.key(seed))
    return init_rng, state_rng


@dataclasses.dataclass(frozen=True)
class Task:
    """What a :class:`Trainer` fits, beyond the model and the optimiser.

    Attributes:
      name: what a config trained on it says in ``config.task`` (``"lm"`` when absent).
      batch_loss: ``(model, params, batch, **apply_kwargs) -> (loss, loss_per_position_T,
        count)`` on a ``[batch, time + 1, ...]`` batch (``mmjax.train.step``).
      make_batches: ``(split, sharding) -> iterator`` of such batches for ``"train"`` and
        ``"val"``: ``next``, ``get_state``/``set_state`` (JSON, kept in checkpoints), ``close``.
      init_variables: ``(model, rng, batch_size, length) -> boxed variables``.
      rngs: ``seed -> (init_rng, state_rng)``: the parameters' and the train state's keys.
    """

    name: str
    batch_loss: Callable
    make_batches: Callable
    init_variables: Callable = init_variables
    rngs: Callable = split_seed


def lm_task(config: ml_collections.ConfigDict) -> Task:
    """The language-model task: ``mmjax.data.make_batches`` of ``config.data`` (a synthetic
    corpus or a token store) and the fused next-token loss (``train.loss_chunk``; the targets
    a corpus does not train on are ignored: ``synthetic.ignored_targets``)."""
    ignore = synthetic.ignored_targets(config.data.get("corpus", "tokens"))
    return Task(
        name="lm",
        batch_loss=functools.partial(lm_batch_loss, loss_chunk=config.train.loss_chunk,
                                     ignore_targets=ignore),
        make_batches=functools.partial(make_batches, config.data,
                                       vocab_size=config.model.vocab_size,
                                       seed=config.train.seed),
    )


def check_task(config: ml_collections.ConfigDict, name: str) -> None:
    """A config names its task (``config.task``, ``"lm"`` when absent); refuse a config of
    another task than ``name`` in one line (``python -m mmjax.train`` trains language models
    only)."""
    wanted = config.get("task", "lm")
    if wanted != name:
        raise ValueError(f"config.task={wanted!r}, but the trainer was given the {name!r} "
                         f"task: run this config with its own command (the three moons: "
                         f"python -m mmjax.moons)")


class Trainer:
    """Everything built from a config: model, optimiser, data, mesh, shardings, jitted steps.

    Attributes set by ``__init__`` (all of them): ``config`` (with defaults filled in),
    ``task`` (the given :class:`Task`, by default :func:`lm_task`), ``model``,
    ``optimizer``, ``mesh``, ``rules``, ``batch_sharding``, ``train_batches`` and
    ``val_batches`` (the task's iterators of the train and validation splits),
    ``corpus`` (the synthetic corpus, None for a token store), ``state_shardings``. Methods:
    :meth:`init_state`, :meth:`next_batch`, :meth:`batch` (synthetic corpora only),
    :meth:`train_step`, :meth:`evaluate`, :meth:`close`.
    """

    def __init__(self, config: ml_collections.ConfigDict, task: Task | None = None):
        config = with_defaults(config)
        validate_config(config)
        self.config = config
        check_task(config, "lm" if task is None else task.name)
        self.task = task if task is not None else lm_task(config)
        data = config.data
        if "vocab_size" in data:
            raise ValueError("data.vocab_size: the vocabulary size is said once, in "
                             "model.vocab_size")
        self.model = build_model(config.model)
        self.optimizer = make_optimizer(**config.optimizer)
        self.mesh = sharding_lib.make_mesh(config.sharding.mesh,
                                           num_slices=config.sharding.num_slices,
                                           device_order=config.sharding.device_order)
        self.rules = tuple(config.sharding.rules or sharding_lib.DEFAULT_RULES)
        batch_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if data.batch_size % batch_devices:
            raise ValueError(f"data.batch_size={data.batch_size} must be a multiple of the "
                             f"data x fsdp mesh size {batch_devices}")
        accum = config.train.grad_accum_steps
        if accum < 1 or data.batch_size % (accum * batch_devices):
            raise ValueError(f"train.grad_accum_steps={accum}: data.batch_size="
                             f"{data.batch_size} must be a multiple of grad_accum_steps x the "
                             f"data x fsdp mesh size ({batch_devices})")
        self.batch_sharding = sharding_lib.batch_sharding(self.mesh, self.rules)
        self._open_data()  # before compiling: bad data is an error in seconds
        self._init_rng, self._state_rng = self.task.rngs(config.train.seed)
        self._build_steps()

    def _open_data(self) -> None:
        """The train and validation iterators; a token store's first batch is read (without
        moving the iterator) so that ids outside the model vocabulary stop the run now."""
        self.train_batches = self.task.make_batches(split="train", sharding=self.batch_sharding)
        self.val_batches = self.task.make_batches(split="val", sharding=self.batch_sharding)
        self._val_start = self.val_batches.get_state()
        self.corpus = getattr(self.train_batches, "corpus", None)
        if isinstance(self.train_batches, TextBatches):
            self.train_batches.peek_local()

    def _build_steps(self) -> None:
        """Shardings of the parameters (from their logical axes) and of the whole train state,
        then the jitted init, train and eval steps."""
        with nn.logical_axis_rules(self.rules):
            layout = state_layout(self.model, self.optimizer, self.mesh, self.rules,
                                  length=self.config.data.context_length,
                                  init_rng=self._init_rng, state_rng=self._state_rng,
                                  init_variables=self.task.init_variables)
        self._init_params, self._create_state = layout.init_params, layout.create_state
        self.state_shardings = layout.shardings
        replicated = sharding_lib.replicated(self.mesh)
        self._train_step = jit_train_step(self.config, self.model, self.optimizer, self.mesh,
                                          self.rules, self.state_shardings,
                                          batch_loss=self.task.batch_loss)
        self._eval_step = jax.jit(
            functools.partial(eval_step, model=self.model, batch_loss=self.task.batch_loss),
            in_shardings=(self.state_shardings.params, self.batch_sharding),
            out_shardings=replicated,
        )

    @contextlib.contextmanager
    def mesh_context(self):
        """The mesh and the logical-axis rules, entered together."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(jax.set_mesh(self.mesh))
            stack.enter_context(nn.logical_axis_rules(self.rules))
            yield

    def init_state(self):
        """A fresh train state (the seed's), parameters laid out on the mesh."""
        with self.mesh_context():
            return self._create_state(self._init_params(self._init_rng), rng=self._state_rng)

    def next_batch(self) -> jax.Array:
        """The next ``[batch, context + 1, ...]`` train batch (its position is in
        checkpoints)."""
        return next(self.train_batches)

    def batch(self, step: int, split: str = "train") -> jax.Array:
        """Batch ``step`` of a synthetic corpus, out of order (a pure function of the step)."""
        if self.corpus is None:
            raise ValueError("Trainer.batch(step) needs a synthetic corpus; a token store is "
                             "read in order: use next_batch()")
        d = self.config.data
        tokens = self.corpus.batch(step, d.batch_size, d.context_length + 1, split=split)
        # Every process makes the same global batch (a pure function of the step) and hands
        # over only the shards of its own devices: correct on multi-host pods too.
        return jax.make_array_from_callback(tokens.shape, self.batch_sharding,
                                            lambda index: tokens[index])

    def train_step(self, state, tokens):
        with self.mesh_context():
            return self._train_step(state, tokens)

    def evaluate(self, params) -> dict:
        """Mean loss and per-position loss over the first ``train.eval_batches`` batches of
        the validation split (the same batches at every evaluation)."""
        results = []
        self.val_batches.set_state(self._val_start)
        with self.mesh_context():
            for _ in range(self.config.train.eval_batches):
                tokens = next(self.val_batches)
                results.append(jax.device_get(self._eval_step(params, tokens)))
        weights = np.array([r["tokens"] for r in results], np.float64)
        loss = float(np.average([r["loss"] for r in results], weights=weights))
        per_position = np.mean([r["loss_per_position"] for r in results], axis=0)
        return {"eval_loss": loss, "eval_loss_per_position": per_position}

    def close(self) -> None:
        """Stop the iterators' reader threads and worker processes."""
        for it in (self.train_batches, self.val_batches):
            it.close()


class NonFiniteLossError(RuntimeError):
    """A train step gave a NaN or inf loss or gradient norm (``train.skip_nonfinite_steps``
    off): the run stops without saving that step's parameters."""


def _nonfinite_message(step: int, metrics: dict, checkpointer) -> str:
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    what = f"loss {loss} grad_norm {grad_norm}" if not (math.isfinite(loss)
                                                        and math.isfinite(grad_norm)) \
        else "non-finite parameters after the update"
    message = f"step {step}: non-finite training ({what}); stopping"
    bad = int(metrics.get("bad_token_ids", 0))
    if bad:
        message += (f"; the batch held {bad} token ids outside the vocabulary "
                    f"[0, model.vocab_size)")
    if checkpointer is not None:
        last = checkpointer.latest_step()
        message += (f"; the last good checkpoint (step {last}) in {checkpointer.directory} is "
                    f"kept" if last is not None else "; no checkpoint was written")
    message += ("; lower optimizer.learning_rate, or set train.skip_nonfinite_steps=True to "
                "skip such steps")
    return message


@dataclasses.dataclass
class Reporter:
    """The loop's reporting state: metrics read one step late, the history, throughput.

    ``record(step, metrics)`` keeps the device metrics of ``step`` and reports the previous
    ones (no host sync on the current step); ``flush()`` reports the last. A non-finite step
    (metric ``finite`` false, not skipped) raises :class:`NonFiniteLossError` when reported.
    Tokens/s counts from the end of the first reported step (its compilation excluded).
    """

    writer: MetricWriter
    bar: tqdm
    log_every: int
    tokens_per_step: int
    history: list = dataclasses.field(default_factory=list)
    pending: tuple | None = None
    tokens_seen: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)
    skipped_steps: int = 0
    checkpointer: object = None
    _timed_tokens: int = 0
    _timer: float | None = None
    _paused_seconds: float = 0.0

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpointing) counts neither in tokens/s nor in the
        bar's rate and ETA. Enter after :meth:`check`, so that the train steps dispatched
        before are finished and timed."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._timer is not None:
                self._paused_seconds += time.perf_counter() - start
            self.bar.unpause()  # the bar's rate restarts from now: no jump in the ETA

    def record(self, step: int, metrics) -> None:
        if self.pending is not None:
            self._report(*self.pending, every=self.log_every)
        self.tokens_seen += self.tokens_per_step
        self.pending = (step, metrics)

    def flush(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._report(*pending, every=1)

    def check(self) -> None:
        """Report the pending step now (a host sync): before a save, so that a non-finite
        step is never written."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._report(*pending, every=self.log_every)

    def _rate(self) -> float:
        now = time.perf_counter()
        if self._timer is None:  # the first reported step: compilation, not throughput
            self._timer, self._timed_tokens = now, self.tokens_seen
            return float("nan")
        elapsed = now - self._timer - self._paused_seconds
        return (self.tokens_seen - self._timed_tokens) / max(elapsed, 1e-9)

    def _report(self, step: int, metrics, *, every: int) -> None:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        finite = bool(metrics.pop("finite", 1.0))
        bad = metrics.pop("bad_token_ids", 0.0)
        skipped = metrics.pop("skipped", None)
        if not finite and skipped is None:
            raise NonFiniteLossError(_nonfinite_message(
                step, dict(metrics, bad_token_ids=bad), self.checkpointer))
        if skipped:
            self.skipped_steps += 1
            _log(f"step {step}: non-finite step skipped (loss {metrics['loss']}, grad_norm "
                 f"{metrics['grad_norm']}, or the updated parameters; {self.skipped_steps} "
                 f"so far)"
                 + (f"; the batch held {int(bad)} token ids outside the vocabulary"
                    if bad else ""))
        if skipped is not None:
            metrics["skipped_steps"] = float(self.skipped_steps)
        self.history.append({"step": step, **metrics})
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        rate = self._rate()
        if step % every == 0 or step == 1:
            self.writer.write(step, {**metrics, "tokens_per_second": rate})
            tokens = "compiling" if math.isnan(rate) else f"{rate:,.0f}"
            _log(f"step {step}: loss {metrics['loss']:.4f} grad_norm "
                 f"{metrics['grad_norm']:.3f} tokens/s {tokens}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None = None,
                       *, progress: bool = True, task: Task | None = None) -> dict:
    """Train ``config.train.num_steps`` steps on ``task`` (default: :func:`lm_task`); returns
    the final train and eval metrics.

    With ``workdir``, process 0 holds ``WORKDIR/lock`` for the run (a second run on the same
    workdir is refused). The returned dict has ``preempted`` (SIGTERM stopped the run after
    saving). A non-finite step raises :class:`NonFiniteLossError` (nothing of it is saved).
    """
    check_workdir(workdir)
    lock = WorkdirLock(workdir) if workdir is not None and jax.process_index() == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        return _train(config, workdir, progress=progress, lock=lock, task=task)
    finally:
        if lock is not None:
            lock.release()


def check_workdir(workdir: str | None) -> None:
    """A workdir is a POSIX path (local, NFS, a bucket mounted with gcsfuse) or
    ``gs://BUCKET/PATH`` (checkpoints, metrics, TensorBoard events, the lock and the tokenizer
    copy go to the bucket: :mod:`mmjax.train.storage`); any other URL is refused in one line
    instead of being mangled into a local path."""
    if workdir is not None:
        storage.check_location(workdir, "--workdir")


def _train(config, workdir, *, progress, lock, task) -> dict:
    trainer = Trainer(config, task)
    try:
        return _train_loop(trainer, workdir, progress=progress, lock=lock)
    finally:
        trainer.close()


def _train_loop(trainer: Trainer, workdir, *, progress, lock) -> dict:
    config = trainer.config
    store = getattr(trainer.train_batches, "store", None)
    if workdir is not None and store is not None and jax.process_index() == 0:
        tokenizer = store.manifest["tokenizer"]
        keep_tokenizer(workdir, tokenizer.get("path"), tokenizer.get("sha256"))
    state = trainer.init_state()
    checkpointer = _make_checkpointer(config, workdir)
    try:
        return _run(trainer, state, checkpointer, workdir, progress=progress, lock=lock)
    finally:
        if checkpointer is not None:
            checkpointer.close()


def _run(trainer, state, checkpointer, workdir, *, progress, lock) -> dict:
    config = trainer.config
    tcfg = config.train
    if checkpointer is not None and checkpointer.all_steps():
        state, data_restored = checkpointer.restore(state, trainer.train_batches)
        if not data_restored:  # a checkpoint from before the iterator was saved
            if trainer.corpus is None:
                raise RuntimeError(f"checkpoint step {int(state.step)} in "
                                   f"{checkpointer.directory} holds no data iterator state; "
                                   f"cannot resume a token-store run at the right batch")
            trainer.train_batches.set_state({"step": int(state.step)})
        _log(f"resumed from {checkpointer.directory} at step {int(state.step)}")
    elif tcfg.get("init_from"):
        params, source = load_params(tcfg.init_from, state.params)
        state = state.replace(params=params)
        _log(f"initialised the parameters from {source} (fresh optimiser, step 0)")
    start_step = int(state.step)
    writer = MetricWriter(workdir, after_step=start_step)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    _log(f"model {config.model.name}: {num_params:,} parameters; mesh {dict(trainer.mesh.shape)}")
    rows = getattr(trainer.train_batches, "local_rows", None)
    if rows is not None and jax.process_count() > 1:
        _log(f"{jax.process_count()} hosts; host 0 reads batch rows {_row_blocks(rows)} of "
             f"{config.data.batch_size}")
    bar = tqdm(range(start_step, tcfg.num_steps), initial=start_step, total=tcfg.num_steps,
               disable=(not progress or jax.process_index() != 0
                        or not _is_terminal(sys.stderr)),
               desc="train", dynamic_ncols=True)
    reporter = Reporter(writer, bar, tcfg.log_every,
                        config.data.batch_size * config.data.context_length,
                        checkpointer=checkpointer)
    preempted = False
    profiler = StepProfiler(workdir, tcfg.get("profile_steps", ""),
                            all_hosts=tcfg.get("profile_all_hosts", False))
    try:
        for step in bar:
            profiler.before(step + 1)
            state, metrics = trainer.train_step(state, trainer.next_batch())
            traced = profiler.after(step + 1, (state, metrics))
            if traced:
                _log(f"profile of steps {tcfg.profile_steps}: {traced}")
            reporter.record(step + 1, metrics)
            if lock is not None:
                lock.heartbeat()
            if checkpointer is not None:
                preempted = checkpointer.preemption_agreed(step + 1)
                if preempted or checkpointer.should_save(step + 1):
                    reporter.check()  # never save a non-finite step
                    with reporter.paused():
                        checkpointer.save(step + 1, state,
                                          data_iterator=trainer.train_batches,
                                          force=preempted)
                if preempted:
                    _log(f"SIGTERM: saved step {step + 1} and stopping (exit status "
                         f"{EXIT_PREEMPTED})")
                    break
            if (tcfg.eval_every and (step + 1) % tcfg.eval_every == 0
                    and step + 1 < tcfg.num_steps):
                reporter.check()
                with reporter.paused():
                    ev = trainer.evaluate(state.params)
                writer.write(step + 1, {"eval_loss": ev["eval_loss"]})
                _log(f"step {step + 1}: eval_loss {ev['eval_loss']:.4f}")
        reporter.flush()
    except NonFiniteLossError as e:
        writer.close()
        _log(str(e))
        raise
    finally:
        profiler.stop()  # a run that ended inside the traced steps
    history = reporter.history
    if preempted:  # a spot VM has ~30 s: wait for the forced save, evaluate nothing
        writer.close()
        checkpointer.wait_until_finished()
        _log(f"preempted (step {int(state.step)}): checkpoint written; exiting without "
             f"evaluating")
        return {"history": history, "state": state, "preempted": True,
                "skipped_steps": reporter.skipped_steps}
    final = trainer.evaluate(state.params)
    writer.write(int(state.step), {"eval_loss": final["eval_loss"]})
    writer.close()
    if checkpointer is not None:
        checkpointer.save(int(state.step), state, data_iterator=trainer.train_batches,
                          force=True)
    last = f"train_loss {history[-1]['loss']:.4f} " if history else ""
    _log(f"final (step {int(state.step)}): {last}"
         f"eval_loss {final['eval_loss']:.4f}")
    per_position = final["eval_loss_per_position"]
    quarter = max(1, len(per_position) // 4)
    _log(f"eval loss by position (in-context learning): first quarter "
         f"{per_position[:quarter].mean():.4f}, last quarter {per_position[-quarter:].mean():.4f}")
    return {"history": history, "state": state, "preempted": preempted,
            "skipped_steps": reporter.skipped_steps, **final}


def _row_blocks(rows) -> str:
    """``[0, 1, 4, 5]`` -> ``"0-1, 4-5"``: a host's batch rows as blocks."""
    blocks, start = [], None
    for i, row in enumerate(rows):
        if start is None:
            start = row
        if i + 1 == len(rows) or rows[i + 1] != row + 1:
            blocks.append(f"{start}" if start == row else f"{start}-{row}")
            start = None
    return ", ".join(blocks)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _make_checkpointer(config, workdir):
    """With a workdir every run checkpoints: every ``save_every`` steps (0: only the final
    step and on SIGTERM), so the same command always resumes."""
    ckpt = config.checkpoint
    if workdir is None:
        return None
    checkpointer = Checkpointer(workdir, save_every=ckpt.save_every,
                                max_to_keep=ckpt.max_to_keep, config=config)
    checkpointer.install_sigterm_handler()
    return checkpointer


def _log(message: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(message)


__all__ = ["NonFiniteLossError", "Reporter", "Task", "Trainer",
           "guarded_train_step", "lm_task", "train_and_evaluate"]
