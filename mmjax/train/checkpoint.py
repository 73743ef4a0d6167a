"""Orbax checkpoints of the train state (and the config that made it), with automatic resume.

The synthetic data stream is a pure function of ``(seed, step)``, so the step inside the train
state is the whole data position; a run resumed from a checkpoint therefore replays exactly
the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import pathlib
import signal

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

    def restore(self, abstract_state):
        """Restore the latest checkpoint into ``abstract_state`` (shapes, dtypes, shardings)."""
        step = self.manager.latest_step()
        if step is None:
            return None
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            if hasattr(x, "sharding") else x, abstract_state)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as e:  # corrupt or incompatible files: say which checkpoint
            raise RuntimeError(f"cannot restore checkpoint step {step} from {self.directory}: "
                               f"{e}") from e
        return restored["state"]

    def save(self, step: int, state, *, force: bool = False) -> bool:
        """Save if the interval says so (or ``force``); a step already on disk is skipped."""
        if self.manager.latest_step() == step:
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if self.config_json is not None:
            items["config"] = ocp.args.JsonSave(json.loads(self.config_json))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
