"""Kernel-regression retrieval: the one core operation of Memory Mosaics.

    y_t = sum_{i in M(t)} softmax_i(beta_t * <q_t, k_i>) v_i

Gaussian kernel regression with unit-norm keys reduces to this softmax form (the
``-beta |k|^2`` terms are constant along a row). ``M(t)`` is the set of visible key/value
pairs of a query at absolute position ``t``::

    t - window <= i <= t - 1 - skip,   0 <= i < k_time

``window=None`` means no lower bound; ``skip=0, window=None`` is the v1 strict-causal mask
(the diagonal is excluded because the value ``v_i`` peeks at token ``i + 1``). A row with no
visible pair returns exactly 0 with finite gradients.

Implementations (``impl``):

* ``"reference"``: dense scores, O(T^2) memory. The specification (:mod:`mmjax.ops.dense`).
* ``"xla"``: blocked online softmax in pure JAX, O(T) memory in forward and backward; masked
  tiles are skipped, so a window or a skip costs O(T * window) (:mod:`mmjax.ops.blocked`).
* ``"pallas_tpu"``, ``"pallas_gpu"``: the Pallas kernels of :mod:`mmjax.kernels`.
* ``"auto"``: the Pallas kernel of the current platform where one exists, else ``"xla"``.

``bandwidth=None`` means a constant 1 (Memory Mosaics v1 folds its bandwidth into the keys):
the blocked path then skips the bandwidth multiply and its gradient. A mask under which every
query sees every key (no window, no skip, ``query_offset >= k_time``, all Python ints: the
persistent memory) is skipped too.

``window``, ``skip`` and ``query_offset`` may be traced integer scalars (v2 draws the
long-term skip per training step without recompiling).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.ops import blocked
from mmjax.ops.dense import retrieve_reference
from mmjax.ops.masks import MaskSpec, check_scalar_range, target_platform

Array = jax.Array

IMPLS = ("auto", "reference", "xla", "pallas_tpu", "pallas_gpu")


# ----------------------------------------------------------------------------- validation


def _validate(queries, keys, values, bandwidth, impl):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    for name, arr in (("keys", keys), ("values", values), ("queries", queries)):
        if jnp.ndim(arr) != 4:
            raise ValueError(
                f"{name} must have rank 4 [batch, time, heads, dim], got shape {jnp.shape(arr)}"
            )
    b, tk, h, dk = keys.shape
    if values.shape[:3] != (b, tk, h):
        raise ValueError(
            f"values must be [batch, k_time, heads, dv] = [{b}, {tk}, {h}, dv] to match keys, "
            f"got shape {values.shape}"
        )
    if queries.shape[0] != b or queries.shape[2:] != (h, dk):
        raise ValueError(
            f"queries must be [batch, q_time, heads, dk] = [{b}, q_time, {h}, {dk}] to match "
            f"keys, got shape {queries.shape}"
        )
    tq = queries.shape[1]
    if bandwidth is not None:
        bshape = jnp.shape(bandwidth)
        if bshape not in ((h,), (tq, h)):
            raise ValueError(
                f"bandwidth must be None, [heads] = ({h},) or [q_time, heads] = ({tq}, {h}), "
                f"got shape {bshape}"
            )
    for name, arr in (("keys", keys), ("values", values), ("queries", queries)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating array, got dtype {arr.dtype}")


def _bandwidth_rows(bandwidth, tq, h) -> Array:
    """``None | [H] | [Tq, H]`` -> fp32 ``[Tq, H]``."""
    if bandwidth is None:
        return jnp.ones((tq, h), jnp.float32)
    return jnp.broadcast_to(jnp.asarray(bandwidth, jnp.float32), (tq, h))


def default_impl() -> str:
    """The implementation ``impl="auto"`` resolves to on :func:`target_platform`."""
    platform = target_platform()
    if platform == "tpu":
        return "pallas_tpu"
    if platform in ("gpu", "cuda", "rocm"):
        return "pallas_gpu"
    return "xla"


# ----------------------------------------------------------------------------- public API


def retrieve(
    keys: Array,
    values: Array,
    *,
    bandwidth: Array | None = None,
    mask: MaskSpec = MaskSpec(),
    queries: Array | None = None,
    query_offset: Any = 0,
    impl: str = "auto",
    block_size: int | None = None,
    sharding: RetrievalSharding | None = None,
) -> Array:
    """Masked kernel-regression retrieval.

    Args:
      keys: ``[batch, k_time, heads, dk]``; key ``i`` sits at absolute position ``i``.
      values: ``[batch, k_time, heads, dv]``.
      bandwidth: ``None`` (a constant 1: no multiply, no gradient), ``[heads]`` or
        ``[q_time, heads]``; multiplies the scores of a row. Differentiable.
      mask: a :class:`MaskSpec` (default: strict causal).
      queries: ``[batch, q_time, heads, dk]``; default: ``keys`` (Memory Mosaics).
      query_offset: absolute position of the first query (int, possibly traced).
      impl: ``"auto" | "reference" | "xla" | "pallas_tpu" | "pallas_gpu"``.
      block_size: query and key tile size of the ``"xla"`` path (default:
        :func:`mmjax.ops.blocked.default_blocks`, by platform, length and window; clipped
        to the lengths). The other paths ignore it.
      sharding: how the Pallas kernels split over the devices of the current mesh
        (:class:`RetrievalSharding`; Mosaic and Triton kernels cannot be partitioned by
        XLA, so under a mesh of several devices they run in a ``shard_map``). Default:
        every device computes the whole retrieval. The other paths let XLA partition.

    Returns:
      ``[batch, q_time, heads, dv]`` in the dtype of ``values``; rows with no visible pair
      are 0. Scores and softmax statistics are computed in fp32.
    """
    if queries is None:
        queries = keys
    if not isinstance(mask, MaskSpec):
        raise TypeError(f"mask must be a MaskSpec, got {type(mask).__name__}")
    _validate(queries, keys, values, bandwidth, impl)
    check_scalar_range("query_offset", query_offset, minimum=0, allow_none=False)
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be None or an integer >= 1, got {block_size!r}")
    if impl == "auto":
        impl = default_impl()
        if impl != "xla" and not _kernel_supports(queries, keys, values, impl):
            impl = "xla"  # e.g. head dims the kernel does not take: the blocked path does
    has_bandwidth = bandwidth is not None
    beta = _bandwidth_rows(bandwidth, queries.shape[1], queries.shape[2])
    offset = jnp.asarray(query_offset, jnp.int32)
    if impl == "reference":
        return retrieve_reference(queries, keys, values, beta, mask, offset)
    if impl == "xla":
        all_visible = blocked.all_visible(mask, query_offset, keys.shape[1])
        block_q, block_k = ((block_size, block_size) if block_size is not None else
                            blocked.default_blocks(queries.shape[1], mask.window, all_visible,
                                                   target_platform()))
        return blocked.retrieve_blocked(queries, keys, values, beta, mask, offset,
                                        block_q=block_q, block_k=block_k,
                                        has_bandwidth=has_bandwidth, all_visible=all_visible)
    from mmjax import kernels  # Pallas kernels are imported only when asked for.

    kernel = functools.partial(kernels.retrieve_pallas, platform=impl.removeprefix("pallas_"))
    # a Python-int offset stays static: the kernels count their FLOPs from it
    return _on_mesh(kernel, sharding or RetrievalSharding(), queries, keys, values, beta, mask,
                    query_offset)


@dataclasses.dataclass(frozen=True)
class RetrievalSharding:
    """Mesh axes (a name, a tuple of names, or None) that split a retrieval's work.

    Attributes:
      batch: the batch axis of queries, keys and values (data parallelism).
      query_time: the queries' time axis, with keys and values whole on every device (the
        persistent memory: its queries are every token of the batch, its keys the slots).
      heads: the heads axis of queries, keys, values and bandwidth (tensor parallelism).

    An axis whose devices do not divide the dimension is not split.
    """

    batch: Any = None
    query_time: Any = None
    heads: Any = None


def _axis_size(mesh, axes) -> int:
    if axes is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))


def _on_mesh(kernel, sharding: RetrievalSharding, q, k, v, beta_QxH, mask: MaskSpec, offset):
    """``kernel(q, k, v, beta, mask, offset)``, in a ``shard_map`` under a multi-device mesh.

    Each device runs the kernel on its block of batch rows, query rows and heads; a device
    holding query rows ``j * Q_local ..`` shifts ``query_offset`` by ``j * Q_local``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, beta_QxH, mask, offset)
    fits = lambda axes, dim: axes if dim % _axis_size(mesh, axes) == 0 else None
    batch = fits(sharding.batch, q.shape[0])
    qtime = fits(sharding.query_time, q.shape[1])
    heads = fits(sharding.heads, q.shape[2])
    P = jax.sharding.PartitionSpec
    q_spec, kv_spec, beta_spec = P(batch, qtime, heads, None), P(batch, None, heads, None), \
        P(qtime, heads)
    local_q = q.shape[1] // _axis_size(mesh, qtime)

    def local(q, k, v, beta, window, skip, offset):
        if qtime is not None:
            offset = offset + jax.lax.axis_index(qtime) * local_q
        return kernel(q, k, v, beta, MaskSpec(window=window, skip=skip), offset)

    # Python-int windows, skips and offsets stay static (they size the TPU grid and count
    # the kernels' FLOPs); traced ones go in.
    static = lambda x: x is None or isinstance(x, (int, np.integer))
    window, skip = mask.window, mask.skip
    args, specs = [q, k, v, beta_QxH], [q_spec, kv_spec, kv_spec, beta_spec]
    for value in (window, skip, offset):
        if not static(value):
            args.append(value)
            specs.append(P())

    def body(q, k, v, beta, *traced):
        traced = list(traced)
        w = window if static(window) else traced.pop(0)
        s = skip if static(skip) else traced.pop(0)
        o = offset if static(offset) else traced.pop(0)
        return local(q, k, v, beta, w, s, o)

    return jax.shard_map(body, in_specs=tuple(specs), out_specs=q_spec,
                         check_vma=False)(*args)


def _kernel_supports(queries, keys, values, impl) -> bool:
    from mmjax import kernels

    return kernels.supports(queries, keys, values, impl.removeprefix("pallas_"))
