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

import contextlib
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import sys
import tempfile
import time

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from mmjax.train import storage


class Checkpointer:
    """Saves every ``save_every`` steps (async; 0: only the final step and on SIGTERM), keeps
    ``max_to_keep``, restores the latest.

    Also turns SIGTERM (TPU preemption) into a flag that the loop checks: the loop then saves
    the current step and stops cleanly.
    """

    def __init__(self, workdir: str | pathlib.Path, *, save_every: int, max_to_keep: int,
                 config: ml_collections.ConfigDict | None = None):
        if save_every < 0:
            raise ValueError(f"checkpoint save_every must be >= 0, got {save_every}")
        self.save_every = save_every
        self.directory = storage.path(workdir) / "checkpoints"  # local, or gs://
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, save_interval_steps=max(save_every, 1),
                enable_async_checkpointing=True),
        )
        self.config_json = config.to_json_best_effort() if config is not None else None
        self.preempted = False
        self._previous_handler = None

    def install_sigterm_handler(self) -> None:
        """SIGTERM sets ``preempted``; not where JAX's preemption service owns SIGTERM (a
        multi-process run: see :meth:`preemption_agreed`)."""
        if jax.process_count() > 1 and _preemption_service() is not None:
            return

        def handler(signum, frame):
            del signum, frame
            self.preempted = True

        self._previous_handler = signal.signal(signal.SIGTERM, handler)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and self.manager.should_save(step)

    def preemption_agreed(self, step: int) -> bool:
        """Whether to save and stop after ``step``: every process must stop (and save) at
        the same step, since the save is collective.

        One process: its SIGTERM flag. Several, with JAX's preemption service (started by
        ``jax.distributed.initialize``, which then owns SIGTERM):
        ``multihost_utils.reached_preemption_sync_point(step)``, a step all hosts agree on
        through the coordination service without touching the devices. Several without it:
        an all-host OR of the flags every step (``process_allgather`` of one integer, a host
        sync per step)."""
        if jax.process_count() == 1:
            return self.preempted
        from jax.experimental import multihost_utils

        if _preemption_service() is not None:
            self.preempted = bool(multihost_utils.reached_preemption_sync_point(step))
            return self.preempted
        import numpy as np

        flags = multihost_utils.process_allgather(np.array([self.preempted], np.int32))
        self.preempted = bool(np.asarray(flags).any())
        return self.preempted

    def has_data_state(self, step: int) -> bool:
        """Whether checkpoint ``step`` holds a data iterator state (an item ``data``)."""
        return storage.is_dir(self.directory / str(step) / "data")

    def restore(self, abstract_state, data_iterator=None):
        """Restore the latest readable checkpoint into ``abstract_state`` (shapes, dtypes,
        shardings).

        A checkpoint that cannot be read (truncated or corrupt files) is reported in one line
        and moved to ``WORKDIR/corrupt_checkpoints/``; the previous one is tried. Only when
        none is readable does this raise, naming the directory. A checkpoint whose parameter
        shapes differ from ``abstract_state`` (a config that changed a shape) is refused,
        naming the config keys that differ.

        With ``data_iterator``, its state is restored too (in place) when the checkpoint holds
        one; returns ``(state, data_restored)``. Without it, returns the state.
        """
        steps = self.all_steps()
        if not steps:
            return None
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            if hasattr(x, "sharding") else x, abstract_state)
        failures = []
        _quiet_failed_readers()
        for step in reversed(steps):
            self._check_shapes(step, abstract_state)
            items = {"state": ocp.args.StandardRestore(target)}
            with_data = data_iterator is not None and self.has_data_state(step)
            if with_data:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                with _stderr_held():
                    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # corrupt or truncated files: try the previous one
                reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                failures.append(step)
                _warn(f"checkpoint step {step} in {self.directory} is unreadable "
                      f"({type(e).__name__}: {reason}); trying the previous one")
                self._set_aside(step)
                continue
            if data_iterator is None:
                return restored["state"]
            return restored["state"], with_data
        raise RuntimeError(f"no readable checkpoint in {self.directory} (steps {failures} "
                           f"failed; moved to {self.directory.parent / 'corrupt_checkpoints'})")

    def _set_aside(self, step: int) -> None:
        """Move an unreadable step out of the manager's sight (process 0), so that the run
        can save that step again."""
        if jax.process_index() == 0:
            aside = self.directory.parent / "corrupt_checkpoints"
            aside.mkdir(exist_ok=True)
            target = aside / f"{step}-{int(time.time())}"
            shutil.move(str(self.directory / str(step)), str(target))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("mmjax_checkpoint_set_aside")
        self.manager.reload()

    def _check_shapes(self, step: int, abstract_state) -> None:
        """Refuse a checkpoint whose parameter shapes differ from the model's, naming the
        ``model`` (and ``data``) config keys that changed since it was saved."""
        try:
            with _stderr_held(drop=True):  # orbax warns of a metadata file it does not need
                metadata = ocp.PyTreeCheckpointer().metadata(
                    self.directory / str(step) / "state")
            metadata = getattr(metadata, "item_metadata", metadata)
            metadata = getattr(metadata, "tree", metadata)
            saved = {_path_str(k): tuple(v.shape) for k, v in
                     jax.tree_util.tree_flatten_with_path(metadata["params"])[0]}
        except Exception:
            return  # unreadable metadata: the restore reports it
        new = {_path_str(k): tuple(v.shape) for k, v in
               jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]}
        differ = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k))
        if not differ:
            return
        keys = self._changed_keys(step)
        name = differ[0]
        raise ValueError(
            f"checkpoint step {step} in {self.directory} was saved with another config: "
            + (f"{', '.join(keys)} changed; " if keys else "")
            + f"parameter params/{name} has shape {saved.get(name)} there but "
            f"{new.get(name)} now ({len(differ)} parameters differ); use the saved config or "
            f"a new --workdir (train.init_from cannot change shapes either)")

    def _changed_keys(self, step: int) -> list[str]:
        path = self.directory / str(step) / "config" / "metadata"
        if self.config_json is None or not storage.exists(path):
            return []
        try:
            saved = json.loads(storage.read_text(path))
        except ValueError:
            return []
        now = json.loads(self.config_json)
        keys = []
        for section in ("model", "data"):
            old, new = saved.get(section) or {}, now.get(section) or {}
            for key in sorted(set(old) | set(new)):
                if old.get(key) != new.get(key):
                    keys.append(f"{section}.{key} ({old.get(key)!r} -> {new.get(key)!r})")
        return keys

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


LOCK_STALE_SECONDS = 600.0
LOCK_WRITE_SECONDS = 10.0  # an unreadable lock younger than this is being written

# Where a workdir keeps the tokenizer of its token store (copied there by the training loop),
# so that the workdir alone is enough to generate text.
TOKENIZER_FILE = "tokenizer.model"


def keep_tokenizer(workdir: str | pathlib.Path, source: str | None,
                   sha256: str | None = None):
    """Copy the tokenizer file ``source`` into ``workdir`` (a local path or ``gs://``) as
    :data:`TOKENIZER_FILE`.

    Returns the copy's path, or ``None`` (with a warning) when ``source`` is missing or no
    longer the file of checksum ``sha256`` the token store was made with. An identical copy is
    kept.
    """
    import hashlib

    if not source:
        return None
    source_path, dest = pathlib.Path(source), storage.path(workdir) / TOKENIZER_FILE
    if not source_path.is_file():
        _warn(f"the token store's tokenizer {source} is gone; pass --tokenizer to generate")
        return None
    data = source_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if sha256 and digest != sha256:
        _warn(f"the tokenizer {source} changed since the token store was made; not copied")
        return None
    if (storage.exists(dest)
            and hashlib.sha256(storage.read_bytes(dest)).hexdigest() == digest):
        return dest
    storage.write_bytes(dest, data)  # atomic: a temporary file and a rename, or one object
    return dest


class WorkdirLock:
    """``WORKDIR/lock``: one run per workdir (held by process 0 of a run), on a local path or
    ``gs://`` (created with an upload that fails when the object exists).

    The file holds the holder's host, pid and start time; the loop refreshes its mtime (a
    heartbeat) at most every ``heartbeat_seconds``. A second run is refused with a message
    naming the file and the holder. A lock left by a crashed run is taken over with a warning:
    one whose pid is not alive on this host, or whose heartbeat is older than
    ``stale_seconds`` (a holder on another host).
    """

    def __init__(self, workdir, *, stale_seconds: float = LOCK_STALE_SECONDS,
                 heartbeat_seconds: float = 30.0):
        self.path = storage.path(workdir) / "lock"
        self.stale_seconds = stale_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self._held = False
        self._last_beat = 0.0

    def acquire(self) -> None:
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "started": time.time()})
        for _ in range(2):
            if not storage.create_exclusive(self.path, record.encode()):
                holder, stale = self._holder()
                if not stale:
                    raise RuntimeError(
                        f"workdir {self.path.parent} is in use by another run: lock file "
                        f"{self.path} held by {holder} (a crashed run's lock is taken over "
                        f"once its pid is gone, or after {self.stale_seconds:.0f} s without a "
                        f"heartbeat; delete the file if you are sure)") from None
                _warn(f"taking over the stale lock {self.path} of {holder}")
                with contextlib.suppress(OSError):
                    storage.remove(self.path)
                continue
            self._held = True
            self._last_beat = time.monotonic()
            return
        raise RuntimeError(f"could not take the lock {self.path}")

    def _holder(self) -> tuple[str, bool]:
        try:
            text = storage.read_text(self.path)
            age = time.time() - storage.mtime(self.path)
        except OSError:
            return "an unreadable lock", True  # gone meanwhile
        try:
            info = json.loads(text)
            if not isinstance(info, dict):
                raise ValueError(text)
        except ValueError:  # a local lock is created empty, then written: fresh means written now
            return "a lock being written", age > LOCK_WRITE_SECONDS
        holder = f"host {info.get('host')} pid {info.get('pid')}"
        if info.get("host") == socket.gethostname():
            return holder, not _pid_alive(int(info.get("pid", -1)))
        return holder, age > self.stale_seconds

    def heartbeat(self) -> None:
        now = time.monotonic()
        if self._held and now - self._last_beat >= self.heartbeat_seconds:
            self._last_beat = now
            with contextlib.suppress(Exception):  # a missed beat is no reason to stop
                storage.touch(self.path)

    def release(self) -> None:
        if self._held:
            self._held = False
            with contextlib.suppress(OSError):
                storage.remove(self.path)


@contextlib.contextmanager
def _stderr_held(*, drop: bool = False):
    """Hold what is written to file descriptor 2 (C++ and Python alike) while a checkpoint is
    read: a failed read of a corrupt checkpoint prints dozens of tracebacks from tensorstore's
    callbacks (``Event loop is closed``) and orbax's readers; when the block raises they are
    dropped (the caller reports one line; :func:`_quiet_failed_readers` drops what comes
    later). A successful read's output is written out, unless ``drop``."""
    held = tempfile.TemporaryFile()
    keep = True
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(held.fileno(), 2)
    try:
        yield
    except BaseException:
        keep = False  # the caller reports the failure in one line
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if keep and not drop:
            held.seek(0)
            text = held.read()
            if text:
                os.write(2, text)
        held.close()


class _FailedReaders(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Task exception was never retrieved")


def _quiet_failed_readers() -> None:
    """Installed before a restore. After a failed one, tensorstore's reads still in flight
    call back into orbax's closed asyncio loop (``RuntimeError: Event loop is closed``,
    through ``sys.unraisablehook``) and asyncio logs their never-retrieved errors at garbage
    collection: dozens of tracebacks for one unreadable checkpoint, already reported in one
    line. Drop exactly those from now on; everything else still prints."""
    previous = sys.unraisablehook
    if getattr(previous, "_mmjax_quiet", False):
        return

    def hook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)

    hook._mmjax_quiet = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_FailedReaders())


def _preemption_service():
    """JAX's preemption sync manager when ``jax.distributed`` started one, else None."""
    try:
        from jax._src import distributed
    except ImportError:
        return None
    state = distributed.global_state
    if getattr(state, "client", None) is None:
        return None
    return getattr(state, "preemption_sync_manager", None)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process not yet reaped by its parent is a zombie: dead for us
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


class _FrozenState:
    """An iterator's state read at save time, for grain's handler (which may call
    ``get_state()`` later, when the manager writes the item): the same JSON it writes for a
    ``DatasetIterator``, so ``CheckpointRestore`` reads it back."""

    def __init__(self, iterator):
        self._state = json.dumps(iterator.get_state(), indent=4).encode()

    def get_state(self) -> bytes:
        return self._state


def find_step_dir(path: str | pathlib.Path, source: str = "train.init_from"):
    """The step directory ``path`` (a local path or ``gs://``) names: a workdir (its latest
    step), its ``checkpoints/`` or a step in it; ``source`` names the setting in the error
    message."""
    path = storage.path(path)
    if storage.is_dir(path / "state"):
        return path
    for directory in (path / "checkpoints", path):
        if storage.is_dir(directory):
            steps = sorted(int(name) for name in storage.listdir(directory)
                           if name.isdigit() and storage.is_dir(directory / name / "state"))
            if steps:
                return directory / str(steps[-1])
    raise FileNotFoundError(
        f"{source}={str(path)!r}: no checkpoint there (expected a workdir with "
        f"checkpoints/<step>/state, its checkpoints/ directory, or a step directory)")


def load_params(path: str | pathlib.Path, abstract_params, *, cast: bool = True,
                source: str = "train.init_from"):
    """The parameters of another run's checkpoint, laid out as ``abstract_params``.

    ``path``: a workdir (its latest checkpoint), its ``checkpoints/`` directory, or one step
    directory, local or ``gs://``. Only ``params`` are read (not the optimiser state). Every
    parameter's path and shape must match ``abstract_params`` (a tree of arrays or
    ``ShapeDtypeStruct`` with shardings); a mismatch raises one line naming the parameter and
    both shapes (``source`` names the setting in it). Returns ``(params, step_dir)``.
    """
    step_dir = find_step_dir(path, source)
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
        raise ValueError(f"{source}={step_dir}: parameters differ: the model has "
                         f"{missing[:3]} not in the checkpoint, the checkpoint has {extra[:3]} "
                         f"not in the model")
    for name, new in new_flat.items():
        old_shape = tuple(saved_flat[name].shape)
        if old_shape != tuple(new.shape):
            raise ValueError(f"{source}={step_dir}: parameter params/{name} has shape "
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
