"""The paper-scale configs compiled for TPU slices with ``python -m mmjax.aot``: does one train
step fit, and how much of each chip's HBM does it use? Prints a Markdown table.

    python benchmarks/aot_paper_scales.py [--topologies v4:4x4x4,v5e:16x16,v5p:4x4x4]
        [--configs mmv2.py:small,mmv2.py:large,...] [--finetune]

Each case runs ``python -m mmjax.aot --json`` in its own process (the compile of a large
model on hundreds of described chips takes minutes and gigabytes of host memory). A case
that does not fit with the config's global batch is retried with gradient accumulation
(2, 4, 8 micro-batches), and the first that fits is reported. Needs libtpu, no TPU.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time

# Cases: a file of configs/ with its presets.
CONFIGS = ("mm_v1_small.py", "gpt2_small.py", "mmv2.py:small", "llama.py:small", "mmv2.py:large",
           "llama.py:large")
TOPOLOGIES = ("v4:4x4x4", "v5e:16x16", "v5p:4x4x4")


def split_configs(text: str) -> list[str]:
    """Comma-separated entries that each start with a config file (``mmv2.py:small,finetune,
    gpt2_small.py@v5e:2x2@-1,1,1``: presets and meshes hold commas too)."""
    return [entry for entry in re.split(r",(?=\w+\.py)", text) if entry]


def config_spec(config: str, finetune: bool = False) -> str:
    """The ``--config`` of a case: ``mmv2.py:large`` -> ``configs/mmv2.py:large``;
    ``finetune`` adds that preset."""
    if finetune:
        config += ",finetune" if ":" in config else ":finetune"
    return f"configs/{config}"


def run_case(config: str, topology: str, mesh: str, accum: int, finetune: bool,
             timeout: int) -> dict:
    spec = config_spec(config, finetune)
    cmd = [sys.executable, "-m", "mmjax.aot", "--config", spec, "--topology", topology,
           "--mesh", mesh, "--json", f"--config.train.grad_accum_steps={accum}"]
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"compile > {timeout} s"}
    row = {"seconds": time.perf_counter() - start, "returncode": out.returncode}
    lines = out.stdout.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        row.update(json.loads(lines[-1]))
    elif "DOES NOT FIT" in out.stdout:
        row["status"] = "does not fit: " + lines[-1][len("DOES NOT FIT: "):][:160]
    else:
        row["status"] = "error: " + (out.stderr.strip().splitlines() or ["?"])[-1][:160]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor (default: FSDP)")
    parser.add_argument("--finetune", action="store_true", help="the :finetune preset (32k)")
    parser.add_argument("--accum", default="1,2,4,8", help="micro-batch counts to try")
    parser.add_argument("--timeout", type=int, default=1800)
    args = parser.parse_args(argv)
    print("| config | topology | mesh | micro-batches | batch per chip per micro-batch | "
          "HBM used per chip | fits | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for config in split_configs(args.configs):
        for topology in args.topologies.split(","):
            for accum in (int(a) for a in args.accum.split(",")):
                row = run_case(config, topology, args.mesh, accum, args.finetune, args.timeout)
                if "fits" in row:
                    used = f"{row['total_bytes'] / 2**30:.1f} / {row['hbm_bytes'] / 2**30:.0f} GiB"
                    print(f"| {config} | {topology} | {row['mesh']} | {accum} | "
                          f"{row['batch_per_chip'] / accum:g} | {used} | "
                          f"{'yes' if row['fits'] else 'no'} | {row['compile_seconds']:.0f} |",
                          flush=True)
                    if row["fits"]:
                        break
                else:
                    print(f"| {config} | {topology} | {args.mesh} | {accum} | | | "
                          f"{row['status']} | |", flush=True)
                    if not row.get("status", "").startswith("does not fit"):
                        break


if __name__ == "__main__":
    main()
