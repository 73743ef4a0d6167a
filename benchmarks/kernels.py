"""The Pallas retrieval kernels: correctness on CPU, speed on TPU/GPU.

    python benchmarks/kernels.py                          # picks the mode from the backend
    python benchmarks/kernels.py --lengths 4096 --heads 8 --head_dim 128 --repeats 5

On CPU (no accelerator) it runs both kernels in Pallas interpret mode on small shapes and
prints their largest errors against the dense reference (output and all gradients): there is
no meaningful speed to report. On a TPU or GPU it runs the kernel of that platform and prints,
for T in --lengths and the masks strict-causal, window-256 and skip-64, for the forward and
forward+backward passes: seconds (median of --repeats after compiling), TFLOP/s counted on
the visible pairs only (4*D flops per pair forward, 2.5x that backward, the usual flash
accounting), and the fraction of the device's bf16 peak; next to jax.nn.dot_product_attention
on the same shapes (causal; window via local_window_size; the skip mask has no equivalent,
so its anchor is the causal one).

``interpret_rows()`` and ``speed_rows()`` return the rows as dicts, for benchmarks/retrieval.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import kernels
from mmjax.ops import MaskSpec, retrieve_reference, visible_count

MASKS = {"causal": MaskSpec(), "window256": MaskSpec(window=256), "skip64": MaskSpec(skip=64)}
# Dense bf16 peak per chip (TFLOP/s), from the vendors' data sheets.
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5": 459.0,
               "TPU v5p": 459.0, "TPU v6 lite": 918.0, "NVIDIA H100": 989.0,
               "NVIDIA H200": 989.0, "NVIDIA A100": 312.0}


def peak_tflops(device_kind: str) -> float | None:
    for name, peak in PEAK_TFLOPS.items():
        if device_kind.startswith(name):
            return peak
    return None


def visible_pairs(t: int, mask: MaskSpec) -> int:
    """Number of (query, key) pairs the mask lets through, queries = keys = 0..t-1."""
    counts = visible_count(jnp.arange(t), mask.window, mask.skip)
    return int(np.sum(np.asarray(counts), dtype=np.int64))


def _inputs(batch, t, heads, dim, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    k = jax.random.normal(ks[0], (batch, t, heads, dim), jnp.float32)
    k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
    v = jax.random.normal(ks[1], (batch, t, heads, dim), dtype)
    beta = jax.random.uniform(ks[2], (t, heads), minval=1.0, maxval=4.0)
    return k, v, beta


SMALL_MASKS = {"causal": MaskSpec(), "window40": MaskSpec(window=40),
               "skip16": MaskSpec(skip=16)}


def interpret_rows(t: int = 150, heads: int = 2, dim: int = 32,
                   masks=tuple(SMALL_MASKS)) -> list[dict]:
    """Largest relative error of each kernel (interpret mode) vs the reference, per mask."""
    rows = []
    k, v, beta = _inputs(1, t, heads, dim, jnp.float32)
    dy = jax.random.normal(jax.random.PRNGKey(1), v.shape)
    blocks = {"tpu": kernels.BlockSizes(*(128,) * 6), "gpu": kernels.BlockSizes(*(32,) * 6)}
    for name in masks:
        mask = SMALL_MASKS[name]
        def grads(fn):
            loss = lambda k, v, beta: jnp.sum(fn(k, v, beta) * dy)
            return (fn(k, v, beta), *jax.grad(loss, argnums=(0, 1, 2))(k, v, beta))

        ref = grads(lambda k, v, b, m=mask: retrieve_reference(k, k, v, b, m,
                                                                         jnp.int32(0)))
        for platform in ("tpu", "gpu"):
            got = grads(lambda k, v, b, p=platform, m=mask: kernels.retrieve_pallas(
                k, k, v, b, m, jnp.int32(0), platform=p, block_sizes=blocks[p],
                interpret=True))
            errors = [float(jnp.max(jnp.abs(a - r)) / max(1.0, float(jnp.max(jnp.abs(r)))))
                      for a, r in zip(got, ref, strict=True)]
            rows.append({"kernel": f"pallas_{platform} (interpret)", "mask": name, "T": t,
                         "max_rel_error": max(errors)})
    return rows


def _time(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed_rows(lengths=(4096, 32768), batch=1, heads=8, dim=128, dtype=jnp.bfloat16,
               repeats=5, platform=None, interpret=False, masks=tuple(MASKS)) -> list[dict]:
    """Time of the kernel and of jax.nn.dot_product_attention, forward and forward+backward."""
    platform = platform or {"tpu": "tpu"}.get(jax.default_backend(), "gpu")
    device_kind = jax.devices()[0].device_kind
    peak = peak_tflops(device_kind)
    rows = []
    for t in lengths:
        k, v, beta = _inputs(batch, t, heads, dim, dtype)
        for name in masks:
            mask = MASKS[name]
            pairs = visible_pairs(t, mask) * batch * heads
            kernel = lambda k, v, beta, mask=mask: kernels.retrieve_pallas(
                k, k, v, beta, mask, jnp.int32(0), platform=platform, interpret=interpret)
            window = (256, 0) if name == "window256" else None
            anchor = lambda k, v, beta, window=window: jax.nn.dot_product_attention(
                k, k, v, is_causal=True, local_window_size=window)
            for label, fn in ((f"pallas_{platform}", kernel), ("dot_product_attention", anchor)):
                for mode, flops_per_pair in (("fwd", 4 * dim), ("fwd+bwd", 14 * dim)):
                    if mode == "fwd":
                        run = jax.jit(fn)
                    else:
                        loss = lambda k, v, beta, fn=fn: jnp.sum(fn(k, v, beta).astype(
                            jnp.float32))
                        run = jax.jit(jax.grad(loss, argnums=(0, 1)))
                    try:
                        seconds = _time(run, k, v, beta, repeats=repeats)
                    except Exception as err:  # e.g. the anchor has no kernel for this shape
                        rows.append({"impl": label, "mask": name, "pass": mode, "T": t,
                                     "error": f"{type(err).__name__}: {str(err)[:80]}"})
                        continue
                    tflops = flops_per_pair * pairs / seconds / 1e12
                    rows.append({"impl": label, "mask": name, "pass": mode, "T": t,
                                 "seconds": seconds, "TFLOP/s": tflops,
                                 "peak_fraction": tflops / peak if peak else None,
                                 "device": device_kind})
    return rows


def _print(rows):
    if not rows:
        return
    columns = list(dict.fromkeys(c for row in rows for c in row))
    print("\t".join(columns))
    for row in rows:
        cells = []
        for c in columns:
            x = row.get(c, "-")
            cells.append(f"{x:.4g}" if isinstance(x, float) else str(x))
        print("\t".join(cells))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="4096,32768")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    print(f"backend: {backend}, device: {jax.devices()[0].device_kind}")
    if backend == "cpu":
        print("no accelerator: interpret-mode correctness of both kernels only")
        _print(interpret_rows())
        return
    lengths = tuple(int(x) for x in args.lengths.split(","))
    _print(speed_rows(lengths, args.batch, args.heads, args.head_dim, repeats=args.repeats))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
