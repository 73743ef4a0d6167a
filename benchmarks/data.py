"""Throughput of the text data path: prepare, the grain loader, and the train step it feeds.

    python benchmarks/data.py                       # ~5.6M tokens of generated stories
    python benchmarks/data.py --stories 100000 --prepare_workers 1,2,4

Generates template stories (mmjax.data.stories; nothing is downloaded), trains a sentencepiece
tokenizer on them, then prints:

- prepare: tokens/s of ``mmjax.data.prepare`` with 1 and 2 worker processes, end to end
  (hashing, worker start-up, writing) and of its tokenising phase alone, total and per
  worker (worker start-up is reported apart: spawned workers import jax with mmjax);
- loader: batches/s and tokens/s of ``make_batches`` at the ``mm_v1_small:tiny_text`` shape
  (context 128, batch 16, random windows), with 0 and 2 grain workers, as NumPy batches and
  as a ``jax.Array`` on a one-device sharding (the first batch, which pays for worker
  start-up, is not timed);
- train step: tokens/s of the ``configs/mm_v1_small.py:tiny_text`` preset's train step (the
  ``Trainer`` that ``python -m mmjax.train`` builds, on all devices, fed by its own loader),
  and the ratio slowest loader tokens/s / train tokens/s (the loader must stay >= 10x).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

PRESET = "mm_v1_small.py:tiny_text"
CONTEXT, BATCH = 128, 16  # the preset's data.context_length and data.batch_size


def preset_config(spec: str = PRESET):
    """``configs/FILE.py:ARG`` loaded as ``--config`` loads it."""
    from mmjax.config import load

    return load(spec)


def time_prepare(pattern: str, tok_path: pathlib.Path, root: pathlib.Path,
                 workers: int) -> dict:
    from mmjax.data import prepare

    start = time.perf_counter()
    manifest = prepare.prepare(pattern, tok_path, root / f"store_w{workers}", workers=workers,
                               chunk_mb=1.0, progress=False)
    seconds = time.perf_counter() - start
    rate = manifest["total_tokens"] / seconds
    tokenise = manifest["total_tokens"] / manifest["timing"]["tokenise_s"]
    return {"stage": "prepare", "workers": workers, "tokens": manifest["total_tokens"],
            "seconds": round(seconds, 3), "tokens_per_s": round(rate),
            "worker_start_s": manifest["timing"]["worker_start_s"],
            "tokenise_tokens_per_s": round(tokenise),
            "tokenise_tokens_per_s_per_worker": round(tokenise / max(1, workers))}


def time_loader(store: pathlib.Path, vocab_size: int, *, workers: int, batches: int,
                sharded: bool) -> dict:
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from mmjax.data import make_batches

    sharding = None
    if sharded:
        mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                             devices=jax.devices()[:1])
        sharding = NamedSharding(mesh, PartitionSpec("data", None))
    cfg = dict(corpus="tokens", path=str(store), vocab_size=vocab_size,
               context_length=CONTEXT, batch_size=BATCH, worker_count=workers, prefetch=8)
    it = make_batches(cfg, seed=0, sharding=sharding)
    try:
        jax.block_until_ready(next(it))  # worker start-up is not throughput
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(it)
        jax.block_until_ready(batch)
        seconds = time.perf_counter() - start
    finally:
        it.close()
    rate = batches / seconds
    return {"stage": "loader", "workers": workers, "output": "jax.Array" if sharded else "numpy",
            "batches_per_s": round(rate, 1), "tokens_per_s": round(rate * BATCH * CONTEXT)}


def time_train_step(store: pathlib.Path, vocab_size: int, steps: int) -> dict:
    import jax

    from mmjax.train.loop import Trainer

    config = preset_config()
    assert (config.data.context_length, config.data.batch_size) == (CONTEXT, BATCH)
    config.data.path = str(store)
    config.model.vocab_size = max(config.model.vocab_size, vocab_size)  # preset: 4096, padded
    trainer = Trainer(config)
    try:
        state = trainer.init_state()
        state, metrics = trainer.train_step(state, trainer.next_batch())  # compile
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = trainer.train_step(state, trainer.next_batch())
            jax.block_until_ready(metrics)  # one step in flight, as the loop keeps it
        seconds = time.perf_counter() - start
    finally:
        trainer.close()
    return {"stage": "train_step", "preset": PRESET,
            "model": f"{config.model.name}, {config.model.num_layers} layers, width "
                     f"{config.model.embed_dim}, vocab {config.model.vocab_size}",
            "steps_per_s": round(steps / seconds, 2),
            "tokens_per_s": round(steps * BATCH * CONTEXT / seconds),
            "loss": round(float(metrics["loss"]), 4)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stories", type=int, default=100_000)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--prepare_workers", default="1,2")
    parser.add_argument("--loader_workers", default="0,2")
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--train_steps", type=int, default=20, help="0: skip the train step")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = parser.parse_args(argv)

    from mmjax.data import stories, tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(args.workdir or tmp)
        docs = stories.make_stories(args.stories, seed=0)
        stories.write_story_files(root / "text", docs, num_files=4)
        start = time.perf_counter()
        tok = tokenizer.train_tokenizer(docs, root / "tok.model", vocab_size=args.vocab_size)
        rows = [{"stage": "tokenizer", "vocab_size": tok.vocab_size, "documents": len(docs),
                 "seconds": round(time.perf_counter() - start, 3)}]
        pattern = str(root / "text" / "*.txt")
        for workers in [int(w) for w in args.prepare_workers.split(",")]:
            rows.append(time_prepare(pattern, root / "tok.model", root, workers))
        store = root / f"store_w{int(args.prepare_workers.split(',')[0])}"
        for workers in [int(w) for w in args.loader_workers.split(",")]:
            for sharded in (False, True):
                rows.append(time_loader(store, tok.vocab_size, workers=workers,
                                        batches=args.batches, sharded=sharded))
        if args.train_steps:
            train = time_train_step(store, tok.vocab_size, args.train_steps)
            rows.append(train)
            loader = min(r["tokens_per_s"] for r in rows if r["stage"] == "loader")
            rows.append({"stage": "ratio", "slowest_loader_over_train_step":
                         round(loader / train["tokens_per_s"], 1)})
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
