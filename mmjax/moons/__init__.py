"""The three-moons toy experiment of Memory Mosaics (arXiv 2405.06394, section 5, appendix A).

``python -m mmjax.moons --config configs/moons.py:heads=3 --workdir DIR`` trains a 54-parameter
memory (``mmjax.models.moons``, registered as ``"moons_memory"``) with mmjax's trainer (the
``"moons"`` task: :mod:`mmjax.moons.train`), evaluates its autoregressive error against
context length and writes figures.
"""

from mmjax.models.moons import (
    MoonsCache,
    MoonsMemory,
    complex_weights,
    from_official_real,
    identity_params,
    params_from_official,
    to_official_real,
)
from mmjax.moons.config import default_config
from mmjax.moons.data import (
    DT,
    TRAIN_PERIODS,
    VALIDATION_PERIODS,
    MoonsBatches,
    moon_positions,
    period_lcm,
    periods_in_steps,
    sample_batch,
    sample_sequences,
)
from mmjax.moons.evaluate import error_curve, is_disentangled, mean_error, row_dominance
from mmjax.moons.train import clipped_loss, moons_loss, moons_task, train

__all__ = [
    "DT",
    "TRAIN_PERIODS",
    "VALIDATION_PERIODS",
    "MoonsBatches",
    "MoonsCache",
    "MoonsMemory",
    "clipped_loss",
    "complex_weights",
    "default_config",
    "error_curve",
    "from_official_real",
    "identity_params",
    "is_disentangled",
    "mean_error",
    "moon_positions",
    "moons_loss",
    "moons_task",
    "period_lcm",
    "params_from_official",
    "periods_in_steps",
    "row_dominance",
    "sample_batch",
    "sample_sequences",
    "to_official_real",
    "train",
]
