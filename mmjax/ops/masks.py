"""Which key positions a query may see, and which tiles hold them.

A query at absolute position ``t`` sees the pairs ``i`` with
``t - window <= i <= t - 1 - skip`` and ``0 <= i < k_time`` (:class:`MaskSpec`). The tile
ranges below turn that rule into the key (or query) tiles a block of queries (or keys) must
visit; the blocked XLA path and the Pallas kernels share them, so the arithmetic lives here
once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Stands for "no lower bound" once a window is turned into an int32 scalar.
NO_WINDOW = 1 << 30


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Which key positions a query at absolute position ``t`` may see.

    Visible ``i``: ``t - window <= i <= t - 1 - skip``.

    Attributes:
      window: ``None`` (no lower bound) or an integer ``>= 1`` (Python int or traced scalar).
      skip: integer ``>= 0``: the most recent ``skip`` pairs before the diagonal are hidden.
    """

    window: Any = None
    skip: Any = 0

    def __post_init__(self):
        check_scalar_range("mask.window", self.window, minimum=1, allow_none=True)
        check_scalar_range("mask.skip", self.skip, minimum=0, allow_none=False)

    def window_scalar(self) -> Array:
        """The window as an int32 scalar (``NO_WINDOW`` when unbounded)."""
        if self.window is None:
            return jnp.asarray(NO_WINDOW, jnp.int32)
        return jnp.asarray(self.window, jnp.int32)

    def skip_scalar(self) -> Array:
        return jnp.asarray(self.skip, jnp.int32)


# MaskSpec may hold traced scalars: make it a pytree so it can cross jit boundaries.
jax.tree_util.register_dataclass(MaskSpec, data_fields=["window", "skip"], meta_fields=[])


def check_scalar_range(name, value, *, minimum, allow_none):
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{name} must be an integer >= {minimum}, got None")
    if isinstance(value, jax.core.Tracer):
        if jnp.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")
        return
    try:
        arr = np.asarray(value)
    except Exception:  # pragma: no cover - exotic objects
        return
    if arr.dtype == object:  # e.g. a placeholder during pytree unflattening
        return
    if arr.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r} ({arr.dtype})")
    if int(arr) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {int(arr)}")


def visible_count(t: Array, window=None, skip=0) -> Array:
    """Number of pairs visible at absolute query position ``t`` (assuming keys ``0..t-1``).

    ``n_t = max(0, min(t - skip, window if window else t - skip))`` i.e. the size of
    ``{i : max(0, t - window) <= i <= t - 1 - skip}``.

    Args:
      t: integer array of absolute query positions (any shape).
      window: ``None`` or an integer ``>= 1``; skip: integer ``>= 0`` (traced allowed).
    Returns:
      int32 array shaped like ``t``.
    """
    spec = MaskSpec(window=window, skip=skip)
    t = jnp.asarray(t, jnp.int32)
    hi = t - 1 - spec.skip_scalar()
    lo = jnp.maximum(t - spec.window_scalar(), 0)
    return jnp.maximum(hi - lo + 1, 0).astype(jnp.int32)


def visible_mask(q_pos: Array, k_pos: Array, mask: MaskSpec) -> Array:
    """Boolean ``[..., q, k]`` visibility of keys at ``k_pos [..., k]`` for queries at
    ``q_pos [..., q]`` (leading axes broadcast, e.g. one row of positions per batch row).

    A negative key position marks an empty cache slot: never visible.
    """
    q = q_pos[..., :, None]
    k = k_pos[..., None, :]
    return (k <= q - 1 - mask.skip_scalar()) & (k >= q - mask.window_scalar()) & (k >= 0)


def kv_tile_range(q_start, q_stop, k_time, block_k, mask: MaskSpec, query_offset):
    """Key tiles ``[lo, hi]`` (inclusive) that queries ``[q_start, q_stop)`` may see.

    ``hi < lo`` when every key is hidden from the whole query tile. Shared by the XLA path
    and the kernels so that the tile arithmetic lives in one place.
    """
    t_first = query_offset + q_start
    t_last = query_offset + q_stop - 1
    first_key = jnp.maximum(t_first - mask.window_scalar(), 0)
    last_key = jnp.minimum(t_last - 1 - mask.skip_scalar(), k_time - 1)
    lo = first_key // block_k
    hi = jnp.where(last_key < first_key, lo - 1, last_key // block_k)
    return lo, hi


def q_tile_range(k_start, k_stop, q_time, block_q, mask: MaskSpec, query_offset):
    """Query tiles ``[lo, hi]`` (inclusive) that see some key in ``[k_start, k_stop)``."""
    # key i is visible from t in [i + 1 + skip, i + window]
    t_first = k_start + 1 + mask.skip_scalar()
    t_last = (k_stop - 1) + jnp.minimum(mask.window_scalar(), NO_WINDOW)
    first_q = jnp.maximum(t_first - query_offset, 0)
    last_q = jnp.minimum(t_last - query_offset, q_time - 1)
    lo = first_q // block_q
    hi = jnp.where(last_q < first_q, lo - 1, last_q // block_q)
    return lo, hi


def target_platform() -> str:
    """The platform the current computation is built for.

    The devices of the mesh set with ``jax.set_mesh`` when there is one (it may describe a TPU
    slice on a CPU host, for ahead-of-time compilation), else JAX's default backend.
    """
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()
