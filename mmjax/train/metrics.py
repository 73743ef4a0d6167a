"""Metric writing: JSON lines (always) and TensorBoard event files, from process 0 only."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np


class MetricWriter:
    """Appends ``{"step": s, **scalars}`` to ``metrics.jsonl`` and to TensorBoard events."""

    def __init__(self, workdir: str | pathlib.Path | None):
        self._active = workdir is not None and jax.process_index() == 0
        self._tb = None
        if self._active:
            self.dir = pathlib.Path(workdir)
            self.dir.mkdir(parents=True, exist_ok=True)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self._active:
            return
        scalars = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": int(step), **scalars}) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
