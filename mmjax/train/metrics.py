"""Metric writing: JSON lines (always) and TensorBoard event files, from process 0 only.

The workdir may be local or ``gs://BUCKET/PATH``. A local ``metrics.jsonl`` is appended to
row by row. An object in a bucket cannot be appended to: the writer keeps the file's text and
uploads it whole at every :meth:`MetricWriter.write` (one small upload per logged row, every
``train.log_every`` steps), so a run killed with SIGKILL loses no row it has logged.

TensorBoard events on a bucket are written to a local temporary directory and uploaded (each
events file whole) at most every ``TENSORBOARD_UPLOAD_SECONDS`` and at close: a killed run may
lose the events of its last seconds (``metrics.jsonl`` is the record). tensorboardX could write
``gs://`` itself, but an upload that fails in its writer thread kills the thread, and the next
scalars then block training forever on its full queue; a failed upload here is a warning and is
tried again at the next one (so is a failed ``metrics.jsonl`` upload).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

from mmjax.train import storage

TENSORBOARD_UPLOAD_SECONDS = 60.0


class MetricWriter:
    """Appends ``{"step": s, **scalars}`` to ``metrics.jsonl`` and to TensorBoard events.

    Every line is strict JSON: a NaN or infinite value is written as ``null``. ``after_step``
    (a resumed run's start step): rows of later steps, written by the interrupted run after
    its last checkpoint, are dropped first, so no step appears twice.
    """

    def __init__(self, workdir: str | pathlib.Path | None, *, after_step: int | None = None):
        self._active = workdir is not None and jax.process_index() == 0
        self._tb = None
        self._text = None  # on a bucket: the whole metrics.jsonl, uploaded at every write
        self._tb_local = None  # on a bucket: where the events are written before an upload
        self._failing = False
        if self._active:
            self.dir = storage.path(workdir)
            self.path = self.dir / "metrics.jsonl"
            storage.makedirs(self.dir)
            if storage.is_gcs(self.dir):
                self._text = (storage.read_text(self.path) if storage.exists(self.path)
                              else "")
            if after_step is not None:
                self._truncate(after_step)
            from tensorboardX import SummaryWriter

            events = self.dir / "tensorboard"
            if storage.is_gcs(self.dir):
                self._tb_local = tempfile.mkdtemp(prefix="mmjax-tensorboard-")
                self._uploaded = time.monotonic()
                events = self._tb_local
            self._tb = SummaryWriter(str(events))

    def write(self, step: int, metrics: dict) -> None:
        if not self._active:
            return
        scalars = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
        row = {k: (v if math.isfinite(v) else None) for k, v in scalars.items()}
        line = json.dumps({"step": int(step), **row}, allow_nan=False) + "\n"
        if self._text is not None:
            self._text += line
            self._upload(self.path, self._text.encode())
        else:
            with open(self.path, "a") as f:
                f.write(line)
        for name, value in scalars.items():
            if math.isfinite(value):
                self._tb.add_scalar(name, value, int(step))
        if (self._tb_local is not None
                and time.monotonic() - self._uploaded >= TENSORBOARD_UPLOAD_SECONDS):
            self._tb.flush()
            self._upload_events()

    def _upload(self, path, data: bytes) -> bool:
        """Upload one file to the bucket; a failure is a warning (the next upload of the same
        file carries everything again)."""
        try:
            storage.write_bytes(path, data)
        except Exception as e:  # noqa: BLE001 - storage errors of any library
            if not self._failing:
                print(f"could not upload {path} ({type(e).__name__}: {e}); trying again at "
                      f"the next write", file=sys.stderr, flush=True)
            self._failing = True
            return False
        self._failing = False
        return True

    def _upload_events(self) -> None:
        self._uploaded = time.monotonic()
        for name in sorted(os.listdir(self._tb_local)):
            with open(os.path.join(self._tb_local, name), "rb") as f:
                self._upload(self.dir / "tensorboard" / name, f.read())

    def _truncate(self, after_step: int) -> None:
        if self._text is None and not storage.exists(self.path):
            return
        text = self._text if self._text is not None else storage.read_text(self.path)
        kept = []
        for line in text.splitlines(keepends=True):
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash
            if step <= after_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        kept = "".join(kept)
        if kept != text:
            storage.write_text(self.path, kept)
        if self._text is not None:
            self._text = kept

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
            if self._tb_local is not None:
                self._upload_events()
                shutil.rmtree(self._tb_local, ignore_errors=True)
                self._tb_local = None
