"""Ahead-of-time compile of a config's full train step for a TPU slice, without the TPU.

    python -m mmjax.aot --config configs/mmv2.py:large --topology v5p:8x8x8 \\
        [--mesh 1,64,8] [--num_slices 2] [--config.data.batch_size=512 ...]

Needs libtpu (``pip install -e ".[tpu]"``). It builds the trainer's mesh (``data, fsdp,
tensor``: ``mmjax.train.sharding.make_mesh``) over the devices of the named topology
(``jax.experimental.topologies``; with ``--num_slices`` N, N such slices data-parallel over
DCN, ``--mesh`` describing one slice), lowers the train step the trainer jits
(``mmjax.train.jitted.jit_train_step``: model, loss, optimiser, NaN guard, shardings,
donation, the Pallas TPU kernels) and compiles it with XLA:TPU and Mosaic. It prints, per
chip: argument, output, temporary and total memory against the chip's HBM; the step's FLOPs
from XLA's cost analysis against the ``6 N`` estimate (``N`` parameters, ``6 N`` per token
for forward and backward; XLA sees inside no Pallas kernel, so the retrieval kernels state
their FLOPs from their shapes, ``mmjax.kernels.common.kernel_cost``, and XLA adds them; it
counts the body of a loop once, so with ``scan_layers`` its figure holds one layer); and the
compile time. Exit status
(:mod:`mmjax.cli`): 0 when the step fits, 1 when it does not (or without libtpu), 2 for bad
arguments (flags, or a config, topology or mesh it cannot compile for: one line).
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import ml_collections
import numpy as np
from flax import linen as nn

from mmjax import cli
from mmjax.config import with_defaults
from mmjax.data import synthetic
from mmjax.kernels import compile_check
from mmjax.models import build_model
from mmjax.train import sharding as sharding_lib
from mmjax.train.jitted import jit_train_step
from mmjax.train.optimizer import make_optimizer
from mmjax.train.state import state_layout

GIB = 1 << 30
# HBM per chip (published figures), by device kind.
HBM_BYTES = {"TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB, "TPU v5": 95 * GIB,
             "TPU v6 lite": 32 * GIB}


@dataclasses.dataclass(frozen=True)
class Report:
    """What one compile says about one chip."""

    topology: str
    device_kind: str
    mesh: dict
    batch_per_chip: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int
    flops: float  # per chip per step, XLA's count (Pallas kernels by their cost estimates)
    flops_6n: float  # per chip per step
    num_params: int
    compile_seconds: float
    scanned: bool = False  # XLA counts a scanned loop's body once: FLOPs then undercount
    num_slices: int = 1

    @property
    def total_bytes(self) -> int:
        """Live at the step's peak: inputs, outputs not aliased to (donated) inputs, temps."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_bytes


def hbm_bytes(device_kind: str) -> int:
    if device_kind not in HBM_BYTES:
        raise ValueError(f"no HBM size known for device kind {device_kind!r}; known: "
                         f"{sorted(HBM_BYTES)}")
    return HBM_BYTES[device_kind]


def devices_per_chip(devices) -> int:
    """1, or 2 where a topology lists each TensorCore of a chip as a device (v4)."""
    return len(devices) // len({(getattr(d, "slice_index", 0), tuple(d.coords))
                                for d in devices})


def topology_mesh(topology: str, sizes, num_slices: int = 1,
                  device_order: str = "auto") -> jax.sharding.Mesh:
    """The trainer's ``(data, fsdp, tensor)`` mesh over the devices of ``num_slices`` slices
    of ``topology`` (``sizes``: one slice's, one ``-1`` allowed).

    v4 slices are described with one device per TensorCore (two per chip); the mesh then
    spans cores, each with half its chip's HBM.
    """
    sharding_lib.check_mesh_options(num_slices, device_order)
    devices = compile_check.topology_devices(topology, num_slices=num_slices)
    return sharding_lib.make_mesh(sizes, devices=devices, num_slices=num_slices,
                                  device_order=device_order)


def lower_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """The trainer's jitted train step for ``config``, lowered for ``mesh`` (abstract state
    and batch: nothing is allocated). Returns ``(lowered, num_params)``."""
    config = with_defaults(config)
    model = build_model(config.model)
    optimizer = make_optimizer(**config.optimizer)
    rules = tuple(config.sharding.rules or sharding_lib.DEFAULT_RULES)
    data = config.data
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    accum = config.train.grad_accum_steps
    if data.batch_size % (batch_devices * accum):
        raise ValueError(f"data.batch_size={data.batch_size} must be a multiple of "
                         f"train.grad_accum_steps ({accum}) x the data x fsdp mesh size "
                         f"({batch_devices})")
    key = jax.random.key(config.train.seed)
    with nn.logical_axis_rules(rules):
        layout = state_layout(model, optimizer, mesh, rules, length=data.context_length,
                              init_rng=key, state_rng=key)
    tokens = jax.ShapeDtypeStruct((data.batch_size, data.context_length + 1), np.int32,
                                  sharding=sharding_lib.batch_sharding(mesh, rules))
    step = jit_train_step(config, model, optimizer, mesh, rules, layout.shardings,
                          synthetic.ignored_targets(data.get("corpus", "tokens")))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = step.lower(layout.abstract, tokens)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(layout.abstract.params))
    return lowered, num_params


def compile_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """The trainer's train step for ``config``, lowered for ``mesh`` and compiled.

    Returns ``(compiled, num_params, seconds)``; nothing is allocated on any device.
    """
    start = time.perf_counter()
    lowered, num_params = lower_train_step(config, mesh)
    with jax.set_mesh(mesh):
        compiled = lowered.compile()
    return compiled, num_params, time.perf_counter() - start


def report(config: ml_collections.ConfigDict, topology: str, mesh_sizes=None,
           num_slices: int | None = None) -> Report:
    """Compile ``config``'s train step for ``num_slices`` (default: the config's
    ``sharding.num_slices``) slices of ``topology``; the per-chip figures."""
    config = with_defaults(config)
    num_slices = config.sharding.num_slices if num_slices is None else num_slices
    mesh = topology_mesh(topology, mesh_sizes or config.sharding.mesh, num_slices,
                         config.sharding.device_order)
    compiled, num_params, seconds = compile_train_step(config, mesh)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    chips = mesh.devices.size  # devices: chips, or cores of v4 chips
    tokens = config.data.batch_size * config.data.context_length
    kind = mesh.devices.flat[0].device_kind
    return Report(
        topology=topology, device_kind=kind, mesh=dict(mesh.shape),
        batch_per_chip=config.data.batch_size / (mesh.shape["data"] * mesh.shape["fsdp"]),
        argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
        code_bytes=memory.generated_code_size_in_bytes,
        hbm_bytes=hbm_bytes(kind) // devices_per_chip(list(mesh.devices.flat)),
        flops=float(cost.get("flops", 0.0)), flops_6n=6.0 * num_params * tokens / chips,
        num_params=num_params, compile_seconds=seconds,
        scanned=bool(config.model.get("scan_layers", False)), num_slices=num_slices)


def format_report(r: Report) -> str:
    gib = lambda b: f"{b / GIB:.2f} GiB"
    ratio = r.flops / r.flops_6n if r.flops_6n else float("nan")
    lines = [
        f"topology {r.topology}" + (f" x {r.num_slices} slices" if r.num_slices > 1 else "")
        + f" ({r.device_kind}, {np.prod(list(r.mesh.values()))} devices), "
        f"mesh {r.mesh}, batch per data shard {r.batch_per_chip:g}",
        f"parameters {r.num_params:,}",
        f"per device: arguments {gib(r.argument_bytes)}, outputs {gib(r.output_bytes)} "
        f"({gib(r.alias_bytes)} aliased to donated inputs), temporaries {gib(r.temp_bytes)}, "
        f"code {gib(r.code_bytes)}",
        f"per device: total {gib(r.total_bytes)} of {gib(r.hbm_bytes)} HBM "
        f"({100 * r.total_bytes / r.hbm_bytes:.0f}%): {'fits' if r.fits else 'DOES NOT FIT'}",
        f"per device per step: {r.flops:.3e} FLOPs (XLA; Pallas kernels not counted"
        + ("; scanned layers: one layer's body counted once" if r.scanned else "")
        + f"), 6N estimate {r.flops_6n:.3e} (ratio {ratio:.2f})",
        f"compile time {r.compile_seconds:.1f} s",
    ]
    return "\n".join(lines)


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:400] if lines else type(error).__name__


def _mesh_arg(text: str | None):
    if text is None:
        return None
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--mesh {text!r}: expected 3 integers data,fsdp,tensor (one may "
                         "be -1)") from None
    if len(sizes) != 3:
        raise ValueError(f"--mesh {text!r}: expected 3 integers data,fsdp,tensor")
    return sizes


def main() -> int:
    from absl import flags

    if not compile_check.libtpu_available():
        raise cli.Error('libtpu is not installed: pip install -e ".[tpu]" (no TPU needed)')
    jax.config.update("jax_platforms", "cpu")  # compile for the topology, never open a TPU
    try:
        result = report(flags.FLAGS.config, flags.FLAGS.topology, _mesh_arg(flags.FLAGS.mesh),
                        flags.FLAGS.num_slices)
    except ValueError as error:  # the arguments, checked before the compile
        raise cli.UsageError(str(error)) from error
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        print(f"DOES NOT FIT: {_first_line(error)}")
        return 1
    print(format_report(result))
    if flags.FLAGS.json:
        print(json.dumps({**dataclasses.asdict(result), "total_bytes": result.total_bytes,
                          "fits": result.fits}))
    return 0 if result.fits else 1


def _define_flags():
    from absl import flags

    from mmjax.config import DEFAULT, define_flag

    define_flag("config", DEFAULT)
    flags.DEFINE_string("topology", "v5e:2x2", "TPU slice, e.g. v4:2x2x4, v5e:16x16, v5p:8x8x8")
    flags.DEFINE_bool("json", False, "Also print the report as one JSON line.")
    flags.DEFINE_string("mesh", None, "data,fsdp,tensor sizes (default: the config's "
                                      "sharding.mesh), one slice's; one may be -1")
    flags.DEFINE_integer("num_slices", None, "Slices data-parallel over DCN (default: the "
                                             "config's sharding.num_slices)")


if __name__ == "__main__":
    cli.run_absl(main, _define_flags)
