"""Pallas kernels for masked kernel-regression retrieval (installed as ``mmjax.kernels``).

``mmjax.ops.retrieve(..., impl="pallas_tpu" | "pallas_gpu")`` lands in :func:`retrieve_pallas`.
One file per kernel: :mod:`mmjax.kernels.retrieval_tpu` (``jax.experimental.pallas.tpu``,
scalar prefetch) and :mod:`mmjax.kernels.retrieval_gpu` (Pallas with the Triton lowering).
Away from its platform a kernel runs in Pallas interpret mode, so both can be checked on CPU.
See ``docs/kernels.md`` for the algorithm and block-size guidance.
"""

from __future__ import annotations

from typing import Any

import jax

from mmjax.kernels.common import DEFAULT_BLOCK_SIZES, BlockSizes, check_inputs, tpu_generation
from mmjax.ops.masks import MaskSpec, target_platform

__all__ = ["BlockSizes", "DEFAULT_BLOCK_SIZES", "retrieve_pallas", "supports", "tpu_generation"]

PLATFORMS = ("tpu", "gpu")


def supports(q_BxQxHxK, k_BxTxHxK, v_BxTxHxV, platform: str) -> bool:
    """Whether the kernel of ``platform`` takes these inputs (dtypes, head dims).

    ``retrieve(impl="auto")`` falls back to the XLA path when it does not; an explicit
    ``impl="pallas_*"`` raises the kernel's error instead.
    """
    try:
        check_inputs(q_BxQxHxK, k_BxTxHxK, v_BxTxHxV, platform)
    except ValueError:
        return False
    return True


def retrieve_pallas(
    q_BxQxHxK: jax.Array,
    k_BxTxHxK: jax.Array,
    v_BxTxHxV: jax.Array,
    beta_QxH: jax.Array,
    mask: MaskSpec,
    query_offset: jax.Array,
    *,
    platform: str,
    block_sizes: BlockSizes | None = None,
    interpret: Any = None,
) -> jax.Array:
    """Masked retrieval with the Pallas kernel of ``platform`` ("tpu" or "gpu").

    Same contract as :func:`mmjax.ops.dense.retrieve_reference` (fp32 ``beta_QxH``,
    traced ``mask`` scalars and ``query_offset`` allowed), differentiable in queries, keys,
    values and bandwidth.

    Args:
      block_sizes: tiles; default: :meth:`BlockSizes.for_platform` (per TPU generation).
      interpret: ``True``/``False``, or a ``pltpu.InterpretParams()`` for the TPU kernel;
        default: interpret mode unless the target platform
        (:func:`mmjax.ops.masks.target_platform`: the current mesh's devices, else JAX's
        default backend) is ``platform`` itself.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    if interpret is None:
        backend = target_platform()
        on_platform = backend == platform or (platform == "gpu" and backend == "cuda")
        interpret = not on_platform
    if platform == "tpu":
        from mmjax.kernels.retrieval_tpu import retrieve_tpu as kernel
    else:
        from mmjax.kernels.retrieval_gpu import retrieve_gpu as kernel
    return kernel(q_BxQxHxK, k_BxTxHxK, v_BxTxHxV, beta_QxH, mask, query_offset,
                  block_sizes=block_sizes, interpret=interpret)
