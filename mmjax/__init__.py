"""mmjax: Memory Mosaics in JAX/Flax.

Networks of associative memories that predict with Gaussian kernel regression
("Memory Mosaics", arXiv 2405.06394; "Memory Mosaics at Scale", arXiv 2507.03285).

Shape alphabet, used as suffixes on tensor names throughout (``k_BxTxHxK``):

    B  batch               T  time (keys)        Q  time (queries), when it differs from T
    H  heads               D  model width (embed) K  key dim per head
    V  value dim per head  S  persistent-memory slots            N  vocabulary

The layout of every per-head tensor is ``[batch, time, heads, dim]``.
"""

from mmjax.ops import (
    MaskSpec,
    l2_normalize,
    leaky_average,
    peek_ahead_values,
    retrieve,
    visible_count,
)

__version__ = "0.1.0"

__all__ = [
    "MaskSpec",
    "l2_normalize",
    "leaky_average",
    "peek_ahead_values",
    "retrieve",
    "visible_count",
]
