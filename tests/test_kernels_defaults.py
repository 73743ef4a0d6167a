"""The kernels with every generation's default block sizes, at lengths that are not multiples
of any block, against the reference (interpret mode on CPU).

The backward kernels use other tiles than the forward (e.g. v4: 512 x 512 forward, 256 x 512
for dk/dv, 512 x 256 for dq), so a length that is not a multiple of every tile exercises the
padding of each kernel separately; ``tests/test_kernels.py`` covers the small equal blocks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import check

from mmjax.kernels import common
from mmjax.kernels.common import DEFAULT_BLOCK_SIZES, BlockSizes
from mmjax.ops import MaskSpec

GENERATIONS = ("v4", "v5e", "v5p", "gpu")
LENGTHS = (1, 129, 257, 300, 513, 1031)
MASKS = {
    "causal": MaskSpec(),
    "window": MaskSpec(window=16),
    "skip": MaskSpec(skip=64),
    "window_skip": MaskSpec(window=300, skip=5),
}


def _platform(generation):
    return "gpu" if generation == "gpu" else "tpu"


def _axes(blocks):
    return ((blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq),
            (blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq))


@pytest.mark.parametrize("generation", GENERATIONS)
def test_padding_is_a_multiple_of_every_fitted_tile(generation):
    """The cause of the wrong TPU gradients: padding to the largest tile only."""
    blocks = DEFAULT_BLOCK_SIZES[generation]
    for length in range(1, 2200):
        x = jax.ShapeDtypeStruct((1, length, 1, 16), jnp.float32)
        fitted, q_pad, k_pad = common.prepare(x, x, x, MaskSpec(), 0, blocks,
                                              _platform(generation))
        for tiles, pad in zip(_axes(fitted), (q_pad, k_pad), strict=True):
            assert pad >= length and all(pad % tile == 0 for tile in tiles), (length, tiles, pad)
            assert pad - length < np.lcm.reduce(tiles), (length, tiles, pad)


def test_padding_with_tiles_that_do_not_nest():
    """Tiles 384 and 256 (both valid on TPU): the padding is a multiple of their lcm."""
    assert common.padded_length(300, (384, 256, 384)) == 768
    assert common.padded_length(768, (384, 256, 384)) == 768
    assert common.fit_block(512, 257, "tpu") == 512
    assert common.fit_block(384, 257, "tpu") == 384
    assert common.fit_block(512, 100, "tpu") == 128
    assert common.fit_block(64, 33, "gpu") == 64
    assert common.fit_block(64, 1, "gpu") == 16


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("t", LENGTHS)
def test_default_blocks_strict_causal(generation, t):
    check(_platform(generation), t, t, MaskSpec(), blocks=DEFAULT_BLOCK_SIZES[generation],
          b=2, h=3)


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("mask", MASKS)
def test_default_blocks_every_mask_with_query_offset(generation, mask):
    """257 queries at positions 256..512 against 513 keys: every tile edge is ragged."""
    check(_platform(generation), 257, 513, MASKS[mask], offset=256,
          blocks=DEFAULT_BLOCK_SIZES[generation], b=2, h=3)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_default_blocks_bf16(generation):
    check(_platform(generation), 300, 1031, MaskSpec(window=300, skip=5), offset=731,
          dtype=jnp.bfloat16, blocks=DEFAULT_BLOCK_SIZES[generation], b=2, h=3)


@pytest.mark.parametrize(
    "t,mask,offset",
    [(256, MaskSpec(), 0), (257, MaskSpec(), 0), (258, MaskSpec(), 0), (300, MaskSpec(), 0),
     (257, MaskSpec(window=16), 1)],
    ids=["256", "257", "258", "300", "257-window16-offset1"])
def test_past_failures_through_default_blocks(t, mask, offset):
    """The reported failures: v4 defaults (what ``impl="pallas_tpu"`` picks on CPU)."""
    check("tpu", t, t + offset, mask, offset=offset, blocks=BlockSizes.for_platform("tpu"),
          b=2, h=3)


# ----------------------------------------------------------------------------- random sweep

SWEEP_SEEDS = range(24)


def _random_blocks(rng, platform):
    if rng.random() < 0.5:
        names = ("v4", "v5e", "v5p") if platform == "tpu" else ("gpu",)
        return DEFAULT_BLOCK_SIZES[names[rng.integers(len(names))]]
    choices = (128, 256, 384, 512) if platform == "tpu" else (16, 32, 64, 128)
    return BlockSizes(*(int(rng.choice(choices)) for _ in range(6)))


def random_case(seed):
    """A case drawn from the valid ranges: blocks, lengths, offset, mask, dtype, bandwidth."""
    rng = np.random.default_rng(seed)
    platform = ("tpu", "gpu")[seed % 2]
    tq = int(rng.integers(1, 1100))
    offset = int(rng.integers(0, 600)) if rng.random() < 0.6 else 0
    tk = max(1, offset + tq + int(rng.integers(-50, 200)))
    window = None if rng.random() < 0.4 else int(rng.integers(1, 700))
    skip = 0 if rng.random() < 0.4 else int(rng.integers(0, 300))
    return dict(
        platform=platform, tq=tq, tk=tk, mask=MaskSpec(window=window, skip=skip),
        offset=offset, blocks=_random_blocks(rng, platform),
        dtype=jnp.bfloat16 if rng.random() < 0.25 else jnp.float32,
        bandwidth=("rows", "heads")[int(rng.integers(2))], b=int(rng.integers(1, 3)),
        h=int(rng.integers(1, 4)), dk=int(rng.choice([16, 32])), dv=int(rng.choice([16, 32])),
        seed=seed)


def test_random_cases_cover_the_ranges():
    cases = [random_case(seed) for seed in SWEEP_SEEDS]
    assert {c["platform"] for c in cases} == {"tpu", "gpu"}
    assert any(c["offset"] > 0 and c["tk"] > c["tq"] for c in cases)
    assert any(c["mask"].window is None for c in cases)
    assert any(c["mask"].skip > 0 for c in cases)
    assert any(c["dtype"] == jnp.bfloat16 for c in cases)
    assert any(c["blocks"] not in DEFAULT_BLOCK_SIZES.values() for c in cases)
    for c in cases:
        c["blocks"].check_platform(c["platform"])


@pytest.mark.slow
@pytest.mark.parametrize("seed", SWEEP_SEEDS)
def test_random_sweep(seed):
    case = random_case(seed)
    check(case.pop("platform"), case.pop("tq"), case.pop("tk"), case.pop("mask"), **case)


@pytest.mark.parametrize("window, skip, offset", [(None, 0, 0), (None, 0, 1), (40, 0, 0),
                                                  (None, 13, 0), (200, 5, 3), (7, 0, 30)])
def test_kernel_cost_counts_the_tile_pairs_the_kernel_visits(window, skip, offset):
    """The FLOPs a kernel states come from the same tile ranges the kernels walk."""
    from mmjax.ops.masks import kv_tile_range

    mask = MaskSpec(window=window, skip=skip)
    tq, tk, bq, bk = 300, 330, 64, 32
    want = 0
    for q_start in range(0, tq, bq):
        lo, hi = kv_tile_range(q_start, min(q_start + bq, tq), tk, bk, mask, offset)
        want += max(int(hi) - int(lo) + 1, 0)
    assert common.visible_tile_pairs(mask, offset, tq, tk, bq, bk) == want > 0
    cost = common.kernel_cost("fwd", mask, offset, tq, tk, bq, bk, batch_heads=6, dk=16,
                              dv=8, operand_bytes=1000)
    assert cost.flops == 2 * 6 * bq * bk * want * (16 + 8)
    assert cost.transcendentals == 6 * bq * bk * want and cost.bytes_accessed == 1000
    counted = []

    def traced(skip_scalar):  # a traced skip counts as 0: an upper bound
        counted.append(common.visible_tile_pairs(MaskSpec(window=window, skip=skip_scalar),
                                                 offset, tq, tk, bq, bk))
        return skip_scalar

    jax.jit(traced)(jnp.int32(skip))
    assert counted[0] == common.visible_tile_pairs(MaskSpec(window=window), offset, tq, tk,
                                                   bq, bk) >= want
