"""mmjax: Memory Mosaics in JAX/Flax.

Networks of associative memories that predict with Gaussian kernel regression
("Memory Mosaics", arXiv 2405.06394; "Memory Mosaics at Scale", arXiv 2507.03285).

Shape alphabet, used as suffixes on tensor names throughout (``k_BxTxHxK``); each letter has
one meaning:

    B  batch                         T  time (keys, or a whole sequence)
    Q  time (queries), when it differs from T, or a tile of queries
    C  a tile of key time (blocked retrieval, kernels)
    H  heads                         G  heads of several tiers concatenated (2 H in v2)
    D  model width (embed)           K  key dim per head       V  value dim per head
    F  feed-forward hidden width     R  rotary frequencies (K / 2)
    N  vocabulary                    S  persistent-memory slots  P  persistent-memory banks
    I  number of query tiles         L  lanes of a TPU vector register (kernels)
    A  pages of a paged memory       U  pairs in a page           W  pages a query keeps
    M  moons (complex numbers of a three-moons observation)
    E  evaluated context lengths     J  rollout steps (three moons)
    Z  a page's ball [midpoint, radius] (K + 1)
    1  a broadcast axis              2  (real, imaginary) of a complex number
    T1  time + 1 (a token batch before it is split into inputs and targets)

The layout of every per-head tensor is ``[batch, time, heads, dim]``. How the package is laid
out, and where each equation of the papers is computed: ``docs/architecture.md``.
"""

from mmjax.ops import (
    MaskSpec,
    adaptive_bandwidth,
    extract_values,
    gated_keys,
    l2_normalize,
    leaky_average,
    peek_ahead_values,
    retrieve,
    tier_masks,
    visible_count,
)

__version__ = "0.1.0"

__all__ = [
    "MaskSpec",
    "adaptive_bandwidth",
    "extract_values",
    "gated_keys",
    "l2_normalize",
    "leaky_average",
    "peek_ahead_values",
    "retrieve",
    "tier_masks",
    "visible_count",
]
