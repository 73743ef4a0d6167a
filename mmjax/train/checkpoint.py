"""Orbax checkpoints of the train state, the data iterator and the config, with resume.

Each step directory holds three items (``ocp.args.Composite``): ``state`` (the train state),
``data_state`` (the data iterator's position: one JSON object, the same on every process and
for any process count, so a run saved on N hosts resumes on K) and ``config``. A run resumed
from a checkpoint restores both the state and the iterator, so it sees exactly the batches the
uninterrupted run would have seen. Older checkpoints hold the iterator as grain's per-process
files (item ``data``): their batch count is read from process 0's file. Checkpoints without
either restore the state only; the loop then positions a synthetic stream by the step (its
batches are a pure function of the step) and refuses to guess the position of a text stream.

Only real corruption sets a checkpoint aside (see :meth:`Checkpointer.restore`): a transient
read error is retried and then stops the run naming the path, and a checkpoint that does not
fit the current config or data pipeline is refused in one line; neither moves anything.

:func:`load_params` reads only the parameters of another run's checkpoint (fine-tuning:
``train.init_from``), checking every shape against the new model first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import signal
import socket
import sys
import tempfile
import time

import jax
import ml_collections
import orbax.checkpoint as ocp

from mmjax.train import storage

READ_RETRIES = 4

# Status codes (tensorstore's, as in its error messages) of reads that may succeed when
# tried again, and of reads that show the files themselves are damaged.
TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "RESOURCE_EXHAUSTED",
                   "CANCELLED", "INTERNAL", "UNKNOWN", "PERMISSION_DENIED", "UNAUTHENTICATED")
DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "INVALID_ARGUMENT",
                "FAILED_PRECONDITION")


class Checkpointer:
    """Saves every ``save_every`` steps (async; 0: only the final step and on SIGTERM), keeps
    ``max_to_keep``, restores the latest.

    Also turns SIGTERM (TPU preemption) into a flag that the loop checks: the loop then saves
    the current step and stops cleanly.
    """

    read_retries = READ_RETRIES  # transient read errors: tried again after 1, 2, 4, 8 s
    retry_seconds = 1.0

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

    def restore(self, abstract_state, data_iterator=None):
        """Restore the latest readable checkpoint into ``abstract_state`` (shapes, dtypes,
        shardings).

        Only a checkpoint whose own files are damaged (:func:`damage`: missing or unreadable
        items, or a read that fails with a data error naming one of its files) is reported in
        one line and moved to ``WORKDIR/corrupt_checkpoints/``; the previous one is tried, and
        only when none is readable does this raise, naming the directory. A read that fails
        with a transient error (unavailable storage, a timeout) is retried
        ``read_retries`` times, then raises naming the path, moving nothing. A checkpoint
        that does not fit the current run (parameter shapes: the config keys that changed are
        named; another tree; a data pipeline with another batch size, store or seed) is
        refused in one line, moving nothing.

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
            try:
                restored = self._read(step, target)
            except _Damaged as e:
                _REPORTED.add(str(self.directory / str(step)).split("://", 1)[-1])
                failures.append(step)
                _warn(f"checkpoint step {step} in {self.directory} is unreadable ({e}); "
                      f"trying the previous one")
                self._set_aside(step)
                continue
            if data_iterator is None:
                return restored["state"]
            data_state = self._data_state(step, restored)
            if data_state is not None:
                try:
                    data_iterator.set_state(data_state)
                except ValueError as e:
                    raise ValueError(f"checkpoint step {step} in {self.directory}: {e}") \
                        from None
            return restored["state"], data_state is not None
        raise RuntimeError(f"no readable checkpoint in {self.directory} (steps {failures} "
                           f"failed; moved to {self.directory.parent / 'corrupt_checkpoints'})")

    def _read(self, step: int, target) -> dict:
        """Read step ``step``'s state (and ``data_state``), retrying transient errors; raises
        :class:`_Damaged` when the step's own files are damaged."""
        step_dir = self.directory / str(step)
        items = {"state": ocp.args.StandardRestore(target)}
        if storage.is_dir(step_dir / "data_state"):
            items["data_state"] = ocp.args.JsonRestore()
        for attempt in range(self.read_retries + 1):
            try:
                with _stderr_held():
                    return self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - classified below, re-raised if unknown
                error = e
            reason = _first_line(error)
            if _transient(error):
                if attempt < self.read_retries:
                    time.sleep(self.retry_seconds * 2 ** attempt)
                    continue
                raise RuntimeError(
                    f"checkpoint step {step} at {step_dir} could not be read after "
                    f"{self.read_retries + 1} tries ({type(error).__name__}: {reason}); "
                    f"nothing was moved: rerun the same command when the storage answers"
                ) from None
            found = damage(step_dir, error)
            if found:
                raise _Damaged(found)
            raise RuntimeError(
                f"checkpoint step {step} at {step_dir} does not fit this run "
                f"({type(error).__name__}: {reason}); nothing was moved: use the config it "
                f"was saved with (in {step_dir / 'config'}) or a new --workdir") from None
        raise AssertionError("unreachable")

    def _data_state(self, step: int, restored) -> dict | None:
        """The data iterator state of step ``step``: its ``data_state`` item, or the batch
        count of an older checkpoint's grain item (process 0's file)."""
        if "data_state" in restored and restored["data_state"] is not None:
            return restored["data_state"]
        legacy = self.directory / str(step) / "data"
        files = sorted(name for name in (storage.listdir(legacy) if storage.is_dir(legacy)
                                         else []) if name.startswith("process_0-of-"))
        if not files:
            return None
        try:
            saved = json.loads(storage.read_text(legacy / files[0]))
        except ValueError as e:
            raise RuntimeError(f"checkpoint step {step}: the data iterator state {files[0]} "
                               f"is unreadable ({e})") from None
        return _legacy_state(saved)

    def _set_aside(self, step: int) -> None:
        """Move an unreadable step out of the manager's sight (process 0), so that the run
        can save that step again."""
        if jax.process_index() == 0:
            aside = self.directory.parent / "corrupt_checkpoints"
            storage.makedirs(aside)
            storage.move_tree(self.directory / str(step), aside / f"{step}-{int(time.time())}")
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

        ``data_iterator`` (``get_state()`` -> JSON): its state is saved beside the train
        state, read now.
        """
        if self.manager.latest_step() == step:
            return False
        if not (force or self.manager.should_save(step)):
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:  # read now: the iterator moves on while arrays are written
            items["data_state"] = ocp.args.JsonSave(
                json.loads(json.dumps(data_iterator.get_state())))
        if self.config_json is not None:
            items["config"] = ocp.args.JsonSave(json.loads(self.config_json))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def wait_until_finished(self) -> None:
        """Block until the last (async) save is written and committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)


class _Damaged(Exception):
    """A checkpoint step whose own files are damaged (the message says how)."""


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


def _status_code(error: BaseException) -> str | None:
    """The leading status code of a tensorstore error message (``"DATA_LOSS: ..."``)."""
    head = str(error).lstrip().split(":", 1)[0]
    return head if head.isupper() and head.replace("_", "").isalpha() else None


def _transient(error: BaseException) -> bool:
    """Whether a failed read may succeed when tried again: an I/O error that is not a missing
    file, a timeout or connection error, or a storage status such as UNAVAILABLE."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    if isinstance(error, OSError) and not isinstance(
            error, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return True
    return _status_code(error) in TRANSIENT_CODES


def damage(step_dir, error: BaseException | None = None) -> str | None:
    """What is wrong with the files of checkpoint ``step_dir`` itself, or None.

    Damaged: the ``state`` item or its ``_METADATA`` is missing; a JSON item
    (``_METADATA``, ``data_state``, ``config``) does not parse; or the read failed with a data
    error (truncated, missing or undecodable file: DATA_LOSS, OUT_OF_RANGE, NOT_FOUND, ...)
    naming a file inside ``step_dir``. A failure that none of these explains (a tree that
    differs from the current model's) is not damage.
    """
    state = step_dir / "state"
    if not storage.is_dir(state):
        return f"no state item in {step_dir}"
    if not storage.exists(state / "_METADATA"):
        return f"{state / '_METADATA'} is missing"
    for name in ("state/_METADATA", "data_state/metadata", "config/metadata"):
        path = step_dir / name
        if storage.exists(path):
            try:
                json.loads(storage.read_text(path))
            except ValueError as e:
                return f"{path} does not parse ({e})"
    if error is None:
        return None
    if isinstance(error, (FileNotFoundError, json.JSONDecodeError)):
        return f"{type(error).__name__}: {_first_line(error)}"
    where = str(step_dir).split("://", 1)[-1].rstrip("/")
    if _status_code(error) in DAMAGE_CODES and where in str(error):
        return _first_line(error)
    return None


def _legacy_state(saved: dict) -> dict:
    """An older checkpoint's grain iterator state as a current one: its batch count (its
    pipeline digest covered the process layout, so it is not checked)."""
    if "step" in saved:
        return {"step": int(saved["step"])}
    return {"batches": int(saved["batches"]), "legacy": True}


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


# Checkpoint step directories already reported (in one line) as damaged: later log records
# and unraisable errors that name them are the same failure, from reads still in flight.
_REPORTED: set[str] = set()


def _names_reported(text: str) -> bool:
    return any(path in text for path in _REPORTED)


class _FailedReaders(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Task exception was never retrieved"):
            return False
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            pass
        return not _names_reported(message)


def _quiet_failed_readers() -> None:
    """Installed before a restore. After a failed one, tensorstore's reads still in flight
    call back into orbax's closed asyncio loop (``RuntimeError: Event loop is closed``,
    through ``sys.unraisablehook``), asyncio logs their never-retrieved errors at garbage
    collection, and orbax's threads log the read errors: dozens of tracebacks for one
    unreadable checkpoint, already reported in one line. Drop exactly those (and anything
    naming a step already reported) from now on; everything else still prints."""
    previous = sys.unraisablehook
    if getattr(previous, "_mmjax_quiet", False):
        return

    def hook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        if value is not None and _names_reported(str(value)):
            return
        previous(unraisable)

    hook._mmjax_quiet = True
    sys.unraisablehook = hook
    for name in ("absl", ""):
        logging.getLogger(name).addFilter(_FailedReaders())
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
