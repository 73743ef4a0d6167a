"""Pure JAX functions (no Flax): reusable in any JAX project."""

from mmjax.ops.features import (
    l2_normalize,
    leaky_average,
    linear_recurrence,
    peek_ahead_values,
)
from mmjax.ops.retrieval import (
    MaskSpec,
    default_impl,
    retrieval_weights,
    retrieve,
    retrieve_blocked,
    retrieve_reference,
    visible_count,
)

__all__ = [
    "MaskSpec",
    "default_impl",
    "l2_normalize",
    "leaky_average",
    "linear_recurrence",
    "peek_ahead_values",
    "retrieval_weights",
    "retrieve",
    "retrieve_blocked",
    "retrieve_reference",
    "visible_count",
]
