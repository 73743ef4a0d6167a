"""Three-moons data: moons on circular orbits, observed as (sin, cos) pairs.

A sample is a sequence of ``length + 1`` positions of ``M`` moons whose periods are given (in
time units). Moon ``m`` at time ``t`` is observed as ``[sin(2 pi t / p_m + 0.3),
cos(2 pi t / p_m + 0.3)]``, so an observation ``x_t`` has ``D = 2 M`` reals (``M`` complex
numbers of modulus 1). A sample starts at a random offset into a long time grid of step ``DT``,
so that its phase is random; inputs are positions ``0..length-1`` and targets are shifted by one.

The periods follow the paper's toy experiment (section 5 and appendix A of arXiv 2405.06394):
triples from ``{0.5, 1, ..., 3.5}``, the nine with the smallest least common multiple, one held
out for validation. The lists below are written out (the official code picks them with an
unstable sort, see ``docs/official_code.md``). ``DT = 6 / (800 / 3)``: 800 observations are
three periods of the largest lcm (6.0), so a period ``p`` lasts ``p / DT`` steps.

:class:`MoonsBatches` is the trainer's data source: batches ``[batch, length + 1, 2 M]`` from
one ``np.random.Generator``, whose state goes into checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence

import jax
import numpy as np

VALIDATION_PERIODS = ((1.0, 2.0, 3.0),)
TRAIN_PERIODS = (
    (0.5, 1.0, 2.0),
    (0.5, 1.0, 1.5),
    (0.5, 1.0, 3.0),
    (0.5, 1.5, 3.0),
    (1.0, 1.5, 3.0),
    (0.5, 1.0, 2.5),
    (1.0, 1.5, 2.0),
    (0.5, 1.5, 2.0),
)
DT = 6.0 / (800 / 3)
GRID_SIZE = 10_000
PHASE = 0.3


def period_lcm(periods: Sequence[float], precision: float = 0.1) -> float:
    """Least common multiple of real periods, computed on multiples of ``precision``.

    >>> period_lcm([1.0, 2.0, 3.0])
    6.0
    """
    _check_periods(periods)
    ticks = [round(p / precision) for p in periods]
    if any(abs(t * precision - p) > 1e-6 * max(1.0, p)
           for t, p in zip(ticks, periods, strict=True)):
        raise ValueError(f"periods must be multiples of precision={precision}, got {periods}")
    return math.lcm(*ticks) * precision


def periods_in_steps(periods: Sequence[float], dt: float = DT) -> list[float]:
    """Duration of each period in observation steps (``p / dt``)."""
    _check_periods(periods)
    return [p / dt for p in periods]


def moon_positions(times_T: np.ndarray, periods: Sequence[float]) -> np.ndarray:
    """Observations at the given times.

    Args:
      times_T: ``[...]`` times (any shape).
      periods: ``M`` positive periods.
    Returns:
      float32 ``[..., 2 M]``: ``[sin, cos]`` of ``2 pi t / p_m + 0.3`` for each moon ``m``.
    """
    _check_periods(periods)
    times = np.asarray(times_T, np.float64)
    angle_TxM = 2 * np.pi * times[..., None] / np.asarray(periods, np.float64) + PHASE
    x_TxMx2 = np.stack([np.sin(angle_TxM), np.cos(angle_TxM)], axis=-1)
    return x_TxMx2.reshape(*times.shape, 2 * len(periods)).astype(np.float32)


def sample_batch(
    rng: np.random.Generator,
    period_sets: Sequence[Sequence[float]],
    batch_size: int,
    length: int,
    *,
    dt: float = DT,
    grid_size: int = GRID_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """A batch of sequences, each with a random period set from ``period_sets`` and a random
    start on the time grid ``dt * arange(grid_size)``.

    Returns:
      ``(x_BxTxD, y_BxTxD)`` float32 with ``T = length``, ``D = 2 M``; ``y[:, t] = x[:, t+1]``
      of the same trajectory (:func:`sample_sequences`, split).
    """
    data_BxT1xD = sample_sequences(rng, period_sets, batch_size, length, dt=dt,
                                   grid_size=grid_size)
    return data_BxT1xD[:, :-1], data_BxT1xD[:, 1:]


def sample_sequences(
    rng: np.random.Generator,
    period_sets: Sequence[Sequence[float]],
    batch_size: int,
    length: int,
    *,
    dt: float = DT,
    grid_size: int = GRID_SIZE,
) -> np.ndarray:
    """``length + 1`` observations of ``batch_size`` trajectories, as in :func:`sample_batch`
    (the same draws from ``rng``): float32 ``[batch, length + 1, 2 M]``."""
    if not period_sets:
        raise ValueError("period_sets must hold at least one set of periods, got none")
    num_moons = {len(p) for p in period_sets}
    if len(num_moons) != 1:
        raise ValueError(f"every period set must have the same length, got {period_sets}")
    if batch_size < 1 or length < 1:
        raise ValueError(f"batch_size and length must be >= 1, got {batch_size}, {length}")
    max_start = grid_size - 2 * length - 1
    if max_start < 1:
        raise ValueError(
            f"grid_size must exceed 2 * length + 2 = {2 * length + 2}, got {grid_size}"
        )
    which_B = rng.integers(0, len(period_sets), size=batch_size)
    start_B = rng.integers(0, max_start, size=batch_size)
    times_BxT = dt * (start_B[:, None] + np.arange(length + 1)[None, :])
    return np.stack(
        [moon_positions(times_BxT[b], period_sets[which_B[b]]) for b in range(batch_size)]
    )


class MoonsBatches:
    """The trainer's batches of one split: float32 ``[batch, length + 1, 2 M]`` observations
    (:func:`sample_sequences`: inputs and shifted targets in one array) from one
    ``np.random.default_rng(seed)``, laid out as ``sharding`` (every process draws the whole
    batch and hands over its devices' part).

    ``skip_sequences``: sequences drawn and dropped before the first batch. The state
    (:meth:`get_state`, JSON) is the generator's; :meth:`set_state` refuses the state of a
    stream with other settings.
    """

    def __init__(self, period_sets: Sequence[Sequence[float]], *, batch_size: int,
                 length: int, seed: int, dt: float = DT, grid_size: int = GRID_SIZE,
                 sharding=None, skip_sequences: int = 0):
        self.period_sets = [list(map(float, p)) for p in period_sets]
        self.batch_size, self.length = int(batch_size), int(length)
        self.dt, self.grid_size, self.sharding = float(dt), int(grid_size), sharding
        self.rng = np.random.default_rng(seed)
        settings = dict(periods=self.period_sets, batch_size=self.batch_size,
                        length=self.length, dt=self.dt, grid_size=self.grid_size, seed=seed,
                        skip_sequences=skip_sequences)
        self.identity = hashlib.sha256(
            json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        if skip_sequences:
            self._sample(skip_sequences)

    def _sample(self, batch_size: int) -> np.ndarray:
        return sample_sequences(self.rng, self.period_sets, batch_size, self.length,
                                dt=self.dt, grid_size=self.grid_size)

    def __iter__(self):
        return self

    def __next__(self):
        data_BxT1xD = self._sample(self.batch_size)
        if self.sharding is None:
            return data_BxT1xD
        return jax.make_array_from_callback(data_BxT1xD.shape, self.sharding,
                                            lambda index: data_BxT1xD[index])

    def get_state(self) -> dict:
        return {"rng": json.dumps(self.rng.bit_generator.state), "identity": self.identity}

    def set_state(self, state: dict) -> None:
        if state.get("identity") != self.identity:
            raise ValueError("the three-moons data state was saved by a run with other data "
                             "settings (periods, batch size, length or seed); use its config "
                             "or a new --workdir")
        self.rng.bit_generator.state = json.loads(state["rng"])

    def close(self) -> None:
        """Nothing to stop (no reader threads); the trainer closes every iterator."""


def _check_periods(periods):
    if len(periods) < 1 or any(not p > 0 for p in periods):
        raise ValueError(f"periods must be a non-empty list of positive numbers, got {periods}")
