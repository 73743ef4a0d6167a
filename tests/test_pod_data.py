"""Per-host data on real TPU slices' device orders (the topology descriptions of libtpu).

On a slice the trainer's mesh orders devices by torus position, so every host's batch rows
are several blocks spread over the batch; each host must read exactly those rows, and the
hosts' rows together must be the one-process global batch.
"""

import unittest.mock as mock

import jax
import numpy as np
import pytest

from mmjax.data import pipeline
from mmjax.data.store import TokenStore, write_store
from mmjax.kernels import compile_check
from mmjax.train import sharding as sharding_lib

pytestmark = pytest.mark.skipif(not compile_check.libtpu_available(),
                                reason="needs libtpu (the topology descriptions)")

T = 8
# slice -> (hosts, host 0's rows of a batch of one row per chip, mesh (chips, 1, 1))
SLICES = {
    "v5e:4x4": (4, [0, 1, 6, 15]),
    "v5p:2x2x4": (4, [0, 4, 8, 12]),
    "v5p:4x4x4": (16, [0, 4, 16, 20]),
    "v5e:16x16": (64, [0, 1, 16, 17]),
}


def slice_sharding(topology, mesh_shape, num_slices=1):
    """The trainer's batch sharding over ``num_slices`` slices of ``topology`` (the mesh of
    one slice is ``mesh_shape``), and the devices."""
    devices = compile_check.topology_devices(topology, num_slices)
    mesh = sharding_lib.make_mesh(mesh_shape, devices=devices, num_slices=num_slices)
    return sharding_lib.batch_sharding(mesh), devices


@pytest.mark.parametrize("topology", sorted(SLICES))
@pytest.mark.parametrize("batch_axis", [0, 1])
def test_every_host_holds_its_share_of_rows_in_any_device_order(topology, batch_axis):
    hosts, host0 = SLICES[topology]
    sharding, devices = slice_sharding(topology, (len(devices_of(topology)), 1, 1)
                                       if batch_axis == 0 else
                                       (1, len(devices_of(topology)), 1))
    batch = 2 * len(devices)  # two rows per chip
    by = pipeline.rows_by_process(sharding, batch, T + 1)
    assert sorted(by) == list(range(hosts))
    rows = np.concatenate(list(by.values()))
    assert sorted(rows.tolist()) == list(range(batch))  # disjoint, together the batch
    assert all(len(r) == batch // hosts for r in by.values())
    # the rows are not one block: the case a contiguous-share loader refuses
    assert sorted({int(r) // 2 for r in by[0]}) == host0
    assert not np.array_equal(by[0], np.arange(batch // hosts))


def devices_of(topology):
    return compile_check.topology_devices(topology)


def test_a_two_slice_mesh_splits_rows_by_slice_and_host():
    sharding, devices = slice_sharding("v5e:4x4", (16, 1, 1), num_slices=2)
    by = pipeline.rows_by_process(sharding, 64, T + 1)
    assert sorted(by) == sorted({d.process_index for d in devices}) == list(range(8))
    assert sorted(np.concatenate(list(by.values())).tolist()) == list(range(64))
    assert all(len(r) == 8 for r in by.values())
    assert all(r.max() < 32 for p, r in by.items() if p < 4)  # slice 0: the first half
    assert not np.array_equal(by[0], np.arange(8))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    ids = np.arange(1, 5000)
    docs = np.split(ids, np.arange(37, len(ids), 37))
    path = tmp_path_factory.mktemp("store") / "store"
    write_store(path, {"train": docs, "val": docs[:20]}, vocab_size=1 << 16, eot_id=0)
    return TokenStore(path)


@pytest.mark.parametrize("topology", ["v5e:4x4", "v5p:2x2x4"])
def test_hosts_rows_assemble_the_one_process_batch(store, topology):
    hosts, _ = SLICES[topology]
    sharding, devices = slice_sharding(topology, (len(devices_of(topology)), 1, 1))
    batch = len(devices)

    def batches(**kw):
        return pipeline.TextBatches(store, split="train", context_length=T,
                                    batch_size=batch, vocab_size=1 << 16, seed=4, **kw)

    single = batches()
    expected = np.stack([single.next_local() for _ in range(3)])
    assembled = np.full_like(expected, -1)
    for host in range(hosts):
        with mock.patch.object(jax, "process_index", return_value=host):
            it = batches(sharding=sharding)
        rows = it.local_rows
        for k in range(3):
            assembled[k, rows] = it.next_local()
    np.testing.assert_array_equal(assembled, expected)
