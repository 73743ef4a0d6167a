"""Orbax checkpoints of the train state, the data iterator and the config, with resume.

Each step directory holds three items (``ocp.args.Composite``): ``state`` (the train state),
``data`` (the grain iterator's state, one JSON file per process:
``grain.checkpoint.CheckpointSave``) and ``config``. A run resumed from a checkpoint restores
both the state and the iterator, so it sees exactly the batches the uninterrupted run would
have seen. Checkpoints written before the iterator was saved (no ``data`` item) restore the
state only; the loop then positions a synthetic stream by the step (its batches are a pure
function of the step) and refuses to guess the position of a text stream.

:func:`load_params` reads only the parameters of another run's checkpoint (fine-tuning:
``train.init_from``), checking every shape against the new model first.
"""

from __future__ import annotations

import json
import pathlib
import signal

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves every ``save_every`` steps (async), keeps ``max_to_keep``, restores the latest.

    Also turns SIGTERM (TPU preemption) into a flag that the loop checks: the loop then saves
    the current step and stops cleanly.
    """

    def __init__(self, workdir: str | pathlib.Path, *, save_every: int, max_to_keep: int,
                 config: ml_collections.ConfigDict | None = None):
        if save_every < 1:
            raise ValueError(f"checkpoint save_every must be >= 1, got {save_every}")
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, save_interval_steps=save_every,
                enable_async_checkpointing=True),
        )
        self.config_json = config.to_json_best_effort() if config is not None else None
        self.preempted = False
        self._previous_handler = None

    def install_sigterm_handler(self) -> None:
        def handler(signum, frame):
            del signum, frame
            self.preempted = True

        self._previous_handler = signal.signal(signal.SIGTERM, handler)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def has_data_state(self, step: int) -> bool:
        """Whether checkpoint ``step`` holds a data iterator state (an item ``data``)."""
        return (self.directory / str(step) / "data").is_dir()

    def restore(self, abstract_state, data_iterator=None):
        """Restore the latest checkpoint into ``abstract_state`` (shapes, dtypes, shardings).

        With ``data_iterator``, its state is restored too (in place) when the checkpoint holds
        one; returns ``(state, data_restored)``. Without it, returns the state.
        """
        step = self.manager.latest_step()
        if step is None:
            return None
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            if hasattr(x, "sharding") else x, abstract_state)
        items = {"state": ocp.args.StandardRestore(target)}
        with_data = data_iterator is not None and self.has_data_state(step)
        if with_data:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # corrupt or incompatible files: say which checkpoint
            raise RuntimeError(f"cannot restore checkpoint step {step} from {self.directory}: "
                               f"{e}") from e
        if data_iterator is None:
            return restored["state"]
        return restored["state"], with_data

    def save(self, step: int, state, *, data_iterator=None, force: bool = False) -> bool:
        """Save if the interval says so (or ``force``); a step already on disk is skipped.

        ``data_iterator`` (a grain ``DatasetIterator``): its state is saved beside the train
        state, read now (the iterator may move on while the arrays are written).
        """
        if self.manager.latest_step() == step:
            return False
        if not (force or self.manager.should_save(step)):
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_FrozenState(data_iterator))
        if self.config_json is not None:
            items["config"] = ocp.args.JsonSave(json.loads(self.config_json))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)


class _FrozenState:
    """An iterator's state read at save time, for grain's handler (which may call
    ``get_state()`` later, when the manager writes the item): the same JSON it writes for a
    ``DatasetIterator``, so ``CheckpointRestore`` reads it back."""

    def __init__(self, iterator):
        self._state = json.dumps(iterator.get_state(), indent=4).encode()

    def get_state(self) -> bytes:
        return self._state


def _find_step_dir(path: pathlib.Path) -> pathlib.Path:
    """The step directory ``path`` names: a workdir, its ``checkpoints/`` or a step in it."""
    path = pathlib.Path(path).absolute()
    if (path / "state").is_dir():
        return path
    for directory in (path / "checkpoints", path):
        if directory.is_dir():
            steps = sorted(int(p.name) for p in directory.iterdir()
                            if p.name.isdigit() and (p / "state").is_dir())
            if steps:
                return directory / str(steps[-1])
    raise FileNotFoundError(
        f"train.init_from={str(path)!r}: no checkpoint there (expected a workdir with "
        f"checkpoints/<step>/state, its checkpoints/ directory, or a step directory)")


def load_params(path: str | pathlib.Path, abstract_params, *, cast: bool = True):
    """The parameters of another run's checkpoint, laid out as ``abstract_params``.

    ``path``: a workdir (its latest checkpoint), its ``checkpoints/`` directory, or one step
    directory. Only ``params`` are read (not the optimiser state). Every parameter's path and
    shape must match ``abstract_params`` (a tree of arrays or ``ShapeDtypeStruct`` with
    shardings); a mismatch raises one line naming the parameter and both shapes. Returns
    ``(params, step_dir)``.
    """
    step_dir = _find_step_dir(pathlib.Path(path))
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        metadata = checkpointer.metadata(step_dir / "state")
        metadata = getattr(metadata, "item_metadata", metadata)
        metadata = getattr(metadata, "tree", metadata)
        saved = metadata["params"]
    except Exception as e:
        raise RuntimeError(f"cannot read the parameters of checkpoint {step_dir}: {e}") from e
    saved_flat = {_path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    new_flat = {_path_str(k): v
                for k, v in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    missing = sorted(set(new_flat) - set(saved_flat))
    extra = sorted(set(saved_flat) - set(new_flat))
    if missing or extra:
        raise ValueError(f"train.init_from={step_dir}: parameters differ: the model has "
                         f"{missing[:3]} not in the checkpoint, the checkpoint has {extra[:3]} "
                         f"not in the model")
    for name, new in new_flat.items():
        old_shape = tuple(saved_flat[name].shape)
        if old_shape != tuple(new.shape):
            raise ValueError(f"train.init_from={step_dir}: parameter params/{name} has shape "
                             f"{old_shape} in the checkpoint but {tuple(new.shape)} in this "
                             f"model")
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_params)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args},
        partial_restore=True))
    params = restored["params"]
    if cast:
        params = jax.tree.map(lambda p, t: p.astype(t.dtype) if p.dtype != t.dtype else p,
                              params, target)
    return params, step_dir


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)
