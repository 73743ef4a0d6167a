"""Time and peak memory of mmjax.ops.retrieve: dense reference vs blocked XLA path.

    python benchmarks/retrieval.py                 # the full table (T up to 32k; minutes on CPU)
    python benchmarks/retrieval.py --lengths 1024,4096 --repeats 3

Each measurement runs in its own subprocess so that its peak resident memory (ru_maxrss) is
its own. Shapes: B=1, H=4, D=64 (fp32), keys = queries as in Memory Mosaics. Columns:

  impl, mask, pass (fwd | fwd+bwd), T, seconds (best of --repeats after compilation),
  peak RSS of the process (GiB), XLA's own temporary buffer size for the compiled program
  (GiB), and the RSS of the same process before the computation ran (JAX + inputs).

The dense reference is run only where its T x T score matrices fit (estimated), else "-".
The target lines print xla fwd+bwd peak RSS at the longest T, and the speed-up of window=256
over the full strict-causal mask at the longest T.

Then the Pallas kernels (benchmarks/kernels.py): on CPU their interpret-mode errors against
the reference (no speed is meaningful there); on a TPU or GPU time, TFLOP/s and fraction of
peak for T in {4k, 32k} and the causal, window-256 and skip-64 masks, next to
jax.nn.dot_product_attention. ``--no-kernels`` leaves them out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

BATCH, HEADS, DIM = 1, 4, 64
MASKS = {"causal": None, "window256": 256}


def run_one(impl: str, mask: str, mode: str, t: int, repeats: int) -> dict:
    """Runs inside a fresh subprocess: compile, then time ``repeats`` executions."""
    import jax
    import jax.numpy as jnp

    from mmjax.ops import MaskSpec, retrieve

    spec = MaskSpec(window=MASKS[mask])
    key_k, key_v = jax.random.split(jax.random.key(0))
    keys = jax.random.normal(key_k, (BATCH, t, HEADS, DIM), jnp.float32)
    keys = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True) * 2.0
    values = jax.random.normal(key_v, (BATCH, t, HEADS, DIM), jnp.float32)

    def forward(k, v):
        return retrieve(k, v, mask=spec, impl=impl)

    if mode == "fwd":
        fn = jax.jit(forward)
    else:
        fn = jax.jit(jax.grad(lambda k, v: jnp.sum(forward(k, v) ** 2), argnums=(0, 1)))
    compiled = fn.lower(keys, values).compile()
    analysis = compiled.memory_analysis()
    temp = analysis.temp_size_in_bytes if analysis is not None else float("nan")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(keys, values))
        best = min(best, time.perf_counter() - start)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": best, "peak_rss": rss, "rss_before": rss_before, "xla_temp": temp}


def reference_fits(t: int, mode: str, budget_bytes: float) -> bool:
    """The dense path keeps a few fp32 [H, T, T] arrays alive (more in the backward)."""
    copies = 4 if mode == "fwd" else 8
    return copies * HEADS * t * t * 4 < budget_bytes


def measure(impl, mask, mode, t, repeats) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps([impl, mask, mode, t, repeats])]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,4096,16384,32768")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reference-budget-gib", type=float, default=12.0)
    parser.add_argument("--no-kernels", action="store_true", help="skip the Pallas section")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(*json.loads(args.child))))
        return

    lengths = [int(x) for x in args.lengths.split(",")]
    gib = 1024.0**3
    print(f"retrieve benchmark: B={BATCH} H={HEADS} D={DIM} fp32, "
          f"backend={_backend()}, best of {args.repeats} after compilation")
    header = f"{'impl':<10} {'mask':<10} {'pass':<8} {'T':>6} {'seconds':>9} " \
             f"{'peak RSS GiB':>12} {'XLA temp GiB':>12} {'RSS before':>10}"
    print(header)
    print("-" * len(header))
    results = {}
    for t in lengths:
        for impl in ("reference", "xla"):
            for mask in MASKS:
                for mode in ("fwd", "fwd+bwd"):
                    if impl == "reference" and not reference_fits(
                            t, mode, args.reference_budget_gib * gib):
                        print(f"{impl:<10} {mask:<10} {mode:<8} {t:>6} {'- (does not fit)':>9}")
                        continue
                    r = measure(impl, mask, mode, t, args.repeats)
                    results[(impl, mask, mode, t)] = r
                    if "error" in r:
                        print(f"{impl:<10} {mask:<10} {mode:<8} {t:>6} error: {r['error']}")
                        continue
                    print(f"{impl:<10} {mask:<10} {mode:<8} {t:>6} {r['seconds']:>9.3f} "
                          f"{r['peak_rss'] / gib:>12.3f} {r['xla_temp'] / gib:>12.3f} "
                          f"{r['rss_before'] / gib:>10.3f}", flush=True)
    t = max(lengths)
    full = results.get(("xla", "causal", "fwd+bwd", t), {})
    window = results.get(("xla", "window256", "fwd+bwd", t), {})
    if "peak_rss" in full:
        print(f"target: xla fwd+bwd causal at T={t}: peak RSS {full['peak_rss'] / gib:.2f} GiB "
              f"(target <= 2 GiB)")
    if "seconds" in full and "seconds" in window:
        print(f"target: window=256 vs strict causal, xla fwd+bwd at T={t}: "
              f"{full['seconds'] / window['seconds']:.1f}x faster (target >= 20x)")
    if not args.no_kernels:
        kernel_section()


def kernel_section() -> None:
    """The Pallas kernels' rows from benchmarks/kernels.py (interpret errors or speed)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).with_name("kernels.py")
    spec = importlib.util.spec_from_file_location("kernel_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if _backend() == "cpu":
        print("\nPallas kernels on CPU: interpret mode, errors against the reference only")
        bench._print(bench.interpret_rows())
    else:
        print(f"\nPallas kernels on {_backend()}: speed next to jax.nn.dot_product_attention")
        bench._print(bench.speed_rows())


def _backend() -> str:
    import jax

    return jax.default_backend()


if __name__ == "__main__":
    main()
