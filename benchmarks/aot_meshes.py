"""Recommended meshes: for each paper config and slice size, a mesh and a micro-batch count
whose train step fits, compiled with ``python -m mmjax.aot --json`` (libtpu, no TPU).
Prints a Markdown table, one row per case as it finishes (``launch/README.md``, "Recommended
meshes", holds the measured rows).

    python benchmarks/aot_meshes.py [--only mmv2.py:small,gpt2_small.py] [--slices v5e:2x2]
        [--timeout 1800] [--jsonl rows.jsonl]

Each case starts at the micro-batch count that gives each chip about 16k tokens per
micro-batch on v5e (16 GiB) and 64k on v5p (95 GiB), and doubles it while the step does not
fit (up to one sequence per chip). The global batch is the config's (the paper's), never
changed. Cases run in :data:`CASES` order, most useful first; each compile of a paper-scale
model takes minutes.
"""

from __future__ import annotations

import argparse
import json

from aot_paper_scales import run_case, split_configs

# tokens per chip per micro-batch to start from, by generation
START_TOKENS = {"v5e": 16384, "v5p": 65536, "v4": 16384}
CHIPS = {"v5e:2x2": 4, "v5e:4x4": 16, "v5p:2x2x4": 16, "v5p:4x4x4": 64, "v5e:16x16": 256}
# (FILE.py[:presets], slice, data,fsdp,tensor[, first micro-batch count]): v2/LLaMA under FSDP,
# the v1/GPT2 pair data-parallel. Where the state alone fills most of a chip, start at one
# sequence per chip.
CASES = (
    ("gpt2_small.py", "v5e:2x2", "-1,1,1"),
    ("mm_v1_small.py", "v5e:2x2", "-1,1,1"),
    ("mmv2.py:small", "v5e:4x4", "1,-1,1"),
    ("mmv2.py:large", "v5p:2x2x4", "1,-1,1"),
    ("llama.py:small", "v5e:4x4", "1,-1,1"),
    ("llama.py:large", "v5p:2x2x4", "1,-1,1"),
    ("mmv2.py:small,finetune", "v5e:4x4", "1,-1,1"),
    ("mmv2.py:large,finetune", "v5p:2x2x4", "1,-1,1"),
    ("mmv2.py:small", "v5e:2x2", "1,-1,1", 256),
    ("mmv2.py:large", "v5e:4x4", "1,-1,1", 64),
    ("mmv2.py:small", "v5p:2x2x4", "1,-1,1"),
    ("llama.py:small", "v5p:2x2x4", "1,-1,1"),
    ("gpt2_small.py", "v5e:4x4", "-1,1,1"),
    ("mm_v1_small.py", "v5e:4x4", "-1,1,1"),
    ("mmv2.py:large", "v5e:16x16", "1,-1,1"),
    ("llama.py:large", "v5e:4x4", "1,-1,1", 64),
    # 32k-token rows: one per chip does not fit a v5e under FSDP alone; split heads and MLP
    ("mmv2.py:small,finetune", "v5e:4x4", "1,-1,2"),
    ("mmv2.py:large,finetune", "v5e:16x16", "1,-1,2"),  # 128 rows: fewer shards than chips
    ("mmv2.py:large,finetune", "v5e:16x16", "1,-1,4"),
    ("mmv2.py:small,finetune", "v5p:2x2x4", "1,-1,1"),
    # the large models at one row per chip do not fit 16 v5e chips under FSDP alone
    ("mmv2.py:large", "v5e:4x4", "1,-1,2", 128),
    ("llama.py:large", "v5e:4x4", "1,-1,2", 128),
)
# the configs' global batch and context (data.batch_size, data.context_length)
BATCH = {"mmv2.py:small": (1024, 4096), "mmv2.py:large": (1024, 4096),
         "llama.py:small": (1024, 4096), "llama.py:large": (1024, 4096),
         "mm_v1_small.py": (512, 512), "gpt2_small.py": (512, 512),
         "mmv2.py:small,finetune": (128, 32768), "mmv2.py:large,finetune": (128, 32768)}


def batch_shards(topology: str, mesh: str) -> int:
    """data x fsdp: the chips over the tensor size (``mesh`` as ``data,fsdp,tensor``)."""
    return CHIPS[topology] // int(mesh.split(",")[2])


def start_accum(config: str, topology: str, mesh: str = "1,-1,1") -> int:
    """Micro-batches that give each batch shard about ``START_TOKENS`` tokens each."""
    batch, context = BATCH[config]
    per_chip = batch / batch_shards(topology, mesh)  # sequences per shard per step
    target = START_TOKENS[topology.split(":")[0]] / context  # sequences per micro-batch
    accum = 1
    while per_chip / accum > max(target, 1) and per_chip / (2 * accum) >= 1:
        accum *= 2
    return accum


def measure(config: str, topology: str, mesh: str, timeout: int, accum: int | None = None):
    """Rows tried for one case, the last one fitting (or the last failure)."""
    batch, _ = BATCH[config]
    accum = accum or start_accum(config, topology, mesh)
    rows = []
    while True:
        row = run_case(config, topology, mesh, accum, False, timeout)
        row.update(config=config, accum=accum)
        rows.append(row)
        if row.get("fits") or "fits" not in row and not row.get("status", "").startswith(
                "does not fit"):
            return rows
        if batch / batch_shards(topology, mesh) / (2 * accum) < 1:
            return rows
        accum *= 2


def format_row(row: dict, topology: str) -> str:
    if "fits" in row:
        mesh = ", ".join(f"{k} {v}" for k, v in row["mesh"].items() if v > 1)
        gib = f"{row['total_bytes'] / 2**30:.1f} / {row['hbm_bytes'] / 2**30:.0f} GiB"
        return (f"| {row['config']} | {topology} | {mesh} | {row['accum']} | "
                f"{row['batch_per_chip'] / row['accum']:g} | {gib} | "
                f"{'yes' if row['fits'] else 'no'} | {row['compile_seconds']:.0f} |")
    return f"| {row['config']} | {topology} | | {row['accum']} | | | {row['status']} | |"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated configs (default: all)")
    parser.add_argument("--slices", default="", help="comma-separated slices (default: all)")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--jsonl", default="", help="also append every compile's row here")
    parser.add_argument("--skip", default="",
                        help="comma-separated CONFIG@SLICE or CONFIG@SLICE@MESH to leave out")
    args = parser.parse_args(argv)
    only = set(split_configs(args.only))
    slices = set(filter(None, args.slices.split(",")))
    skip = set(split_configs(args.skip))
    print("| config | slice | mesh | micro-batches | sequences per chip per micro-batch | "
          "HBM per chip | fits | compile s |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for config, topology, mesh, *first in CASES:
        if ((only and config not in only) or (slices and topology not in slices)
                or f"{config}@{topology}" in skip or f"{config}@{topology}@{mesh}" in skip):
            continue
        for row in measure(config, topology, mesh, args.timeout, *first):
            print(format_row(row, topology), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps({**row, "slice": topology, "mesh_arg": mesh}) + "\n")


if __name__ == "__main__":
    main()
