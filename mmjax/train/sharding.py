"""Device mesh and logical-axis rules: the one place where parameters meet devices.

Modules annotate every parameter with logical axis names (``embed``, ``heads``, ``head_dim``,
``mlp``, ``vocab``, ``slots``, ...). A config's ``sharding.rules`` maps those names to the mesh
axes ``("data", "fsdp", "tensor")``; ``-1`` in ``sharding.mesh`` means "the remaining devices".

:func:`make_mesh` is the one mesh of the trainer and of ``mmjax.aot``: ``sharding.mesh`` is one
slice's, ``sharding.num_slices`` slices are data-parallel over DCN, and
``sharding.device_order="torus"`` gives a simulated CPU pod a real slice's host order
(:func:`slice_order`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Batch over data x fsdp, parameters fully sharded over fsdp, heads/mlp/vocab over tensor.
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("slots", None),
    ("banks", None),
    ("time", None),
    ("layers", None),  # the stacked axis of scanned blocks
)


def mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolve one ``-1`` entry in ``sizes`` so that the product is ``num_devices``."""
    sizes = [int(s) for s in sizes]
    if len(sizes) != len(MESH_AXES):
        raise ValueError(f"sharding.mesh needs {len(MESH_AXES)} sizes {MESH_AXES}, got {sizes}")
    if sizes.count(-1) > 1:
        raise ValueError(f"sharding.mesh may hold at most one -1, got {sizes}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"cannot split {num_devices} devices as mesh {sizes}")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} "
                         f"devices, {num_devices} are available")
    return tuple(sizes)


DEVICE_ORDERS = ("auto", "torus")


def make_mesh(sizes: Sequence[int] = (-1, 1, 1), *, devices=None, num_slices: int = 1,
              device_order: str = "auto", host_of=None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh with Auto axis types: the trainer's and aot's.

    ``sizes`` describe one slice (one ``-1`` allowed); with ``num_slices`` > 1 the slices are
    data-parallel over DCN: the mesh's data axis is ``num_slices`` x the slice's, slice by
    slice (what ``mesh_utils.create_hybrid_device_mesh`` gives with the DCN factor on data).
    TPU devices keep their ``slice_index``; CPU devices (a simulated pod) take consecutive
    groups of processes as slices. ``devices``: default ``jax.devices()``.

    Within a slice, TPU devices are ordered by torus position as ``jax.make_mesh`` orders
    them (``create_device_mesh`` with ``allow_split_physical_axes=True``, so that any mesh
    whose sizes multiply to the slice works); topologies that list two devices per chip (v4)
    get the chips in that order, a chip's two cores adjacent. CPU devices: ``"auto"`` keeps
    the device list's order (each process's devices one block, as ``jax.make_mesh`` does);
    ``"torus"`` orders them like a real slice's chips (:func:`slice_order`), so that every
    host's (process's) batch rows are spread over the batch. ``host_of(device)``: the host
    id of a device (default its ``process_index``; tests fake hosts with it).
    """
    check_mesh_options(num_slices, device_order)
    devices = list(jax.devices() if devices is None else devices)
    host_of = host_of or (lambda d: d.process_index)
    slices = _split_slices(devices, int(num_slices), host_of)
    shape = mesh_shape(sizes, len(slices[0]))
    grid = np.concatenate([_slice_grid(shape, s, device_order, host_of) for s in slices],
                          axis=0)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def check_mesh_options(num_slices: int = 1, device_order: str = "auto") -> None:
    """One-line ``ValueError`` naming ``sharding.num_slices`` or ``sharding.device_order``
    when it is not an integer >= 1, or not one of :data:`DEVICE_ORDERS`."""
    if device_order not in DEVICE_ORDERS:
        raise ValueError(f"sharding.device_order={device_order!r}: must be one of "
                         f"{', '.join(map(repr, DEVICE_ORDERS))}")
    if not isinstance(num_slices, (int, np.integer)) or isinstance(num_slices, bool) \
            or num_slices < 1:
        raise ValueError(f"sharding.num_slices={num_slices!r}: must be an integer >= 1")


def _split_slices(devices: list, num_slices: int, host_of) -> list[list]:
    """The devices of each slice, slice by slice, each in the device list's order."""
    if devices[0].platform == "tpu":
        key = lambda d: getattr(d, "slice_index", 0)  # noqa: E731
        found = len({key(d) for d in devices})
        if found != num_slices:
            raise ValueError(f"sharding.num_slices={num_slices}: the devices form {found} "
                             f"slice(s)")
        if num_slices == 1:
            return [devices]
    elif num_slices == 1:
        return [devices]
    else:  # no slice_index (CPU): consecutive groups of hosts are the slices
        hosts = sorted({host_of(d) for d in devices})
        if len(hosts) % num_slices:
            raise ValueError(f"sharding.num_slices={num_slices}: {len(hosts)} process(es) "
                             f"do not split into {num_slices} equal slices of consecutive "
                             f"processes")
        rank = {h: i for i, h in enumerate(hosts)}
        per = len(hosts) // num_slices
        key = lambda d: rank[host_of(d)] // per  # noqa: E731
    groups: dict = {}
    for d in devices:
        groups.setdefault(key(d), []).append(d)
    slices = [groups[k] for k in sorted(groups)]
    if len({len(s) for s in slices}) != 1:
        raise ValueError(f"sharding.num_slices={num_slices}: slices of unequal sizes "
                         f"{[len(s) for s in slices]}")
    return slices


def _slice_grid(shape: tuple[int, ...], devices: list, device_order: str, host_of):
    """One slice's devices as an array of ``shape``."""
    if devices[0].platform == "tpu":
        return tpu_device_grid(shape, devices)
    if device_order == "torus":
        perm = slice_order([host_of(d) for d in devices])
        devices = [devices[i] for i in perm]
    return np.asarray(devices, dtype=object).reshape(shape)


def tpu_device_grid(shape: tuple[int, ...], devices: list) -> np.ndarray:
    """TPU devices of one slice in torus order (``create_device_mesh``, splitting physical
    axes where needed). Two devices per chip (v4 cores): the chips in torus order, each
    chip's cores adjacent; an order create_device_mesh cannot give: the topology's own."""
    from jax.experimental import mesh_utils

    try:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except AssertionError:  # more than one device per chip
        pass
    chips: dict = {}
    for d in devices:
        chips.setdefault(tuple(d.coords), []).append(d)
    first = [min(cores, key=lambda d: d.core_on_chip) for cores in chips.values()]
    try:
        chip_order = mesh_utils.create_device_mesh((len(first),), first,
                                                   allow_split_physical_axes=True)
    except (AssertionError, NotImplementedError, ValueError):
        return np.asarray(devices, dtype=object).reshape(shape)
    ordered = [d for chip in chip_order.flat
               for d in sorted(chips[tuple(chip.coords)], key=lambda d: d.core_on_chip)]
    return np.asarray(ordered, dtype=object).reshape(shape)


# ---------------------------------------------------------------- a real slice's host order

# The host (process_index) of each position of a 1-D mesh (N, 1, 1) over real TPU slices,
# as ``make_mesh`` orders their devices: ``python -m mmjax.train.sharding`` prints this table
# from libtpu's topology descriptions (:func:`measure_slice_patterns`; a test compares).
# Recorded 2026-12-01 with jax 0.10.2, libtpu 0.0.42.1. Each host has 4 chips.
SLICE_PATTERNS: dict[str, tuple[int, ...]] = {
    "v5e:4x4": (0, 0, 1, 1, 1, 1, 0, 2, 3, 3, 3, 3, 2, 2, 2, 0),
    "v5p:2x2x4": (0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3),
    "v5p:4x4x4": (
        0, 4, 8, 12, 0, 4, 8, 12, 2, 6, 10, 14, 2, 6, 10, 14, 0, 4, 8, 12, 0, 4, 8, 12, 2, 6,
        10, 14, 2, 6, 10, 14, 1, 5, 9, 13, 1, 5, 9, 13, 3, 7, 11, 15, 3, 7, 11, 15, 1, 5, 9,
        13, 1, 5, 9, 13, 3, 7, 11, 15, 3, 7, 11, 15),
    # v5e:16x16: position 32 i + 16 j + 2 k + l (j, l in 0..1, k in 0..7) is on host 8 k + i
    "v5e:16x16": tuple(8 * k + i for i in range(8) for _j in range(2) for k in range(8)
                       for _l in range(2)),
}


def measure_slice_patterns(names=tuple(SLICE_PATTERNS)) -> dict[str, tuple[int, ...]]:
    """:data:`SLICE_PATTERNS` as libtpu describes the slices today (needs libtpu, no TPU)."""
    from mmjax.kernels import compile_check

    patterns = {}
    for name in names:
        devices = compile_check.topology_devices(name)
        grid = make_mesh((len(devices), 1, 1), devices=devices).devices
        patterns[name] = tuple(int(d.process_index) for d in grid.flat)
    return patterns


def _divisor_near_root(n: int) -> int:
    """The largest divisor of ``n`` that is at most its square root."""
    return max(d for d in range(1, int(np.sqrt(n)) + 1) if n % d == 0)


def grid_pattern(num_hosts: int, per_host: int) -> tuple[int, ...]:
    """The host of each position when hosts own 2-D blocks of a chip grid, walked row-major.

    Hosts sit on a ``rows x cols`` grid (cols >= rows), each owning a block of
    ``height x width`` chips (height >= width): with two hosts or more and two chips per
    host or more, every host's positions fall into ``height`` separate runs.
    """
    rows = _divisor_near_root(num_hosts)
    cols = num_hosts // rows
    width = _divisor_near_root(per_host)
    height = per_host // width
    return tuple((r // height) * cols + c // width
                 for r in range(rows * height) for c in range(cols * width))


def slice_pattern(num_hosts: int, per_host: int) -> tuple[int, ...]:
    """The host of each mesh position for ``num_hosts`` hosts of ``per_host`` devices: a
    recorded real slice's (:data:`SLICE_PATTERNS`, the first of the same size and host
    count), else :func:`grid_pattern`."""
    for pattern in SLICE_PATTERNS.values():
        if len(pattern) == num_hosts * per_host and len(set(pattern)) == num_hosts:
            return pattern
    return grid_pattern(num_hosts, per_host)


def slice_order(host_of_device: Sequence[int]) -> list[int]:
    """A permutation of devices that places each host's devices like a real slice's chips.

    ``host_of_device[i]``: the host id of device ``i`` (every host with the same number of
    devices). Returns ``perm``: mesh position ``p`` holds device ``perm[p]``. Position ``p``
    goes to the ``k``-th host (by sorted id) where ``k = slice_pattern(...)[p]``, which
    gives it its next device in list order. A pure function of the list: every process
    computes the same order.
    """
    hosts = sorted(set(host_of_device))
    by_host = {h: [i for i, x in enumerate(host_of_device) if x == h] for h in hosts}
    counts = {len(v) for v in by_host.values()}
    if len(counts) != 1:
        raise ValueError(f"slice_order needs the same number of devices on every host, got "
                         f"{ {h: len(v) for h, v in by_host.items()} }")
    pattern = slice_pattern(len(hosts), counts.pop())
    taken = {h: 0 for h in hosts}
    perm = []
    for k in pattern:
        host = hosts[k]
        perm.append(by_host[host][taken[host]])
        taken[host] += 1
    return perm


def param_shardings(abstract_variables, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a (boxed, abstract) variable tree from its logical annotations."""
    logical = nn.get_partition_spec(abstract_variables)
    return nn.logical_to_mesh_sharding(logical, mesh, list(rules))


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of a ``[batch, time]`` token array: batch over the rule for ``batch``."""
    spec = nn.logical_to_mesh_axes(("batch", None), list(rules))
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


if __name__ == "__main__":  # print SLICE_PATTERNS as libtpu describes the slices now
    jax.config.update("jax_platforms", "cpu")
    for name, pattern in measure_slice_patterns().items():
        print(f"{name!r}: {pattern},")
