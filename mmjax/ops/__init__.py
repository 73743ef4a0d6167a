"""Pure JAX functions (no Flax): reusable in any JAX project.

``retrieve`` is the one core operation (``retrieve_paged`` its top-pages form for long
memories); the feature extractors and the v2 bandwidth, tier
and skip-schedule functions are the rest of the math of both papers; ``project`` is every
weight matmul and ``lm_head_loss`` the language-model loss. Importing this package
does not import Flax.
"""

from mmjax.ops.blocked import retrieve_blocked
from mmjax.ops.dense import fold_heads, retrieval_weights, retrieve_dense, retrieve_reference
from mmjax.ops.features import (
    EXP_PARAM_SCALE,
    extract_values,
    gated_key_average,
    gated_keys,
    gated_leaky_average,
    key_scale,
    l2_normalize,
    leaky_average,
    leaky_key_average,
    leaky_keys,
    linear_recurrence,
    peek_ahead_values,
    scaled_unit_keys,
)
from mmjax.ops.linear import project
from mmjax.ops.loss import cross_entropy, lm_head_loss
from mmjax.ops.masks import MaskSpec, target_platform, visible_count
from mmjax.ops.memory_v2 import (
    adaptive_bandwidth,
    bandwidth_parameters,
    inverse_bandwidth_parameters,
    select_long_term_skip,
    tier_bandwidth,
    tier_masks,
    validate_skip_schedule,
)
from mmjax.ops.paged import (
    page_bounds,
    page_scores,
    quantize_pages,
    retrieve_from_pages,
    retrieve_paged,
)
from mmjax.ops.retrieval import RetrievalSharding, default_impl, retrieve

__all__ = [
    "EXP_PARAM_SCALE",
    "MaskSpec",
    "RetrievalSharding",
    "adaptive_bandwidth",
    "bandwidth_parameters",
    "cross_entropy",
    "default_impl",
    "extract_values",
    "fold_heads",
    "gated_key_average",
    "gated_keys",
    "gated_leaky_average",
    "inverse_bandwidth_parameters",
    "key_scale",
    "l2_normalize",
    "leaky_average",
    "leaky_key_average",
    "leaky_keys",
    "linear_recurrence",
    "lm_head_loss",
    "page_bounds",
    "page_scores",
    "peek_ahead_values",
    "project",
    "quantize_pages",
    "retrieval_weights",
    "retrieve",
    "retrieve_blocked",
    "retrieve_dense",
    "retrieve_from_pages",
    "retrieve_paged",
    "retrieve_reference",
    "scaled_unit_keys",
    "target_platform",
    "select_long_term_skip",
    "tier_bandwidth",
    "tier_masks",
    "validate_skip_schedule",
    "visible_count",
]
