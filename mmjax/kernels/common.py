"""Pieces shared by the TPU and GPU retrieval kernels.

* :class:`BlockSizes`: the tile sizes of the forward and the two backward kernels, validated
  on construction, with defaults per TPU generation and for GPUs.
* Trace-time checks of the inputs (dtypes, head dims, mask scalars) with clear errors.
* :func:`tile_visible`: the mask of one tile, written once for both kernels.
* :func:`kv_steps_bound`: how many kv tiles one query tile can see at most, when the window
  is known at trace time (it sizes the TPU grid; the GPU kernel loops over the exact range).

The mask-to-tile-range arithmetic itself lives in :mod:`mmjax.ops.masks`
(``kv_tile_range``/``q_tile_range``) and is shared with the blocked XLA path.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.ops.masks import NO_WINDOW, MaskSpec

# Largest position the int32 tile arithmetic handles without overflow (window + time).
MAX_POSITION = 1 << 29
TPU_LANES = 128
_BLOCK_FIELDS = ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (rows of queries and keys) of the three kernels.

    Attributes:
      block_q, block_k: query and key tile of the forward kernel.
      block_q_dkv, block_k_dkv: tiles of the backward kernel that produces dk and dv
        (one key tile per program, looping over query tiles).
      block_q_dq, block_k_dq: tiles of the backward kernel that produces dq and dbeta
        (one query tile per program, looping over key tiles).
      num_warps, num_stages: Triton launch parameters (GPU only; ignored on TPU).

    Every block is a positive multiple of 8. The TPU kernel also needs multiples of 128 (the
    lane width: per-row statistics are stored lane-dense) and the GPU kernel powers of two
    >= 16 (Triton tensors, smallest dot); :meth:`check_platform` enforces those at trace time.
    A sequence shorter than a block uses one tile of its own (padded) length instead.
    """

    block_q: int = 128
    block_k: int = 128
    block_q_dkv: int = 128
    block_k_dkv: int = 128
    block_q_dq: int = 128
    block_k_dq: int = 128
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in _BLOCK_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"BlockSizes.{name} must be an int, got {value!r}")
            if value < 8 or value % 8:
                raise ValueError(f"BlockSizes.{name} must be a positive multiple of 8, got "
                                 f"{value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"BlockSizes.num_warps must be 1, 2, 4, 8 or 16, got "
                             f"{self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"BlockSizes.num_stages must be an int >= 1, got "
                             f"{self.num_stages!r}")

    def check_platform(self, platform: str) -> None:
        """Raise if a block breaks the tiling rule of ``platform`` ("tpu" or "gpu")."""
        for name in _BLOCK_FIELDS:
            value = getattr(self, name)
            if platform == "tpu" and value % TPU_LANES:
                raise ValueError(
                    f"BlockSizes.{name}={value} breaks the TPU tiling rule: blocks must be "
                    f"multiples of {TPU_LANES} (per-row statistics are stored {TPU_LANES} "
                    "lanes wide)")
            if platform == "gpu" and (value < 16 or value & (value - 1)):
                raise ValueError(f"BlockSizes.{name}={value} breaks the Triton rule: blocks "
                                 "must be powers of two >= 16")

    @classmethod
    def for_platform(cls, platform: str, generation: str | None = None) -> BlockSizes:
        """Defaults for ``platform`` ("tpu"/"gpu"); TPU ``generation`` in v4, v5e, v5p."""
        if platform == "gpu":
            return DEFAULT_BLOCK_SIZES["gpu"]
        if platform != "tpu":
            raise ValueError(f"platform must be 'tpu' or 'gpu', got {platform!r}")
        generation = generation or tpu_generation()
        if generation not in DEFAULT_BLOCK_SIZES:
            raise ValueError(f"unknown TPU generation {generation!r}; expected one of "
                             f"{sorted(k for k in DEFAULT_BLOCK_SIZES if k != 'gpu')}")
        return DEFAULT_BLOCK_SIZES[generation]


# Starting points, not tuned on hardware (none was available; see docs/kernels.md).
# v4 and v5p: 128x128 MXUs and ample VMEM (32 MiB scoped default on v4): big forward tiles.
# v5e: 4 MXUs of 128x128 and 16 MiB scoped VMEM by default: the backward keeps 256-row tiles.
# GPU: 64x64 tiles suit head dims up to 128 on A100/H100 with 4 warps.
DEFAULT_BLOCK_SIZES = {
    "v4": BlockSizes(512, 512, 256, 512, 512, 256),
    "v5e": BlockSizes(512, 512, 256, 256, 256, 256),
    "v5p": BlockSizes(512, 1024, 512, 512, 512, 512),
    "gpu": BlockSizes(64, 64, 64, 64, 64, 64, num_warps=4, num_stages=2),
}


def tpu_generation() -> str:
    """``v4``/``v5e``/``v5p`` from the first device's kind; ``v4`` when unknown (e.g. CPU)."""
    kind = jax.devices()[0].device_kind.lower()
    if "v5 lite" in kind or "v5e" in kind or "v6" in kind:
        return "v5e"
    if "v5" in kind:
        return "v5p"
    return "v4"


def fit_block(block: int, length: int, platform: str) -> int:
    """The tile used along a sequence of ``length``: ``block``, or one tile for it all.

    A sequence no longer than ``block`` gets the smallest power-of-two tile that holds it
    (at least 16 rows on GPU, a power-of-two multiple of 128 lanes on TPU), capped at
    ``block``. Power-of-two tiles divide one another, so fitting keeps the tiles of one axis
    nested and :func:`padded_length` small.
    """
    if length > block:
        return block
    if platform == "gpu":
        return max(16, 1 << (length - 1).bit_length())
    lane_tiles = -(-length // TPU_LANES)
    return min(block, TPU_LANES * (1 << (lane_tiles - 1).bit_length()))


def padded_length(length: int, blocks) -> int:
    """``length`` rounded up to a multiple of every tile in ``blocks`` (their lcm).

    Every kernel walks the padded axis in whole tiles of its own size, so the padding must be
    a multiple of each of them, not only of the largest: with tiles 384 and 256 a padding to
    384 would leave the 256-row kernel's second tile half outside the array.
    """
    multiple = math.lcm(*blocks)
    return -(-length // multiple) * multiple


def check_inputs(q, k, v, platform: str) -> None:
    """Trace-time checks of what the kernels support: same dtype, fp32/bf16, head dims."""
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if len(dtypes) != 1:
        raise ValueError("queries, keys and values must share one dtype for the Pallas "
                         f"kernels, got {q.dtype}, {k.dtype}, {v.dtype}")
    (dtype,) = dtypes
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the Pallas kernels take float32 or bfloat16 inputs, got {dtype}")
    for name, dim in (("dk", q.shape[-1]), ("dv", v.shape[-1])):
        if platform == "gpu" and (dim < 16 or dim > 256 or dim & (dim - 1)):
            raise ValueError(f"head dim {name}={dim} is not supported by the GPU kernel: it "
                             "must be a power of two in [16, 256]")
        if platform == "tpu" and (dim % 16 or dim > 512):
            raise ValueError(f"head dim {name}={dim} is not supported by the TPU kernel: it "
                             "must be a multiple of 16 up to 512")


def concrete_int(x):
    """``int(x)`` when ``x`` is known at trace time, else ``None``."""
    if x is None or isinstance(x, jax.core.Tracer):
        return None
    try:
        return int(np.asarray(x))
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def check_mask(mask: MaskSpec, query_offset, q_time: int, k_time: int) -> None:
    """Range checks beyond MaskSpec's: positions must fit the int32 tile arithmetic."""
    window, skip, offset = (concrete_int(x) for x in (mask.window, mask.skip, query_offset))
    if window is not None and window > MAX_POSITION:
        raise ValueError(f"mask.window={window} is out of range for the kernels: use "
                         f"window=None or a value <= {MAX_POSITION}")
    if skip is not None and skip > MAX_POSITION:
        raise ValueError(f"mask.skip={skip} is out of range for the kernels (<= "
                         f"{MAX_POSITION})")
    if offset is not None and offset + max(q_time, k_time) > MAX_POSITION:
        raise ValueError(f"query_offset={offset} is out of range: query_offset + time must "
                         f"be <= {MAX_POSITION}")


def mask_scalars(mask: MaskSpec, query_offset) -> jax.Array:
    """int32 ``[4]``: window (``NO_WINDOW`` if unbounded), skip, query offset, 0."""
    return jnp.stack([mask.window_scalar(), mask.skip_scalar(),
                      jnp.asarray(query_offset, jnp.int32), jnp.zeros((), jnp.int32)])


def unpack_scalars(scalars_ref):
    """(MaskSpec, query_offset) from the scalar ref inside a kernel or an index map."""
    return MaskSpec(window=scalars_ref[0], skip=scalars_ref[1]), scalars_ref[2]


def kv_steps_bound(window, block_rows: int, block_cols: int, num_col_tiles: int) -> int:
    """Most column tiles a tile of ``block_rows`` rows can see, given a static window.

    The visible keys of a query tile form one run of at most ``block_rows + window - 1``
    positions (and symmetrically for the queries of a key tile), which touches at most
    ``cdiv(block_rows + window - 1, block_cols) + 1`` tiles. Without a static window every
    tile may be visible.
    """
    window = concrete_int(window)
    if window is None or window >= NO_WINDOW:
        return num_col_tiles
    span = block_rows + window - 1
    return int(min(num_col_tiles, -(-span // block_cols) + 1))


def visible_tile_pairs(mask: MaskSpec, query_offset, q_time: int, k_time: int,
                       block_q: int, block_k: int) -> int:
    """(query tile, key tile) pairs a kernel computes, counted at trace time.

    Each query tile computes the run of key tiles from its first to its last visible key
    (the range of :func:`mmjax.ops.masks.kv_tile_range`). Scalars traced at trace time
    count as their loosest value (no window, skip 0, offset 0), so the count is then an
    upper bound.
    """
    window, skip, offset = (concrete_int(x) for x in (mask.window, mask.skip, query_offset))
    window = NO_WINDOW if window is None else window
    skip, offset = skip or 0, offset or 0
    first_q = np.arange(0, q_time, block_q)
    last_q = np.minimum(first_q + block_q, q_time) - 1
    lo = np.maximum(offset + first_q - window, 0)
    hi = np.minimum(offset + last_q - 1 - skip, k_time - 1)
    tiles = np.where(hi >= lo, hi // block_k - lo // block_k + 1, 0)
    return int(tiles.sum())


def kernel_cost(kind: str, mask: MaskSpec, query_offset, q_time: int, k_time: int,
                block_q: int, block_k: int, batch_heads: int, dk: int, dv: int,
                operand_bytes: int):
    """``pl.CostEstimate`` of one kernel (``kind``: "fwd", "dkv" or "dq"), so that XLA's
    cost analysis counts the FLOPs it cannot see inside a Pallas call.

    Per computed tile pair (:func:`visible_tile_pairs`) of ``block_q x block_k`` scores:
    the forward's ``q k^T`` and ``p v``; dkv's recomputed scores, ``dy v^T``, ``p^T dy`` and
    ``ds^T q``; dq's recomputed scores, ``dy v^T`` and ``ds k``; one exponential per score.
    """
    from jax.experimental import pallas as pl

    dims = {"fwd": dk + dv, "dkv": 2 * dk + 2 * dv, "dq": 2 * dk + dv}[kind]
    scores = batch_heads * block_q * block_k * visible_tile_pairs(
        mask, query_offset, q_time, k_time, block_q, block_k)
    return pl.CostEstimate(flops=2 * scores * dims, transcendentals=scores,
                           bytes_accessed=int(operand_bytes))


def tile_visible(q_pos, k_pos, mask: MaskSpec, q_end, k_time):
    """Visibility of one tile: the mask, restricted to real (unpadded) queries and keys.

    ``q_pos`` and ``k_pos`` are broadcastable int32 arrays of absolute positions (e.g.
    ``[Q, 1]`` and ``[1, C]``, or the transposed pair); ``q_end`` is one past the last real
    query position.
    """
    # Same rule as mmjax.ops.masks.visible_mask, for 2-D broadcastable positions.
    visible = (k_pos <= q_pos - 1 - mask.skip_scalar()) & (k_pos >= q_pos - mask.window_scalar())
    return visible & (k_pos < k_time) & (q_pos < q_end)


def pad_time(x, axis: int, multiple: int):
    """Zero-pad ``x`` along ``axis`` to a multiple of ``multiple``."""
    pad = (-x.shape[axis]) % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def prepare(q, k, v, mask: MaskSpec, query_offset, block_sizes: BlockSizes | None,
            platform: str):
    """Trace-time checks and tile sizes shared by both kernels' entry points.

    Returns ``(blocks, q_pad, k_pad)``: the block sizes fitted to the sequence lengths, and
    the lengths padded to a multiple of every query / key tile (:func:`padded_length`).
    """
    check_inputs(q, k, v, platform)
    blocks = block_sizes or BlockSizes.for_platform(platform)
    blocks.check_platform(platform)
    tq, tk = q.shape[1], k.shape[1]
    check_mask(mask, query_offset, tq, tk)
    fit_q = functools.partial(fit_block, length=tq, platform=platform)
    fit_k = functools.partial(fit_block, length=tk, platform=platform)
    blocks = dataclasses.replace(
        blocks,
        block_q=fit_q(blocks.block_q), block_k=fit_k(blocks.block_k),
        block_q_dkv=fit_q(blocks.block_q_dkv), block_k_dkv=fit_k(blocks.block_k_dkv),
        block_q_dq=fit_q(blocks.block_q_dq), block_k_dq=fit_k(blocks.block_k_dq))
    q_pad = padded_length(tq, (blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq))
    k_pad = padded_length(tk, (blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq))
    return blocks, q_pad, k_pad
