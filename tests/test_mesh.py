"""``sharding.make_mesh``: one mesh for the trainer and aot; a real slice's host order for
simulated CPU pods (``device_order="torus"``); several slices data-parallel over DCN."""

import os

import jax
import numpy as np
import pytest

from mmjax.config import DEFAULTS, validate_config, with_defaults
from mmjax.data.pipeline import rows_by_process
from mmjax.kernels import compile_check
from mmjax.train import sharding

needs_libtpu = pytest.mark.skipif(
    not compile_check.libtpu_available() and not os.environ.get("CI"),
    reason='libtpu not installed: pip install -e ".[tpu]"')



def rows_by_host(mesh, global_batch, host_of=None):
    """``{host: sorted rows}`` that the trainer's batch sharding puts on each host."""
    return {h: r.tolist() for h, r in rows_by_process(sharding.batch_sharding(mesh),
                                                      global_batch, 1, host_of).items()}

def fake_hosts(per_host):
    """Host id of each of the 8 fake CPU devices: ``per_host`` consecutive devices a host."""
    return lambda d: d.id // per_host


def runs(positions):
    """How many separate runs of consecutive integers ``positions`` make."""
    return 1 + sum(b != a + 1 for a, b in zip(positions, positions[1:]))


# ------------------------------------------------------------------------- the device order


def test_auto_on_cpu_is_jax_make_mesh():
    mesh = sharding.make_mesh((2, 2, 2))
    want = jax.make_mesh((2, 2, 2), sharding.MESH_AXES)
    assert mesh.axis_names == sharding.MESH_AXES and dict(mesh.shape) == dict(want.shape)
    assert [d.id for d in mesh.devices.flat] == [d.id for d in want.devices.flat]
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3


def test_torus_spreads_every_hosts_batch_rows():
    """4 fake hosts of 2 devices: "auto" gives each host one block of rows, "torus" two."""
    hosts = fake_hosts(2)
    auto = rows_by_host(sharding.make_mesh((8, 1, 1), host_of=hosts), 16,
                                 host_of=hosts)
    assert auto == {h: list(range(4 * h, 4 * h + 4)) for h in range(4)}
    mesh = sharding.make_mesh((8, 1, 1), device_order="torus", host_of=hosts)
    torus = rows_by_host(mesh, 16, host_of=hosts)
    assert sorted(r for rows in torus.values() for r in rows) == list(range(16))
    assert all(len(rows) == 4 and runs(rows) == 2 for rows in torus.values()), torus
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    # the same order from the same device list: every process agrees
    again = sharding.make_mesh((8, 1, 1), device_order="torus", host_of=hosts)
    assert [d.id for d in again.devices.flat] == [d.id for d in mesh.devices.flat]


def test_torus_with_fsdp_and_tensor_axes():
    hosts = fake_hosts(4)  # 2 hosts of 4
    mesh = sharding.make_mesh((1, 4, 2), device_order="torus", host_of=hosts)
    rows = rows_by_host(mesh, 8, host_of=hosts)
    assert all(runs(r) == 2 for r in rows.values()), rows


@pytest.mark.parametrize("name", sorted(sharding.SLICE_PATTERNS))
def test_a_pod_the_size_of_a_recorded_slice_takes_its_pattern(name):
    pattern = sharding.SLICE_PATTERNS[name]
    num_hosts = len(set(pattern))
    per_host = len(pattern) // num_hosts
    # devices listed host by host, as processes list theirs
    host_of_device = [h for h in range(num_hosts) for _ in range(per_host)]
    perm = sharding.slice_order(host_of_device)
    assert sorted(perm) == list(range(len(pattern)))
    got = tuple(host_of_device[i] for i in perm)
    if name == "v5p:2x2x4":  # v5e:4x4 is first of the two 4 x 4 patterns
        assert got == sharding.SLICE_PATTERNS["v5e:4x4"]
    else:
        assert got == pattern
    # host ids need not be 0..N-1; within a host its devices keep their order
    perm2 = sharding.slice_order([10 + 3 * h for h in host_of_device])
    assert perm2 == perm
    assert all(np.all(np.diff([p for p in perm if host_of_device[p] == h]) > 0)
               for h in range(num_hosts))


@pytest.mark.parametrize("num_hosts", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("per_host", [2, 3, 4, 8])
def test_grid_pattern_spreads_rows_of_any_pod(num_hosts, per_host):
    pattern = sharding.grid_pattern(num_hosts, per_host)
    assert len(pattern) == num_hosts * per_host
    for h in range(num_hosts):
        positions = [p for p, x in enumerate(pattern) if x == h]
        assert len(positions) == per_host and runs(positions) >= 2, (h, pattern)


def test_grid_pattern_blocks_walked_row_major():
    # 2 hosts of 4: a 2 x 4 grid of chips, each host a 2 x 2 block
    assert sharding.grid_pattern(2, 4) == (0, 0, 1, 1, 0, 0, 1, 1)
    # 4 hosts of 2: hosts on a 2 x 2 grid, each a 2 x 1 block
    assert sharding.grid_pattern(4, 2) == (0, 1, 0, 1, 2, 3, 2, 3)
    assert sharding.grid_pattern(1, 8) == (0,) * 8


def test_slice_order_refuses_unequal_hosts():
    with pytest.raises(ValueError, match="same number of devices on every host"):
        sharding.slice_order([0, 0, 1])


def test_bad_device_order_is_one_line():
    with pytest.raises(ValueError, match=r"^sharding.device_order='ring': must be one of "
                                         r"'auto', 'torus'$"):
        sharding.make_mesh((8, 1, 1), device_order="ring")


# ------------------------------------------------------------------------------ slices


def test_slices_are_consecutive_process_groups_on_the_data_axis():
    hosts = fake_hosts(2)  # 4 hosts: slices {0, 1} and {2, 3}
    mesh = sharding.make_mesh((-1, 1, 2), num_slices=2, host_of=hosts)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    slice_of = np.vectorize(lambda d: hosts(d) // 2)(mesh.devices)
    assert (slice_of[:2] == 0).all() and (slice_of[2:] == 1).all()
    torus = sharding.make_mesh((4, 1, 1), num_slices=2, host_of=hosts, device_order="torus")
    first = [hosts(d) for d in torus.devices.flat]
    assert first == [0, 1, 0, 1, 2, 3, 2, 3]  # each slice ordered on its own


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_slices=3, host_of=fake_hosts(2)),
     r"sharding.num_slices=3: 4 process\(es\) do not split into 3 equal slices"),
    (dict(num_slices=2), r"sharding.num_slices=2: 1 process\(es\) do not split"),
    (dict(num_slices=0), "sharding.num_slices=0: must be an integer >= 1"),
])
def test_bad_num_slices_is_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        sharding.make_mesh((-1, 1, 1), **kwargs)
    assert "\n" not in str(info.value)


def test_mesh_sizes_describe_one_slice():
    with pytest.raises(ValueError, match="needs 8 devices, 4 are available"):
        sharding.make_mesh((8, 1, 1), num_slices=2, host_of=fake_hosts(2))


# ------------------------------------------------------------------------------ config


def test_sharding_defaults_and_validation():
    assert DEFAULTS["sharding"]["device_order"] == "auto"
    assert DEFAULTS["sharding"]["num_slices"] == 1
    config = with_defaults(_tiny_config())
    validate_config(config)
    config.sharding.device_order = "ring"
    config.sharding.num_slices = 0
    with pytest.raises(ValueError) as info:
        validate_config(config)
    lines = [line.strip() for line in str(info.value).splitlines()]
    assert "sharding.device_order='ring': must be one of 'auto', 'torus'" in lines[1:]
    assert "sharding.num_slices=0: must be an integer >= 1" in lines[1:]


def _tiny_config():
    from config_loading import load_config

    return load_config("gpt2_small.py:tiny")


# ------------------------------------------------------------------------------ real TPUs


@needs_libtpu
def test_recorded_patterns_are_what_libtpu_describes():
    assert sharding.measure_slice_patterns() == sharding.SLICE_PATTERNS


@needs_libtpu
def test_tpu_meshes_split_physical_axes_and_keep_v4_cores_together():
    from jax.experimental import mesh_utils

    devices = compile_check.topology_devices("v5e:16x16")
    mesh = sharding.make_mesh((1, 128, 2), devices=devices)  # splits the 16 x 16 torus
    assert dict(mesh.shape) == {"data": 1, "fsdp": 128, "tensor": 2}
    devices = compile_check.topology_devices("v5p:2x2x4")
    want = mesh_utils.create_device_mesh((4, 2, 2), devices, allow_split_physical_axes=True)
    assert (sharding.make_mesh((4, 2, 2), devices=devices).devices == want).all()
    cores = compile_check.topology_devices("v4:2x2x2")  # two devices per chip
    mesh = sharding.make_mesh((4, 1, 4), devices=cores)
    flat = list(mesh.devices.flat)
    assert sorted(d.id for d in flat) == sorted(d.id for d in cores)
    assert all(flat[i].coords == flat[i + 1].coords and flat[i].core_on_chip == 0
               for i in range(0, len(flat), 2))


@needs_libtpu
def test_tpu_slices_are_the_hybrid_mesh():
    from jax.experimental import mesh_utils

    devices = compile_check.topology_devices("v5e:4x4", num_slices=2)
    mesh = sharding.make_mesh((4, 2, 2), devices=devices, num_slices=2)
    want = mesh_utils.create_hybrid_device_mesh((4, 2, 2), (2, 1, 1), devices,
                                                allow_split_physical_axes=True)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 2, "tensor": 2}
    assert (mesh.devices == want).all()
    for n in (1, 3):
        with pytest.raises(ValueError, match=f"sharding.num_slices={n}: the devices form 2 "
                                             f"slice"):
            sharding.make_mesh((-1, 1, 1), devices=devices, num_slices=n)


# ------------------------------------------------------------------------ a CPU pod

POD_PROCESS = """
import json, os
import jax
jax.distributed.initialize(f"127.0.0.1:{os.environ['MP_PORT']}", num_processes=2,
                           process_id=int(os.environ["MP_ID"]))
from mmjax.data.pipeline import rows_by_process
from mmjax.train import sharding
out = {}
for order in ("auto", "torus"):
    mesh = sharding.make_mesh((-1, 1, 1), device_order=order)
    out[order] = {"ids": [d.id for d in mesh.devices.flat],
                  "rows": {h: r.tolist() for h, r in rows_by_process(
                      sharding.batch_sharding(mesh), 16, 1).items()}}
two = sharding.make_mesh((-1, 1, 1), num_slices=2)
out["slices"] = [d.process_index for d in two.devices.flat]
print(json.dumps(out))
"""


def test_processes_of_a_cpu_pod_agree_on_the_torus_order(tmp_path):
    """Two processes of 4 CPU devices (jax.distributed): both build the same mesh; under
    "torus" each process's rows come in two runs (the grid of 2 hosts x 2 x 2 chips)."""
    import json
    import socket
    import subprocess
    import sys

    script = tmp_path / "pod.py"
    script.write_text(POD_PROCESS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, str(script)], text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, MP_PORT=str(port), MP_ID=str(i), JAX_PLATFORMS="cpu",
                 XLA_FLAGS="--xla_force_host_platform_device_count=4")) for i in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-2000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1]
    rows = outs[0]
    assert rows["auto"]["rows"] == {"0": list(range(8)), "1": list(range(8, 16))}
    assert rows["torus"]["rows"] == {"0": [0, 1, 2, 3, 8, 9, 10, 11],
                                     "1": [4, 5, 6, 7, 12, 13, 14, 15]}
    assert sorted(rows["torus"]["ids"]) == sorted(rows["auto"]["ids"])
    assert rows["slices"] == [0] * 4 + [1] * 4
