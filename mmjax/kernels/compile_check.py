"""Compile the TPU retrieval kernels with the real TPU compiler, on any machine.

    python -m mmjax.kernels.compile_check                       # every generation, full matrix
    python -m mmjax.kernels.compile_check --generations v5e --head_dims 128 --lengths 4096
    python -m mmjax.kernels.compile_check --blocks 512,256,256,256,256,256   # tuning offline

Needs libtpu (``pip install -e ".[tpu]"``), no TPU: ``jax.experimental.topologies`` describes
the devices of a TPU slice on a CPU host, and lowering under a mesh of those devices makes
Pallas emit Mosaic (``interpret=False``) and XLA:TPU compile it, Mosaic's own passes included.
For each case (generation x head dim x dtype x mask x length) it compiles the forward and both
backward kernels, as ``jax.grad`` of the retrieval, and prints one row: whether it compiled, the
three kernels found as ``tpu_custom_call``s in the compiled program, the scoped VMEM each one
uses (as the compiler allotted it), and the compile time. Cases that differ only in the mask
are compiled as one program (each mask under its own ``named_scope``; about 2.5x faster than
one program each), and alone when that program fails, so that each row names its own error.
It exits 1 if any case fails (exit statuses: :mod:`mmjax.cli`).

What this proves: Mosaic accepts the kernels (block shapes, layouts, VMEM within the scoped
limit) for those generations and shapes. What it does not: numerics (``tests/`` checks those
in interpret mode) and speed (only a TPU can tell).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import cli
from mmjax.kernels.common import DEFAULT_BLOCK_SIZES, BlockSizes
from mmjax.ops.masks import MaskSpec

GENERATIONS = ("v4", "v5e", "v5p")
# The smallest slice of each generation that jax.experimental.topologies names.
TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1"}
ACCELERATOR_TYPES = {"v4": "v4-8", "v5e": "v5litepod-4", "v5p": "v5p-8"}
KERNELS = ("fwd", "dkv", "dq")
# Static masks shrink or bound the grid at trace time; "runtime" passes window, skip and the
# query offset as traced scalars (the scalar-prefetch path with a full grid).
MASKS = ("causal", "window256", "skip64", "runtime")
DEFAULT_HEAD_DIMS = (64, 128, 256)
DEFAULT_DTYPES = ("bfloat16", "float32")
DEFAULT_LENGTHS = (257, 4096, 32768)
BATCH, HEADS = 1, 4


@dataclasses.dataclass(frozen=True)
class Case:
    generation: str
    blocks: BlockSizes
    head_dim: int
    dtype: str
    mask: str
    length: int


def libtpu_available() -> bool:
    """Whether the TPU compiler can be loaded here (libtpu installed)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def _quiet_libtpu(generation: str) -> None:
    """libtpu looks for TPU hosts when it loads; on a CPU machine tell it there are none.

    Only the compiler is used, never a chip, so several processes may load libtpu at once
    (pytest workers, or a check beside a training job): skip its one-process lockfile.
    """
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", ACCELERATOR_TYPES[generation])
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def topology_devices(topology_name: str, num_slices: int = 1) -> list:
    """The TPU devices of a slice named like ``"v5p:8x8x8"`` (no TPU needed, only libtpu);
    with ``num_slices`` > 1, of that many such slices (each device has its ``slice_index``).

    Raises a ``ValueError`` naming the topology when libtpu does not know it.
    """
    from jax.experimental import topologies

    generation = topology_name.split(":", 1)[0]
    if generation not in TOPOLOGIES:
        raise ValueError(f"topology {topology_name!r}: the generation must be one of "
                         f"{GENERATIONS} (e.g. v4:2x2x1, v5e:4x4, v5p:2x2x2)")
    _quiet_libtpu(generation)
    try:
        extra = {"num_slices": int(num_slices)} if num_slices != 1 else {}
        return topologies.get_topology_desc(platform="tpu", topology_name=topology_name,
                                            **extra).devices
    except Exception as error:  # noqa: BLE001 - libtpu's errors are long and generic
        raise ValueError(f"unknown TPU topology {topology_name!r}: {error}") from None


def tpu_mesh(generation: str) -> jax.sharding.Mesh:
    """A one-chip mesh over the first device of ``generation``'s smallest slice."""
    devices = topology_devices(TOPOLOGIES[generation])
    return jax.sharding.Mesh(np.array(devices[:1]), ("x",))


def _mask(name: str, window, skip) -> MaskSpec:
    return {"causal": MaskSpec(), "window256": MaskSpec(window=256),
            "skip64": MaskSpec(skip=64), "runtime": MaskSpec(window=window, skip=skip)}[name]


def lower_group(case: Case, masks: tuple[str, ...], mesh: jax.sharding.Mesh):
    """``jax.grad`` of the retrieval under each mask, summed in one program and lowered for
    the mesh's TPU (not yet compiled). Each mask's kernels run under ``named_scope(mask)``.

    ``case.mask`` is ignored: the masks compiled together share everything else.
    """
    from mmjax.kernels.retrieval_tpu import retrieve_tpu

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    x = jax.ShapeDtypeStruct((BATCH, case.length, HEADS, case.head_dim), case.dtype,
                             sharding=replicated)
    beta = jax.ShapeDtypeStruct((case.length, HEADS), jnp.float32, sharding=replicated)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)

    def loss(q, k, v, beta, window, skip, offset):
        total = jnp.zeros((), jnp.float32)
        for mask in masks:
            with jax.named_scope(mask):
                y = retrieve_tpu(q, k, v, beta, _mask(mask, window, skip), offset,
                                 block_sizes=case.blocks, interpret=False)
            total += jnp.sum(y.astype(jnp.float32))
        return total

    with jax.set_mesh(mesh):
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x, x, x, beta, scalar,
                                                                    scalar, scalar)


def kernel_vmem(compiled_text: str, masks=MASKS) -> dict[tuple[str, str], int]:
    """``{(mask, kernel): scoped VMEM bytes}`` of each retrieval ``tpu_custom_call`` in a
    compiled program; the mask is read from the ``named_scope`` in the op name."""
    found = {}
    decoder = json.JSONDecoder()
    for line in compiled_text.splitlines():
        if 'custom_call_target="tpu_custom_call"' not in line or "backend_config=" not in line:
            continue
        op_name = re.search(r'op_name="([^"]*)"', line)
        op_name = op_name.group(1) if op_name else ""
        kernel = next((k for k in KERNELS if f"mmjax_retrieve_{k}_tpu" in op_name), None)
        mask = next((m for m in masks if re.search(rf"\b{m}\b", op_name)), None)
        if kernel is None or mask is None:
            continue
        config, _ = decoder.raw_decode(line.split("backend_config=", 1)[1])
        used = config.get("used_scoped_memory_configs", [])
        found[(mask, kernel)] = sum(int(m.get("size", 0)) for m in used)
    return found


def _row(case: Case) -> dict:
    return {"generation": case.generation, "head_dim": case.head_dim, "dtype": case.dtype,
            "mask": case.mask, "length": case.length,
            "blocks": dataclasses.astuple(case.blocks)[:6]}


def compile_group(cases_: list[Case], mesh: jax.sharding.Mesh) -> list[dict]:
    """Compile cases that differ only in their mask as one program; one row per case.

    A row has ``ok``, the scoped VMEM of the kernels found (``vmem``: ``{kernel: bytes}``),
    ``error`` and ``seconds`` (the compile time, averaged over the cases compiled together).
    When the program does not compile, each case is compiled alone, so that every row names
    its own error.
    """
    masks = tuple(case.mask for case in cases_)
    start = time.perf_counter()
    try:
        compiled = lower_group(cases_[0], masks, mesh).compile()
    except Exception as error:  # noqa: BLE001 - any compiler error is a failed row
        if len(cases_) > 1:
            return [row for case in cases_ for row in compile_group([case], mesh)]
        message = " ".join(line.strip() for line in str(error).splitlines()[:3] if line.strip())
        row = _row(cases_[0])
        row.update(ok=False, vmem={}, error=f"{type(error).__name__}: {message[:300]}",
                   seconds=time.perf_counter() - start)
        return [row]
    seconds = (time.perf_counter() - start) / len(cases_)
    vmem = kernel_vmem(compiled.as_text(), masks)
    rows = []
    for case in cases_:
        row = _row(case)
        found = {k: vmem[(case.mask, k)] for k in KERNELS if (case.mask, k) in vmem}
        missing = [k for k in KERNELS if k not in found]
        row.update(ok=not missing, vmem=found, seconds=seconds,
                   error=f"kernels not compiled for TPU: {missing}" if missing else "")
        rows.append(row)
    return rows


def cases(generations, head_dims, dtypes, masks, lengths, blocks=None):
    for generation in generations:
        chosen = blocks or DEFAULT_BLOCK_SIZES[generation]
        for head_dim in head_dims:
            for dtype in dtypes:
                for mask in masks:
                    for length in lengths:
                        yield Case(generation, chosen, head_dim, dtype, mask, length)


def format_row(row: dict) -> str:
    vmem = row.get("vmem", {})
    kernels = ",".join(k for k in KERNELS if k in vmem) or "-"
    vmem_kib = "/".join(f"{vmem[k] // 1024}" if k in vmem else "-" for k in KERNELS)
    status = "yes" if row["ok"] else "NO"
    line = (f"{row['generation']:<4} {'x'.join(map(str, row['blocks'])):<27} "
            f"{row['head_dim']:>4} {row['dtype']:<8} {row['mask']:<9} {row['length']:>6} "
            f"{status:<8} {kernels:<10} {vmem_kib:<18} {row['seconds']:>6.1f}")
    return line if row["ok"] else f"{line}  {row['error']}"


HEADER = (f"{'gen':<4} {'blocks (fwd q,k dkv q,k dq q,k)':<27} {'dim':>4} {'dtype':<8} "
          f"{'mask':<9} {'T':>6} {'compiled':<8} {'kernels':<10} {'VMEM KiB fwd/dkv/dq':<18} "
          f"{'sec':>6}")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None


def _names(allowed):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(x for x in text.split(",") if x)
        unknown = [x for x in names if x not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{unknown or text!r}: choose from {allowed}")
        return names
    return parse


def _blocks(text: str) -> BlockSizes:
    values = _ints(text)
    if len(values) != 6:
        raise argparse.ArgumentTypeError("--blocks takes 6 integers: block_q, block_k, "
                                         "block_q_dkv, block_k_dkv, block_q_dq, block_k_dq")
    try:
        blocks = BlockSizes(*values)
        blocks.check_platform("tpu")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return blocks


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.ArgumentParser(
        prog="python -m mmjax.kernels.compile_check",
        description="Compile the TPU retrieval kernels (forward + backward) with the real "
                    "TPU compiler for each generation; exit 1 on any failure.")
    parser.add_argument("--generations", type=_names(GENERATIONS), default=GENERATIONS)
    parser.add_argument("--head_dims", type=_ints, default=DEFAULT_HEAD_DIMS)
    parser.add_argument("--dtypes", type=_names(DEFAULT_DTYPES), default=DEFAULT_DTYPES)
    parser.add_argument("--masks", type=_names(MASKS), default=MASKS)
    parser.add_argument("--lengths", type=_ints, default=DEFAULT_LENGTHS)
    parser.add_argument("--blocks", type=_blocks, default=None,
                        help="6 comma-separated tiles instead of each generation's defaults")
    args = parser.parse_args(argv)
    for name in ("head_dims", "lengths"):
        values = getattr(args, name)
        if not values or min(values) < 1:
            parser.error(f"--{name} needs positive integers, got {values}")
    bad_dims = [d for d in args.head_dims if d % 16 or d > 512]
    if bad_dims:
        parser.error(f"--head_dims {bad_dims}: the TPU kernel takes multiples of 16 up to 512")
    return args


@cli.command
def main(argv=None) -> int:
    """Exit status (:mod:`mmjax.cli`): 0 when every case compiles, 1 when one fails or
    libtpu is missing, 2 for bad flags."""
    args = parse_args(argv)
    if not libtpu_available():
        raise cli.Error('libtpu is not installed: pip install -e ".[tpu]" (no TPU needed)')
    jax.config.update("jax_platforms", "cpu")  # never try to open a local TPU
    print(HEADER, flush=True)
    failures = total = 0
    meshes = {}
    groups: dict[tuple, list[Case]] = {}
    for case in cases(args.generations, args.head_dims, args.dtypes, args.masks, args.lengths,
                      args.blocks):
        groups.setdefault(dataclasses.replace(case, mask=""), []).append(case)
    for key, group in groups.items():
        if key.generation not in meshes:
            meshes[key.generation] = tpu_mesh(key.generation)
        for row in compile_group(group, meshes[key.generation]):
            total += 1
            failures += not row["ok"]
            print(format_row(row), flush=True)
    print(f"{total - failures} compiled, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
