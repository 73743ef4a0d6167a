"""The three-moons toy experiment of Memory Mosaics (arXiv 2405.06394, section 5, appendix A).

``python -m mmjax.moons --config configs/moons.py:heads=3 --workdir DIR`` trains a 54-parameter
memory, evaluates its autoregressive error against context length and writes figures.
"""

from mmjax.moons.config import default_config
from mmjax.moons.data import (
    DT,
    TRAIN_PERIODS,
    VALIDATION_PERIODS,
    moon_positions,
    period_lcm,
    periods_in_steps,
    sample_batch,
)
from mmjax.moons.evaluate import error_curve, is_disentangled, mean_error, row_dominance
from mmjax.moons.model import (
    MoonsCache,
    MoonsMemory,
    complex_weights,
    from_official_real,
    identity_params,
    params_from_official,
    to_official_real,
)
from mmjax.moons.train import clipped_loss, train

__all__ = [
    "DT",
    "TRAIN_PERIODS",
    "VALIDATION_PERIODS",
    "MoonsCache",
    "MoonsMemory",
    "clipped_loss",
    "default_config",
    "complex_weights",
    "error_curve",
    "from_official_real",
    "identity_params",
    "is_disentangled",
    "mean_error",
    "moon_positions",
    "period_lcm",
    "params_from_official",
    "periods_in_steps",
    "row_dominance",
    "sample_batch",
    "to_official_real",
    "train",
]
