"""The Pallas retrieval kernels against the reference, in interpret mode on CPU.

Every case compares the output and the gradients w.r.t. queries, keys, values and bandwidth
(``kernel_cases``). The default block sizes of every generation are swept in
``test_kernels_defaults.py``. Export tests lower the real (non-interpret)
kernels for TPU and CUDA: the only check of the hardware tiling rules available here.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu
from kernel_cases import assert_close, check, inputs, value_and_grads

from mmjax import kernels
from mmjax.kernels import common
from mmjax.kernels.common import BlockSizes
from mmjax.ops import MaskSpec, masks, retrieval, retrieve, retrieve_reference

GPU_SMALL = BlockSizes(16, 32, 32, 16, 16, 32)
TPU_SMALL = BlockSizes(128, 128, 128, 128, 128, 128)
BLOCKS = {"gpu": GPU_SMALL, "tpu": TPU_SMALL}


PLATFORMS = ["gpu", "tpu"]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("t", [1, 7, 128, 300])
def test_strict_causal_lengths(platform, t):
    check(platform, t, t, MaskSpec(), blocks=BLOCKS[platform])


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS)
def test_long_sequence_large_blocks(platform):
    blocks = BlockSizes(*(256,) * 6) if platform == "gpu" else BlockSizes(512, 512, 256, 512,
                                                                          512, 256)
    check(platform, 1024, 1024, MaskSpec(window=300, skip=4), blocks=blocks, h=1)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize(
    "mask,dtype,bandwidth",
    [
        (MaskSpec(window=40), jnp.float32, "heads"),
        (MaskSpec(skip=17), jnp.float32, "rows"),
        (MaskSpec(window=70, skip=5), jnp.bfloat16, "rows"),
    ],
    ids=["window", "skip", "both-bf16"],
)
def test_masks_multi_tile(platform, mask, dtype, bandwidth):
    check(platform, 300, 300, mask, dtype=dtype, bandwidth=bandwidth, blocks=BLOCKS[platform])


@pytest.mark.parametrize("platform", PLATFORMS)
def test_query_offset_chunk(platform):
    """A chunk of 40 queries at positions 250.. against 300 keys (chunked prefill)."""
    check(platform, 40, 300, MaskSpec(window=100, skip=3), offset=250,
           blocks=BLOCKS[platform], b=2)


def test_gpu_other_block_shapes():
    check("gpu", 100, 100, MaskSpec(window=20), blocks=BlockSizes(64, 16, 16, 64, 32, 32),
           dk=32, dv=64)


def test_tpu_other_block_shapes():
    check("tpu", 300, 300, MaskSpec(window=150), blocks=BlockSizes(256, 128, 128, 256, 256,
                                                                    128), dk=32, dv=48)


def test_tpu_interpret_params_simulates_dma_without_races():
    """TPU interpret mode proper: simulated DMAs, NaN-filled fresh buffers, out-of-bounds
    reads raising, two cores sharing the parallel grid axes, and the race detector on."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # races: no public API

    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    check("tpu", 200, 200, MaskSpec(window=130, skip=2), blocks=TPU_SMALL, interpret=params)
    assert not interpret_pallas_call.races.races_found


@pytest.mark.parametrize("impl,bandwidth", [("pallas_tpu", "heads"), ("pallas_gpu", None)])
def test_through_retrieve_with_shared_queries_and_keys(impl, bandwidth):
    """queries=None: keys play both roles; dk must add the query and the key gradients."""
    b, t, h, d = 1, 37, 2, 16
    _, k, v, beta, dy = inputs(b, t, t, h, d, d, jnp.float32, bandwidth="heads")
    beta = beta if bandwidth else None

    def loss(impl_name):
        def f(k, v, beta):
            y = retrieve(k, v, bandwidth=beta, mask=MaskSpec(window=9), impl=impl_name)
            return jnp.sum(y * dy)
        return jax.value_and_grad(f, argnums=(0, 1, 2))(k, v, beta)

    got, want = loss(impl), loss("reference")
    keep = 4 if bandwidth else 3  # loss, dk, dv (, dbeta)
    assert_close((got[0], *got[1])[:keep], (want[0], *want[1])[:keep], 1e-5,
                  names=("loss", "dk", "dv", "dbeta")[:keep])


@pytest.mark.parametrize("platform", PLATFORMS)
def test_runtime_scalars_do_not_recompile(platform):
    """window, skip and query_offset traced under jit: one compile for several values."""
    q, k, v, beta, _ = inputs(1, 24, 64, 1, 16, 16, jnp.float32)
    rows = jnp.broadcast_to(beta, (24, 1))

    @jax.jit
    def f(window, skip, offset):
        return kernels.retrieve_pallas(q, k, v, rows, MaskSpec(window=window, skip=skip),
                                       offset, platform=platform, block_sizes=BLOCKS[platform])

    for window, skip, offset in [(5, 0, 40), (30, 7, 10), (1 << 30, 3, 0)]:
        got = f(jnp.int32(window), jnp.int32(skip), jnp.int32(offset))
        want = retrieve_reference(q, k, v, rows, MaskSpec(window=window, skip=skip),
                                  jnp.int32(offset))
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert f._cache_size() == 1


@pytest.mark.parametrize("platform", PLATFORMS)
def test_hidden_tiles_are_never_read(platform):
    """Keys and values of tiles hidden from every query are NaN: the result must not care."""
    q, k, v, beta, dy = inputs(1, 64, 256, 1, 16, 16, jnp.float32)
    mask, offset = MaskSpec(window=16, skip=2), 192  # queries 192..255 see keys 176..253
    blocks = BlockSizes(*(64,) * 6) if platform == "gpu" else BlockSizes(*(128,) * 6)
    poison = lambda x: x.at[:, :128].set(jnp.nan)  # whole tiles, hidden from every query

    def kernel(q, k, v, beta):
        return kernels.retrieve_pallas(q, poison(k), poison(v), jnp.broadcast_to(beta, (64, 1)),
                                       mask, jnp.int32(offset), platform=platform,
                                       block_sizes=blocks)

    def reference(q, k, v, beta):
        return retrieve_reference(q, k, v, jnp.broadcast_to(beta, (64, 1)), mask,
                                  jnp.int32(offset))

    got = value_and_grads(kernel, q, k, v, beta, dy)
    want = value_and_grads(reference, q, k, v, beta, dy)
    assert_close(got, want, 1e-5)


def _pallas_grids(jaxpr):
    """Grids of the pallas_calls in a jaxpr, nested jaxprs (custom_vjp, pjit) included."""
    grids = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            grids.append(eqn.params["grid_mapping"].grid)
            continue
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                grids += _pallas_grids(inner)
    return grids


def test_tpu_grid_skips_beyond_the_window():
    """With a static window, the TPU grid's inner axis only spans the tiles a window can see."""
    q, k, v, beta, _ = inputs(1, 1024, 1024, 1, 16, 16, jnp.float32)
    rows = jnp.broadcast_to(beta, (1024, 1))

    def grids(mask):
        fn = lambda q, k, v: kernels.retrieve_pallas(q, k, v, rows, mask, jnp.int32(0),
                                                     platform="tpu", block_sizes=TPU_SMALL)
        return _pallas_grids(jax.make_jaxpr(fn)(q, k, v).jaxpr)

    assert grids(MaskSpec(window=256)) == [(1, 1, 8, 4)]  # cdiv(128 + 255, 128) + 1
    assert grids(MaskSpec()) == [(1, 1, 8, 8)]


@pytest.mark.parametrize("tq,offset", [(640, 0), (256, 384)])
def test_tpu_static_window_shrunken_grid_is_correct(tq, offset):
    """A static window shrinks the TPU grid (3 steps for 5 key tiles): results unchanged."""
    check("tpu", tq, 640, MaskSpec(window=100, skip=3), offset=offset, blocks=TPU_SMALL, h=1)


def test_kv_steps_bound_covers_every_tile_range():
    """Exhaustive check on small sizes: kv_steps_bound >= hi - lo + 1 of every query tile."""
    for window in (1, 3, 8, 20):
        for bq, bk in ((8, 8), (8, 16), (16, 8)):
            for offset in (0, 5, 13):
                for skip in (0, 2):
                    mask = MaskSpec(window=window, skip=skip)
                    bound = common.kv_steps_bound(window, bq, bk, 1000)
                    for q_start in range(0, 64, bq):
                        lo, hi = masks.kv_tile_range(q_start, q_start + bq, 80, bk, mask,
                                                         jnp.int32(offset))
                        assert int(hi) - int(lo) + 1 <= bound


# ----------------------------------------------------------------------------- bad input


def test_block_sizes_validation():
    with pytest.raises(ValueError, match="block_k must be a positive multiple of 8, got 12"):
        BlockSizes(block_k=12)
    with pytest.raises(ValueError, match="num_warps"):
        BlockSizes(num_warps=3)
    with pytest.raises(ValueError, match="block_q_dq=64 breaks the TPU tiling rule"):
        BlockSizes(*(128,) * 4, 64, 128).check_platform("tpu")
    with pytest.raises(ValueError, match="block_q=24 breaks the Triton rule"):
        BlockSizes(block_q=24).check_platform("gpu")
    with pytest.raises(ValueError, match="unknown TPU generation 'v3'"):
        BlockSizes.for_platform("tpu", "v3")
    with pytest.raises(dataclasses.FrozenInstanceError):
        BlockSizes().block_q = 256


@pytest.mark.parametrize("kind,generation", [("TPU v4", "v4"), ("TPU v5 lite", "v5e"),
                                             ("TPU v5p", "v5p"), ("TPU v5", "v5p")])
def test_tpu_generation_from_device_kind(monkeypatch, kind, generation):
    fake = type("Device", (), {"device_kind": kind})()
    monkeypatch.setattr(jax, "devices", lambda: [fake])
    assert kernels.tpu_generation() == generation
    assert BlockSizes.for_platform("tpu") == kernels.DEFAULT_BLOCK_SIZES[generation]


def test_default_block_sizes_fit_their_platform():
    for generation in ("v4", "v5e", "v5p"):
        BlockSizes.for_platform("tpu", generation).check_platform("tpu")
    BlockSizes.for_platform("gpu").check_platform("gpu")


def _trace(platform, q, k, v, mask=MaskSpec(), offset=0, blocks=None):
    rows = jnp.ones((q.shape[1], q.shape[2]), jnp.float32)
    return jax.eval_shape(lambda: kernels.retrieve_pallas(
        q, k, v, rows, mask, offset, platform=platform, block_sizes=blocks))


def test_bad_inputs_raise_at_trace_time():
    x = jnp.zeros((1, 8, 1, 16))
    with pytest.raises(ValueError, match="share one dtype"):
        _trace("gpu", x, x.astype(jnp.bfloat16), x)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        _trace("tpu", *(x.astype(jnp.float16),) * 3)
    with pytest.raises(ValueError, match="dk=12 is not supported by the GPU kernel"):
        _trace("gpu", *(jnp.zeros((1, 8, 1, 12)),) * 3)
    with pytest.raises(ValueError, match="dv=24 is not supported by the TPU kernel"):
        _trace("tpu", x, x, jnp.zeros((1, 8, 1, 24)))
    with pytest.raises(ValueError, match="mask.window=1073741824 is out of range"):
        _trace("tpu", x, x, x, mask=MaskSpec(window=1 << 30))
    with pytest.raises(ValueError, match="query_offset=536870910 is out of range"):
        _trace("gpu", x, x, x, offset=(1 << 29) - 2)
    with pytest.raises(ValueError, match="breaks the TPU tiling rule"):
        _trace("tpu", x, x, x, blocks=BlockSizes(block_q=64))
    with pytest.raises(ValueError, match="platform must be one of"):
        _trace("rocm", x, x, x)


# ----------------------------------------------------------------------------- dispatch


def test_auto_picks_the_kernel_of_the_platform(monkeypatch):
    assert retrieval.default_impl() == "xla"  # the tests run on CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert retrieval.default_impl() == "pallas_tpu"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert retrieval.default_impl() == "pallas_gpu"


def test_auto_follows_the_devices_of_the_current_mesh():
    """Under a mesh of TPU devices (an ahead-of-time compile on a CPU host) "auto" is the TPU
    kernel, compiled for real (interpret off); outside it, the CPU's XLA path."""
    device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        assert masks.target_platform() == "tpu"
        assert retrieval.default_impl() == "pallas_tpu"
    assert retrieval.default_impl() == "xla"


def test_retrieve_auto_reaches_the_kernel_of_the_platform(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "retrieve_pallas",
                        lambda *args, platform: calls.append(platform) or args[2])
    k = jnp.ones((1, 4, 1, 16))
    retrieve(k, k, impl="auto")  # CPU: the XLA path, no kernel
    for backend in ("tpu", "gpu"):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        retrieve(k, k, impl="auto")
    assert calls == ["tpu", "gpu"]


def test_interpret_defaults_to_off_only_on_the_kernel_platform(monkeypatch):
    seen = []

    def fake_kernel(*args, block_sizes, interpret):
        seen.append(interpret)

    import mmjax.kernels.retrieval_gpu as gpu_module
    monkeypatch.setattr(gpu_module, "retrieve_gpu", fake_kernel)
    args = (None,) * 6
    kernels.retrieve_pallas(*args, platform="gpu")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    kernels.retrieve_pallas(*args, platform="gpu")
    assert seen == [True, False]


# ----------------------------------------------------------------------------- lowering


def _export_grad(platform, blocks, t=2048, d=128, dtype=jnp.bfloat16, static_window=None):
    spec = jax.ShapeDtypeStruct((2, t, 4, d), dtype)
    rows = jax.ShapeDtypeStruct((t, 4), jnp.float32)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)

    def loss(q, k, v, beta, window, skip, offset):
        window = window if static_window is None else static_window
        y = kernels.retrieve_pallas(q, k, v, beta, MaskSpec(window=window, skip=skip), offset,
                                    platform=platform, block_sizes=blocks, interpret=False)
        return jnp.sum(y.astype(jnp.float32))

    f = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    args = (spec, spec, spec, rows, scalar, scalar, scalar)
    if platform == "tpu":
        return export.export(f, platforms=["tpu"])(*args)
    check = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    return export.export(f, platforms=["cuda"], disabled_checks=[check])(*args)


@pytest.mark.parametrize("generation", ["v4", "v5e", "v5p"])
def test_tpu_kernels_lower_for_each_generation(generation):
    kind = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5"}[generation]
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        exported = _export_grad("tpu", BlockSizes.for_platform("tpu", generation))
        text = exported.mlir_module()
        assert text.count("tpu_custom_call") >= 3  # forward, dkv, dq
        # A static window shrinks the grid: it must lower too.
        _export_grad("tpu", BlockSizes.for_platform("tpu", generation), static_window=256)


def test_gpu_kernels_lower_for_cuda():
    exported = _export_grad("gpu", BlockSizes.for_platform("gpu"), t=1000, d=64)
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") >= 3
    _export_grad("gpu", BlockSizes.for_platform("gpu"), d=128, dtype=jnp.float32)


def test_auto_falls_back_to_xla_for_inputs_the_kernel_does_not_take(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "retrieve_pallas",
                        lambda *args, platform: calls.append(platform) or args[2])
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    odd = jnp.ones((1, 4, 1, 6))  # head dim 6: not a power of two
    y = retrieve(odd, odd, impl="auto")
    assert calls == [] and y.shape == odd.shape
    monkeypatch.undo()  # the real kernel, in interpret mode: an explicit impl raises
    with pytest.raises(ValueError, match="head dim"):
        retrieve(odd, odd, impl="pallas_gpu")
