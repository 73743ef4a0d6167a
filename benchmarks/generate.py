"""Per-token latency of generation: incremental decoding with caches against recomputation.

    python benchmarks/generate.py                              # v1 MM, v2 MM, GPT2
    python benchmarks/generate.py --contexts 256,1024 --batches 1 --models v1

For each model, batch size and context ``n``, in one run:

* **recompute**: what the official code does for every new token: the whole sequence of
  ``n`` tokens through the network (jitted once for that shape), logits of the last position
  only (as the official ``forward`` without targets);
* **incremental**: :class:`mmjax.generate.Decoder` with a cache of ``n`` tokens, prefilled
  with ``n - steps`` tokens, then ``steps`` one-token steps (the step is jitted once; the
  cache is donated). Each step retrieves over the whole preallocated cache.

Both are timed with ``block_until_ready`` after every call; the figure is the median per
token over ``--repeats`` (recompute) and over the steps (incremental), after a warm-up call
that compiles. The printed speedup is recompute / incremental per token, side by side in the
same run. Targets: >= 20x at context 1024, >= 50x at 4096.

The models (fp32, no dropout; ``--width`` etc. change them): the reference v1 Memory
Mosaic (4 layers, 4 heads, width 256, vocabulary 8192, 1024 persistent slots), a v2 Memory
Mosaic of the same width and depth (short-term window 256, long-term skip 64, SwiGLU of 1024)
and GPT2 of the same width and depth (4x MLP, learned positions up to the largest context).
``--json`` adds one JSON line at the end.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.generate import Decoder
from mmjax.models import build_model

MODELS = ("v1", "v2", "gpt2")


def model_config(name: str, args, max_context: int) -> dict:
    sizes = dict(vocab_size=args.vocab, num_layers=args.layers, num_heads=args.heads,
                 embed_dim=args.width)
    if name == "v1":
        return dict(name="memory_mosaic", pmem_size=args.pmem, **sizes)
    if name == "v2":
        return dict(name="memory_mosaic_v2", mlp_dim=4 * args.width,
                    short_term_window=args.window, **sizes)
    if name == "gpt2":
        return dict(name="gpt2", context_length=max_context, **sizes)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def _last_logits(model, params, tokens_BxT):
    x_BxTxD, head_DxN, scale = model.apply({"params": params}, tokens_BxT, return_head=True)
    return jnp.einsum("bd,dn->bn", x_BxTxD[:, -1], head_DxN) * scale


def recompute_seconds(model, params, tokens_BxT, repeats: int) -> float:
    """Median seconds of one full forward pass (last-position logits), compiled first."""
    forward = jax.jit(functools.partial(_last_logits, model))
    jax.block_until_ready(forward(params, tokens_BxT))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(forward(params, tokens_BxT))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def incremental_seconds(model, params, tokens_BxT, steps: int) -> float:
    """Median seconds of one decoding step with ``T`` tokens of cache, after a prefill."""
    b, t = tokens_BxT.shape
    decoder = Decoder(model, params, batch_size=b, cache_length=t, prefill_chunk=256)
    cache = decoder.init_cache()
    start_pos = t - steps - 1
    lengths = np.full((b,), start_pos, np.int32)
    _, cache = decoder.prefill(cache, np.asarray(tokens_BxT[:, :start_pos]), lengths)
    positions = lengths.copy()
    logits, cache = decoder.step(cache, tokens_BxT[:, start_pos], positions)  # compiles
    jax.block_until_ready(logits)
    times = []
    for i in range(steps):
        positions = positions + 1
        begin = time.perf_counter()
        logits, cache = decoder.step(cache, tokens_BxT[:, start_pos + 1 + i], positions)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated, from {MODELS}")
    p.add_argument("--contexts", type=ints, default=[256, 1024, 4096])
    p.add_argument("--batches", type=ints, default=[1, 8])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--pmem", type=int, default=1024)
    p.add_argument("--window", type=int, default=256, help="v2 short-term window")
    p.add_argument("--steps", type=int, default=16, help="timed decoding steps")
    p.add_argument("--repeats", type=int, default=3, help="timed recomputations")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    for m in args.models:
        if m not in MODELS:
            p.error(f"--models: unknown model {m!r}; choose from {MODELS}")
    for name in ("layers", "heads", "width", "vocab", "pmem", "window", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("contexts", "batches"):
        if not getattr(args, name) or min(getattr(args, name)) < 1:
            p.error(f"--{name} must be positive integers, got {getattr(args, name)}")
    if min(args.contexts) < args.steps + 2:
        p.error(f"--contexts must exceed --steps + 1 = {args.steps + 1}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    print(f"devices: {jax.devices()[0].device_kind} x {jax.device_count()}; "
          f"{args.layers} layers, {args.heads} heads, width {args.width}, vocab {args.vocab}, "
          "fp32", flush=True)
    rows = []
    for name in args.models:
        model = build_model(model_config(name, args, max(args.contexts)))
        params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        for batch in args.batches:
            for context in args.contexts:
                tokens = jax.random.randint(jax.random.key(context), (batch, context), 0,
                                            args.vocab, dtype=jnp.int32)
                full = recompute_seconds(model, params, tokens, args.repeats)
                step = incremental_seconds(model, params, tokens, args.steps)
                rows.append(dict(model=name, batch=batch, context=context,
                                 recompute_ms=1e3 * full, incremental_ms=1e3 * step,
                                 speedup=full / step))
                print(format_row(rows[-1]), flush=True)
    print()
    print(format_table(rows))
    if args.json:
        print(json.dumps(rows))
    return rows


HEADER = ("model", "batch", "context", "recompute ms/token", "incremental ms/token", "speedup")


def format_row(row: dict) -> str:
    return (f"{row['model']:>5} {row['batch']:>5} {row['context']:>7} "
            f"{row['recompute_ms']:>18.2f} {row['incremental_ms']:>20.3f} "
            f"{row['speedup']:>8.1f}x")


def format_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | "
                     f"{r['recompute_ms']:.2f} | {r['incremental_ms']:.3f} | "
                     f"{r['speedup']:.1f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
