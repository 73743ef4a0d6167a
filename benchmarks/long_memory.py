"""A million tokens of memory: decoding and prefill with the exact and the paged long-term
memory of a v2 Memory Mosaic, side by side in one run.

    python benchmarks/long_memory.py                                   # timing, random weights
    python benchmarks/long_memory.py --workdir /tmp/recall_v2          # + recall of that run
    python benchmarks/long_memory.py --contexts 16384,65536 --exact_max 65536

The timed model is a v2 Memory Mosaic of the project's reference sizes (4 layers, width 256,
4 heads of 64, vocabulary 8192, SwiGLU 1024, window 256, inference skip 64) with random
weights (``--layers``, ``--width``, ``--heads``, ``--vocab``, ``--window`` change it; SwiGLU
4 x width); the recall is that of a trained ``configs/recall.py:v2`` run (``--workdir``).
For each context ``L``:

* **decode**: ms per token of :class:`mmjax.generate.Decoder` steps at position ``L`` (batch
  1, the step jitted once, the cache donated), median over ``--steps`` steps after a warm-up
  step. The long-term buffers are filled with random unit keys and values first (a step's
  work does not depend on what they hold; a prefill of 1M tokens would take the benchmark
  minutes per context). Paged (``--page`` x ``--top_pages``) at every context; exact where
  ``L <= --exact_max``.
* **cache**: the bytes of the decoding cache of one row (both layers, every buffer).
* **prefill**: tokens/s of ``Decoder.prefill`` of ``--prefill`` random tokens at position
  ``L`` (on the same random cache, chunks of ``--prefill_chunk``, after one chunk that
  compiles): what a long prompt's prefill costs when it reaches ``L``.
* **narrow pages**: one decoding step's logits with the pages in bfloat16 and in int8 (a
  scale per page) against float32 pages of the same content, and each cache's MiB.
* **recall** (``--workdir``): exact match of the 16-fact needle tasks
  (``python -m mmjax.eval retrieval``) with the paged memory at each context, and with the
  exact memory at the smallest.

Goals (2 CPU cores, one run): paged decode at 1M within 3x of paged decode at 16k; exact
decode at 64k at least 10x the paged one; paged recall of 16 facts at 1M no worse than exact
recall at 16k. ``--json`` adds one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.generate import Decoder
from mmjax.layers.cache import grow_pages
from mmjax.models import build_model
from mmjax.ops import l2_normalize
from mmjax.ops.paged import page_bounds, quantize_pages


def parse_args(argv=None):
    ints = lambda text: [int(x) for x in text.split(",") if x]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=ints, default=[16384, 65536, 262144, 1048576])
    p.add_argument("--exact_max", type=int, default=262144,
                   help="the longest context the exact memory is timed at")
    p.add_argument("--page", type=int, default=64)
    p.add_argument("--top_pages", type=int, default=16)
    p.add_argument("--page_dtype", default="bfloat16", choices=("float32", "bfloat16", "int8"),
                   help="storage of the paged caches' keys and values")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prefill", type=int, default=1024,
                   help="tokens prefilled at each context for the prefill figure")
    p.add_argument("--prefill_chunk", type=int, default=256)
    p.add_argument("--workdir", default=None, help="a trained configs/recall.py:v2 run")
    p.add_argument("--recall_tasks", type=int, default=8)
    p.add_argument("--json", action="store_true")
    for name in ("layers", "width", "heads", "vocab", "window"):  # the timed model's sizes
        p.add_argument(f"--{name}", type=int, default=None)
    args = p.parse_args(argv)
    sizes = dict(layers="num_layers", width="embed_dim", heads="num_heads",
                 vocab="vocab_size", window="short_term_window")
    args.model = dict(REFERENCE, **{key: getattr(args, name) for name, key in sizes.items()
                                     if getattr(args, name) is not None})
    args.model["mlp_dim"] = 4 * args.model["embed_dim"]
    args.model["inference_long_term_skip"] = min(64, args.model["short_term_window"])
    if min(args.contexts) < 1 or args.steps < 1 or args.prefill < 1:
        p.error("--contexts, --steps and --prefill must be >= 1")
    return args


# The timed model: the project's reference sizes (benchmarks/train_step.py, generate.py) as a
# v2 Memory Mosaic, window 256 and inference skip 64 as the paper's.
REFERENCE = dict(name="memory_mosaic_v2", vocab_size=8192, num_layers=4, num_heads=4,
                 embed_dim=256, mlp_dim=1024, short_term_window=256,
                 long_term_skip_range=(64, 256), inference_long_term_skip=64)


def model_and_params(args, memory: str, workdir: str | None = None, page_dtype: str = "auto"):
    """The v2 model (``memory``: ``"exact"`` or ``"paged"``) and its weights: a trained run's
    (``workdir``), or :data:`REFERENCE` with random weights."""
    overrides = dict(long_term_memory=memory, long_term_page=args.page,
                     long_term_top_pages=args.top_pages, long_term_page_dtype=page_dtype)
    if workdir is not None:
        from mmjax.generate.workdir import load_workdir

        trained = load_workdir(workdir, model_overrides=overrides)
        return trained.model, trained.params
    model = build_model(dict(args.model, **overrides))
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, params


def _fill(cache, seed: int):
    """Random unit keys and values in every long-term buffer, bounds (and int8 pages' scales)
    to match. Paged buffers of 16-bit floats hold their bits as ``uint16``
    (:mod:`mmjax.layers.cache`)."""
    rng = np.random.default_rng(seed)
    bits = jnp.dtype(jnp.uint16)
    like = lambda x, leaf: (jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), bits)
                            if leaf.dtype == bits else x.astype(leaf.dtype))

    def fill(node):
        if not isinstance(node, dict):
            return node
        node = {k: fill(v) for k, v in node.items()}
        for keys, values in (("keys", "values"), ("key_pages", "value_pages")):
            if keys not in node or "positions" in node:  # the short-term ring
                continue
            shape_k, shape_v = node[keys].shape, node[values].shape
            if keys == "key_pages":  # [..., R, L] rows of a page: [..., U, D] pairs
                width = node["page_bounds"].shape[-1] - 1
                shape_k = shape_k[:-2] + (shape_k[-2] * shape_k[-1] // width, width)
                shape_v = shape_v[:-2] + (shape_v[-2] * shape_v[-1] // width, width)
            k = l2_normalize(jnp.asarray(rng.standard_normal(shape_k, np.float32)))
            v = jnp.asarray(rng.standard_normal(shape_v, np.float32))
            if "key_scale" in node:  # int8 pages
                (k, node["key_scale"]), (v, node["value_scale"]) = (
                    quantize_pages(k), quantize_pages(v))
                stored_k = k.astype(jnp.float32) * node["key_scale"][..., None, None]
            else:
                k, v = like(k, node[keys]), like(v, node[values])
                stored_k = (jax.lax.bitcast_convert_type(k, jnp.bfloat16)
                            if k.dtype == bits else k)
            node[keys], node[values] = k.reshape(node[keys].shape), v.reshape(node[values].shape)
            if keys == "key_pages":
                node["page_bounds"] = page_bounds(stored_k)
        return node

    return fill(jax.tree.map(lambda x: x, cache))


def cache_bytes(cache) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def filled_decoder(model, params, context: int, extra: int, chunk: int):
    """A decoder and a cache holding ``context`` tokens of random long-term pairs."""
    decoder = Decoder(model, params, batch_size=1, cache_length=context + extra,
                      prefill_chunk=chunk)
    cache = grow_pages(decoder.init_cache(), context + extra)
    return decoder, _fill(cache, context)


def decode_ms(model, params, context: int, steps: int) -> tuple[float, int]:
    """Median ms per decoding step at position ``context``, and the cache's bytes."""
    decoder, cache = filled_decoder(model, params, context, steps + 2, 256)
    size = cache_bytes(cache)
    token = np.zeros((1,), np.int32)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        logits, cache = decoder.step(cache, token, np.full((1,), context + i, np.int32))
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[1:]), size


def prefill_tokens_per_s(model, params, context: int, length: int, chunk: int) -> float:
    """Tokens/s of a prefill of ``length`` tokens at position ``context`` (after a first
    chunk that compiles)."""
    decoder, cache = filled_decoder(model, params, context, length + chunk, chunk)
    prompt = np.random.default_rng(0).integers(0, model.vocab_size - 3, (1, length + chunk))
    _, cache = decoder.prefill(cache, prompt[:, :chunk], np.array([context + chunk]),
                               start=context)
    start = time.perf_counter()
    logits, _ = decoder.prefill(cache, prompt[:, chunk:], np.array([context + chunk + length]),
                                start=context + chunk)
    jax.block_until_ready(logits)
    return length / (time.perf_counter() - start)


NARROW_PAGES = ("bfloat16", "int8")


def page_rounding(args, context: int) -> dict:
    """What narrow pages cost: one decoding step's logits on the same cache content stored
    in float32 and in each of :data:`NARROW_PAGES`, and each cache's MiB."""
    logits, mib = {}, {}
    for dtype in ("float32",) + NARROW_PAGES:
        model, params = model_and_params(args, "paged", page_dtype=dtype)
        decoder, cache = filled_decoder(model, params, context, 2, 256)
        mib[dtype] = cache_bytes(cache) / 2**20
        out, _ = decoder.step(cache, np.zeros((1,), np.int32), np.array([context], np.int32))
        logits[dtype] = np.asarray(out, np.float64)
    wide = logits["float32"]
    return {dtype: {"max_abs": float(np.max(np.abs(wide - logits[dtype]))),
                    "logit_std": float(wide.std()),
                    "same_argmax": bool(np.argmax(wide) == np.argmax(logits[dtype])),
                    "cache_mib": mib[dtype], "float32_cache_mib": mib["float32"]}
            for dtype in NARROW_PAGES}


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"device: {jax.devices()[0].platform} x {jax.device_count()}, jax {jax.__version__}")
    paged = model_and_params(args, "paged", page_dtype=args.page_dtype)
    exact = model_and_params(args, "exact")
    size = args.model
    print(f"timed model: v2, {size['num_layers']} layers, width {size['embed_dim']}, "
          f"{size['num_heads']} heads, random weights; paged: pages of {args.page}, "
          f"{args.top_pages} kept, {args.page_dtype}")
    results = {"contexts": args.contexts, "decode_ms": {"paged": {}, "exact": {}},
               "cache_mib": {"paged": {}, "exact": {}},
               "prefill_tokens_per_s": {"paged": {}, "exact": {}}}
    print(f"{'context':>9} {'decode ms/token':>19} {'cache MiB':>17} "
          f"{'prefill tokens/s':>19}\n{'':>9} {'paged':>9} {'exact':>9} {'paged':>8} "
          f"{'exact':>8} {'paged':>9} {'exact':>9}", flush=True)
    for context in args.contexts:
        for name, (model, params) in (("paged", paged), ("exact", exact)):
            if name == "exact" and context > args.exact_max:
                continue
            ms, size = decode_ms(model, params, context, args.steps)
            results["decode_ms"][name][context] = ms
            results["cache_mib"][name][context] = size / 2**20
            results["prefill_tokens_per_s"][name][context] = prefill_tokens_per_s(
                model, params, context, args.prefill, args.prefill_chunk)
        cell = lambda key, name, fmt, at=context: (format(results[key][name][at], fmt)
                                                   if at in results[key][name] else "-")
        print(f"{context:>9} {cell('decode_ms', 'paged', '.2f'):>9} "
              f"{cell('decode_ms', 'exact', '.2f'):>9} {cell('cache_mib', 'paged', '.1f'):>8} "
              f"{cell('cache_mib', 'exact', '.1f'):>8} "
              f"{cell('prefill_tokens_per_s', 'paged', ',.0f'):>9} "
              f"{cell('prefill_tokens_per_s', 'exact', ',.0f'):>9}", flush=True)
    results["page_rounding"] = page_rounding(args, min(args.contexts))
    for dtype, cost in results["page_rounding"].items():
        print(f"{dtype} pages against float32 pages, one step at {min(args.contexts)}: max "
              f"|logit difference| {cost['max_abs']:.2e} (logits' std {cost['logit_std']:.2f}),"
              f" same top token: {cost['same_argmax']}; cache {cost['cache_mib']:.1f} MiB "
              f"(float32: {cost['float32_cache_mib']:.1f})", flush=True)
    paged_ms, exact_ms = results["decode_ms"]["paged"], results["decode_ms"]["exact"]
    first, last = min(paged_ms), max(paged_ms)
    print(f"paged decode at {last} / at {first}: {paged_ms[last] / paged_ms[first]:.2f}x "
          f"(goal <= 3)")
    for context in sorted(set(exact_ms) & set(paged_ms)):
        print(f"exact / paged decode at {context}: {exact_ms[context] / paged_ms[context]:.1f}x"
              + (" (goal >= 10)" if context == 65536 else ""))
    if args.workdir is not None:
        from mmjax.eval.needles import needle_accuracy

        memory = dict(long_term_memory="paged", long_term_page=args.page,
                      long_term_top_pages=args.top_pages, long_term_page_dtype=args.page_dtype)
        recall = {"paged": {}, "exact": {}}
        for context in args.contexts:
            rows = needle_accuracy(args.workdir, contexts=[context], facts=(16,),
                                   num_tasks=args.recall_tasks, memory=memory)
            recall["paged"][context] = rows[0]["accuracy"]
            print(f"recall, 16 facts, paged, {context}: {rows[0]['accuracy']:.2f}", flush=True)
        rows = needle_accuracy(args.workdir, contexts=[first], facts=(16,),
                               num_tasks=args.recall_tasks)
        recall["exact"][first] = rows[0]["accuracy"]
        print(f"recall, 16 facts, exact, {first}: {rows[0]['accuracy']:.2f} (goal: paged at "
              f"{last} no worse)", flush=True)
        results["recall_16_facts"] = recall
    if args.json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
