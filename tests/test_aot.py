"""``python -m mmjax.aot``: the full train step compiled for a TPU slice on this CPU machine
(libtpu, no TPU), and the Pallas kernels split over a mesh by ``shard_map``."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from config_loading import load_config
from kernel_cases import assert_close, inputs, value_and_grads

from mmjax import aot
from mmjax.kernels import compile_check
from mmjax.ops import MaskSpec, RetrievalSharding, retrieve

needs_libtpu = pytest.mark.skipif(
    not compile_check.libtpu_available() and not os.environ.get("CI"),
    reason='libtpu not installed: pip install -e ".[tpu]"')


def _mesh(shape):
    return jax.make_mesh(shape, ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_kernels_run_in_a_shard_map_under_a_mesh(impl):
    """Batch over data x fsdp, heads over tensor: the reference's value and gradients."""
    q, k, v, beta, dy = inputs(4, 40, 60, 4, 16, 16, jnp.float32)
    mask = MaskSpec(window=17, skip=2)
    sharding = RetrievalSharding(batch=("data", "fsdp"), heads="tensor")

    def kernel(q, k, v, beta):
        return retrieve(k, v, queries=q, bandwidth=beta, mask=mask, query_offset=20,
                        impl=impl, sharding=sharding)

    def reference(q, k, v, beta):
        return retrieve(k, v, queries=q, bandwidth=beta, mask=mask, query_offset=20,
                        impl="reference")

    with jax.set_mesh(_mesh((2, 2, 2))):
        got = jax.jit(lambda *a: value_and_grads(kernel, *a))(q, k, v, beta, dy)
        text = jax.jit(kernel).lower(q, k, v, beta).as_text()
    assert "shard_map" in text or "sdy.manual_computation" in text
    assert_close(got, value_and_grads(reference, q, k, v, beta, dy), 1e-5)


def test_query_rows_split_over_the_mesh_keep_their_positions():
    """The persistent memory's layout: query rows split over devices, keys whole; each
    device's rows are shifted by their place in the query axis."""
    q, k, v, beta, dy = inputs(1, 64, 24, 2, 16, 16, jnp.float32)
    mask = MaskSpec(window=30)

    def run(impl, sharding=None):
        return lambda q, k, v, beta: retrieve(k, v, queries=q, bandwidth=beta, mask=mask,
                                              query_offset=3, impl=impl, sharding=sharding)

    with jax.set_mesh(_mesh((4, 1, 2))):
        got = jax.jit(lambda *a: value_and_grads(
            run("pallas_tpu", RetrievalSharding(query_time="data", heads="tensor")), *a))(
                q, k, v, beta, dy)
    assert_close(got, value_and_grads(run("reference"), q, k, v, beta, dy), 1e-5)


def test_axes_that_do_not_divide_a_dimension_are_not_split():
    q, k, v, beta, _ = inputs(3, 16, 16, 3, 16, 16, jnp.float32)  # 3 rows, 3 heads
    with jax.set_mesh(_mesh((2, 1, 4))):
        y = jax.jit(lambda: retrieve(k, v, queries=q, bandwidth=beta, impl="pallas_tpu",
                                     sharding=RetrievalSharding(batch="data",
                                                                heads="tensor")))()
    want = retrieve(k, v, queries=q, bandwidth=beta, impl="reference")
    np.testing.assert_allclose(y, want, atol=1e-5)


# ----------------------------------------------------------------------------- aot


@needs_libtpu
def test_tiny_v2_train_step_compiles_for_a_v5e_slice_with_the_tpu_kernels():
    config = load_config("mmv2.py:tiny")
    mesh = aot.topology_mesh("v5e:2x2", (2, 1, 2))
    compiled, num_params, _ = aot.compile_train_step(config, mesh)
    text = compiled.as_text()
    for kernel in ("fwd", "dkv", "dq"):
        assert f"mmjax_retrieve_{kernel}_tpu" in text
    assert num_params > 0
    report = aot.report(config, "v5e:2x2", (2, 1, 2))
    assert report.fits and report.device_kind == "TPU v5 lite"
    assert report.hbm_bytes == 16 << 30 and report.batch_per_chip == 4
    assert 0 < report.flops and 0 < report.flops_6n
    assert "fits" in aot.format_report(report)


@needs_libtpu
def test_two_slices_compile_data_parallel_over_dcn():
    """``--num_slices 2``: the mesh describes one slice; the data axis spans both."""
    config = load_config("mmv2.py:tiny")
    config.data.batch_size = 16
    report = aot.report(config, "v5e:4x4", (-1, 1, 2), num_slices=2)
    assert report.num_slices == 2 and report.fits
    assert report.mesh == {"data": 16, "fsdp": 1, "tensor": 2}
    assert report.hbm_bytes == 16 << 30 and report.batch_per_chip == 1
    assert "v5e:4x4 x 2 slices" in aot.format_report(report)
    mesh = aot.topology_mesh("v5e:4x4", (-1, 1, 2), num_slices=2)
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slices[:8] == 0).all() and (slices[8:] == 1).all()


@needs_libtpu
def test_meshes_that_split_physical_axes():
    """(1, 128, 2) on a 16 x 16 torus: no subset of the physical axes is 128 or 2."""
    mesh = aot.topology_mesh("v5e:16x16", (1, 128, 2))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 128, "tensor": 2}


def _aot_cli(*args):
    return subprocess.run([sys.executable, "-m", "mmjax.aot", *args], capture_output=True,
                          text=True, timeout=900)


@needs_libtpu
def test_cli_exits_1_when_the_step_does_not_fit():
    result = _aot_cli("--config", "configs/mmv2.py:tiny", "--topology", "v5e:2x2",
                      "--config.model.embed_dim=4096", "--config.model.mlp_dim=65536",
                      "--config.model.num_layers=64", "--config.model.vocab_size=262144")
    assert result.returncode == 1, result.stdout + result.stderr[-2000:]
    assert "DOES NOT FIT" in result.stdout


@needs_libtpu
@pytest.mark.parametrize("args,message", [
    (["--topology", "v3:2x2"], "the generation must be one of"),
    (["--topology", "v5e:3x7"], "unknown TPU topology 'v5e:3x7'"),
    (["--topology", "v5e:2x2", "--mesh", "3,1,1"], "needs 3 devices, 4 are available"),
    (["--topology", "v5e:2x2", "--mesh", "2,2"], "expected 3 integers"),
    (["--topology", "v5e:2x2", "--num_slices", "0"],
     "sharding.num_slices=0: must be an integer >= 1"),
    (["--topology", "v5e:2x2", "--config.sharding.device_order=ring"],
     "sharding.device_order='ring': must be one of 'auto', 'torus'"),
])
def test_cli_bad_arguments_are_one_line(args, message):
    result = _aot_cli("--config", "configs/mmv2.py:tiny", *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_hbm_table_names_unknown_chips():
    assert aot.hbm_bytes("TPU v5") == 95 << 30
    with pytest.raises(ValueError, match="no HBM size known for device kind 'TPU v9'"):
        aot.hbm_bytes("TPU v9")


def test_report_arithmetic():
    r = aot.Report(topology="v4:2x2x1", device_kind="TPU v4", mesh={"data": 4}, batch_per_chip=2,
                   argument_bytes=10, output_bytes=8, alias_bytes=8, temp_bytes=5, code_bytes=1,
                   hbm_bytes=16, flops=1.0, flops_6n=2.0, num_params=3, compile_seconds=0.1)
    assert r.total_bytes == 16 and r.fits
    assert not aot.Report(**{**r.__dict__, "temp_bytes": 6}).fits



@pytest.mark.parametrize("spec", ["gpt2_small.py:tiny", "icll.py:languages=8,steps=2"])
def test_aot_lowers_the_step_the_trainer_jits(spec):
    """aot's program is the trainer's: same function (the NaN guard included), shardings,
    donation and ignored targets; the same text for the same mesh."""
    from mmjax.train.loop import Trainer

    config = load_config(spec)
    trainer = Trainer(config)
    try:
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                            sharding=x.sharding),
                             trainer.init_state())
        d = trainer.config.data
        tokens = jax.ShapeDtypeStruct((d.batch_size, d.context_length + 1), np.int32,
                                      sharding=trainer.batch_sharding)
        with trainer.mesh_context():
            want = trainer._train_step.lower(state, tokens).as_text()
    finally:
        trainer.close()
    lowered, num_params = aot.lower_train_step(config, trainer.mesh)
    assert "guarded_train_step" in want
    assert lowered.as_text() == want
    assert num_params == sum(x.size for x in jax.tree.leaves(state.params))


def test_aot_meshes_starts_near_a_token_budget_and_doubles_until_it_fits(monkeypatch):
    import pathlib

    bench = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    import aot_meshes

    assert aot_meshes.start_accum("mmv2.py:small", "v5e:4x4") == 16  # 64 rows -> 4 per chip
    assert aot_meshes.start_accum("mmv2.py:large", "v5p:2x2x4") == 4  # 16 rows of 4096
    assert aot_meshes.start_accum("mmv2.py:small,finetune", "v5e:4x4") == 8  # one 32k row
    assert aot_meshes.start_accum("gpt2_small.py", "v5e:2x2") == 4  # 32 rows of 512
    # tensor 2: 8 batch shards of 16 rows of 32k: one row per shard per micro-batch
    assert aot_meshes.start_accum("mmv2.py:small,finetune", "v5e:4x4", "1,-1,2") == 16
    tried = []

    def fake_run(config, topology, mesh, accum, finetune, timeout):
        tried.append((config, accum, finetune))
        if accum < 32:
            return {"status": "does not fit: RESOURCE_EXHAUSTED"}
        return {"fits": True, "mesh": {"data": 1, "fsdp": 16, "tensor": 1},
                "total_bytes": 2**30, "hbm_bytes": 16 * 2**30, "batch_per_chip": 8.0,
                "compile_seconds": 1.0}

    monkeypatch.setattr(aot_meshes, "run_case", fake_run)
    rows = aot_meshes.measure("mmv2.py:small,finetune", "v5e:4x4", "1,-1,1", 60)
    assert tried == [("mmv2.py:small,finetune", 8, False)]  # one sequence per chip: nothing smaller
    assert "does not fit" in aot_meshes.format_row(rows[-1], "v5e:4x4")
    tried.clear()
    rows = aot_meshes.measure("mmv2.py:small", "v5e:4x4", "1,-1,1", 60)
    assert [a for _, a, _ in tried] == [16, 32]
    assert aot_meshes.format_row(rows[-1], "v5e:4x4") == (
        "| mmv2.py:small | v5e:4x4 | fsdp 16 | 32 | 0.25 | 1.0 / 16 GiB | yes | 1 |")
