"""Metric writing: JSON lines (always) and TensorBoard event files, from process 0 only."""

from __future__ import annotations

import json
import math
import pathlib

import jax
import numpy as np


class MetricWriter:
    """Appends ``{"step": s, **scalars}`` to ``metrics.jsonl`` and to TensorBoard events.

    Every line is strict JSON: a NaN or infinite value is written as ``null``. ``after_step``
    (a resumed run's start step): rows of later steps, written by the interrupted run after
    its last checkpoint, are dropped first, so no step appears twice.
    """

    def __init__(self, workdir: str | pathlib.Path | None, *, after_step: int | None = None):
        self._active = workdir is not None and jax.process_index() == 0
        self._tb = None
        if self._active:
            self.dir = pathlib.Path(workdir)
            self.dir.mkdir(parents=True, exist_ok=True)
            if after_step is not None:
                self._truncate(after_step)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self._active:
            return
        scalars = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
        row = {k: (v if math.isfinite(v) else None) for k, v in scalars.items()}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": int(step), **row}, allow_nan=False) + "\n")
        for name, value in scalars.items():
            if math.isfinite(value):
                self._tb.add_scalar(name, value, int(step))

    def _truncate(self, after_step: int) -> None:
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines(keepends=True):
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash
            if step <= after_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        path.write_text("".join(kept))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
