"""A ``jax.profiler`` trace of chosen training steps (``train.profile_steps``), in the workdir.

``--config.train.profile_steps=START,COUNT`` traces steps ``START .. START + COUNT - 1`` (the
step numbers of the log) into ``WORKDIR/tensorboard/plugins/profile/RUN/``: ``HOST.xplane.pb``
for TensorBoard's profile plugin (``tensorboard --logdir WORKDIR/tensorboard``) and
``HOST.trace.json.gz`` for Perfetto (ui.perfetto.dev). Process 0 traces; with
``train.profile_all_hosts`` every host does. A ``gs://`` workdir gets the files when the
trace ends (they are written locally first). How to read a step's trace: docs/architecture.md.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile

import jax

from mmjax.train import storage


def parse_profile_steps(value) -> tuple[int, int] | None:
    """``""`` -> None (no trace); ``"START,COUNT"`` (or a pair) -> ``(START, COUNT)``, both
    ``>= 1``; anything else raises a one-line ``ValueError``."""
    if value in ("", None):
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        start, count = (int(p) for p in parts)
    except (TypeError, ValueError):
        start = count = 0
    if start < 1 or count < 1:
        raise ValueError(f"train.profile_steps={value!r}: must be '' or 'START,COUNT' with "
                         f"START >= 1 and COUNT >= 1 (steps START..START+COUNT-1)")
    return start, count


class StepProfiler:
    """Starts the trace before step ``START`` and stops it after step ``START + COUNT - 1``
    (after the step's results are ready, so the trace holds the whole step)."""

    def __init__(self, workdir, profile_steps, *, all_hosts: bool = False):
        self.window = parse_profile_steps(profile_steps)
        if self.window is not None and workdir is None:
            raise ValueError("train.profile_steps needs --workdir (the trace is written there)")
        self.active = self.window is not None and (all_hosts or jax.process_index() == 0)
        self.target = None if workdir is None else storage.path(workdir) / "tensorboard"
        self.local = None
        self.tracing = False

    def before(self, step: int) -> None:
        """Call before running step ``step`` (1-based)."""
        if self.active and not self.tracing and step == self.window[0]:
            if storage.is_gcs(self.target):
                self.local = pathlib.Path(tempfile.mkdtemp(prefix="mmjax-profile-"))
            jax.profiler.start_trace(str(self.local or self.target))
            self.tracing = True

    def after(self, step: int, outputs) -> str | None:
        """Call after step ``step`` with its outputs; returns the trace's directory when the
        trace ended here."""
        if self.tracing and step == self.window[0] + self.window[1] - 1:
            jax.block_until_ready(outputs)
            return self.stop()
        return None

    def stop(self) -> str | None:
        """End a running trace (also when the run stops early); returns its directory."""
        if not self.tracing:
            return None
        jax.profiler.stop_trace()
        self.tracing = False
        if self.local is not None:  # a bucket: upload what the profiler wrote locally
            for file in sorted(p for p in self.local.rglob("*") if p.is_file()):
                storage.write_bytes(self.target / file.relative_to(self.local),
                                    file.read_bytes())
            shutil.rmtree(self.local, ignore_errors=True)
            self.local = None
        return str(self.target / "plugins" / "profile")
