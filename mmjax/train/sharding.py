"""Device mesh and logical-axis rules: the one place where parameters meet devices.

Modules annotate every parameter with logical axis names (``embed``, ``heads``, ``head_dim``,
``mlp``, ``vocab``, ``slots``, ...). A config's ``sharding.rules`` maps those names to the mesh
axes ``("data", "fsdp", "tensor")``; ``-1`` in ``sharding.mesh`` means "the remaining devices".
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


def make_mesh(sizes: Sequence[int] = (-1, 1, 1)) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh over all devices, with Auto axis types."""
    shape = mesh_shape(sizes, jax.device_count())
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


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
