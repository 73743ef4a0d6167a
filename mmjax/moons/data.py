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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
      of the same trajectory.
    """
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
    data_BxTxD = np.stack(
        [moon_positions(times_BxT[b], period_sets[which_B[b]]) for b in range(batch_size)]
    )
    return data_BxTxD[:, :-1], data_BxTxD[:, 1:]


def _check_periods(periods):
    if len(periods) < 1 or any(not p > 0 for p in periods):
        raise ValueError(f"periods must be a non-empty list of positive numbers, got {periods}")
