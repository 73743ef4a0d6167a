"""Tokenise text/JSONL files into a token store (format and rationale: :mod:`mmjax.data.store`).

    python -m mmjax.data.prepare --input 'DIR/*.txt' --tokenizer DIR/tok.model \\
        --output STORE [--workers 8 --val_fraction 0.01 --seed 0]

Files are cut into chunks of whole documents (``--chunk_mb``) that worker processes tokenise
in parallel (a progress bar counts bytes); each document is followed by the tokenizer's
end-of-text id (its ``eos`` piece, or ``--eot_id``). Documents keep their order (files sorted
by path, then file order). The train/validation split is by document: a seeded choice of
``round(val_fraction * documents)`` documents (at least one when ``val_fraction > 0``).

Safe to re-run and to interrupt:

- the store is built in a hidden sibling directory ``.NAME.partial-*`` and renamed to
  ``--output`` in one step, with ``manifest.json`` written last; a killed run leaves only
  that hidden directory (never a directory that looks complete), and the next run removes it;
- the manifest records the sources (path, size, sha256), the tokenizer (path, sha256, vocab
  size) and the options; re-running with the same inputs finds them equal and does nothing
  ("up to date"); different inputs into an existing store are an error unless
  ``--overwrite``.

Bad input stops the run before a store is published (the partial directory is removed),
with one line naming the problem (see :mod:`mmjax.data.text`; a non-UTF-8 file is an error,
not a skip). A re-run hashes every source (sha256, about 1 GB/s per worker) to decide that
nothing changed. Inputs never include ``--output``, its partial siblings or the tokenizer.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import sys
import time
import uuid
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from mmjax import cli
from mmjax.data import store as store_lib
from mmjax.data import text as text_lib
from mmjax.data.text import DataError
from mmjax.data.tokenizer import Tokenizer, file_sha256

log = logging.getLogger("mmjax.data.prepare")

_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _ready(seconds: float) -> int:
    time.sleep(seconds)  # long enough that every worker takes one
    return os.getpid()


def _tokenize_chunk(task: tuple, tokenizer: Tokenizer | None = None) -> tuple[int, int, int]:
    """Tokenise one chunk into ``chunks/ID.tokens`` and ``chunks/ID.lengths``."""
    chunk_id, path, start, end, text_key, eot_id, dtype, out_dir = task
    tokenizer = tokenizer or _WORKER_TOKENIZER
    docs = text_lib.read_chunk(path, start, end, text_key=text_key)
    ids = tokenizer.encode(docs) if docs else []
    lengths = np.array([len(d) + 1 for d in ids], np.int64)
    flat = np.empty(int(lengths.sum()), dtype)
    pos = 0
    for d in ids:
        flat[pos:pos + len(d)] = d
        flat[pos + len(d)] = eot_id
        pos += len(d) + 1
    out = pathlib.Path(out_dir)
    flat.tofile(out / f"{chunk_id:07d}.tokens")
    lengths.tofile(out / f"{chunk_id:07d}.lengths")
    return chunk_id, len(ids), end - start


def fingerprint(files: Sequence[pathlib.Path], tokenizer: Tokenizer, *, eot_id: int,
                val_fraction: float, seed: int, text_key: str, workers: int = 1) -> dict:
    """What a store is a function of: equal fingerprints mean re-running is a no-op."""
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        hashes = list(pool.map(file_sha256, files))
    return {
        "sources": [{"path": str(f), "bytes": f.stat().st_size, "sha256": h}
                    for f, h in zip(files, hashes)],
        "tokenizer_sha256": tokenizer.sha256,
        "eot_id": int(eot_id),
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "text_key": text_key,
        "version": store_lib.VERSION,
    }


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")


def prepare(inputs: str | Sequence[str], tokenizer: str | os.PathLike | Tokenizer,
            output: str | os.PathLike, *, workers: int = 1, val_fraction: float = 0.01,
            seed: int = 0, text_key: str = "text", eot_id: int | None = None,
            chunk_mb: float = 16.0, overwrite: bool = False, progress: bool = True) -> dict:
    """Build (or find up to date) the store at ``output``; returns its manifest."""
    started = time.perf_counter()
    check_val_fraction(val_fraction)
    output = pathlib.Path(output).absolute()
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    exclude = [output, *output.parent.glob(f".{output.name}.*")]
    files = text_lib.expand_inputs(inputs, exclude=exclude + ([tok.path] if tok.path else []))
    for f in files:
        text_lib.check_not_empty(f)
    eot_id = tok.eos_id if eot_id is None else int(eot_id)
    if not 0 <= eot_id < tok.vocab_size:
        raise DataError(f"tokenizer {tok.path} has no end-of-text (eos) piece; pass --eot_id "
                        f"with an id in [0, {tok.vocab_size})")
    fp = fingerprint(files, tok, eot_id=eot_id, val_fraction=val_fraction, seed=seed,
                     text_key=text_key, workers=workers)

    if (output / store_lib.MANIFEST).is_file():
        manifest = store_lib.read_manifest(output)
        if manifest.get("fingerprint") == fp:
            store_lib.TokenStore(output)  # sizes still match the manifest
            log.info("store %s is up to date: nothing to do", output)
            return manifest
        if not overwrite:
            changed = sorted(k for k in fp if manifest.get("fingerprint", {}).get(k) != fp[k])
            raise DataError(f"{output} holds a store prepared from other inputs (differs in: "
                            f"{', '.join(changed)}); choose another --output or pass "
                            f"--overwrite")
    elif output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise DataError(f"{output} exists and is not a token store (no {store_lib.MANIFEST}); "
                        f"remove it or choose another --output")

    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f".{output.name}.partial-*"):
        log.warning("removing %s, left by an interrupted run", stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    (tmp / "chunks").mkdir(parents=True)
    try:
        manifest = _build(tmp, files, tok, fp, eot_id=eot_id, workers=workers,
                          val_fraction=val_fraction, seed=seed, text_key=text_key,
                          chunk_bytes=max(1, int(chunk_mb * 2**20)), progress=progress)
        manifest["prepare_seconds"] = round(time.perf_counter() - started, 3)
        _write_json(tmp / store_lib.MANIFEST, manifest)  # last file of the store
        _publish(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s: %s train and %s validation tokens (%s + %s documents) in %.1f s",
                output, f"{manifest['splits']['train']['tokens']:,}",
                f"{manifest['splits']['val']['tokens']:,}",
                f"{manifest['splits']['train']['documents']:,}",
                f"{manifest['splits']['val']['documents']:,}", manifest["prepare_seconds"])
    return manifest


def _build(tmp: pathlib.Path, files, tok: Tokenizer, fp: dict, *, eot_id, workers,
           val_fraction, seed, text_key, chunk_bytes, progress) -> dict:
    dtype = tok.token_dtype()
    chunk_dir = tmp / "chunks"
    tasks, chunk_file = [], []
    for file_index, path in enumerate(files):
        for start, end in text_lib.chunk_boundaries(path, chunk_bytes):
            tasks.append((len(tasks), str(path), start, end, text_key, eot_id, dtype.str,
                          str(chunk_dir)))
            chunk_file.append(file_index)
    docs_per_chunk = [0] * len(tasks)
    timing = {"worker_start_s": 0.0}
    bar = tqdm(total=sum(t[3] - t[2] for t in tasks), unit="B", unit_scale=True,
               desc="tokenise", disable=not progress, dynamic_ncols=True)
    with bar:
        if workers <= 1:
            start = time.perf_counter()
            for task in tasks:
                chunk_id, n_docs, n_bytes = _tokenize_chunk(task, tok)
                docs_per_chunk[chunk_id] = n_docs
                bar.update(n_bytes)
        else:
            context = multiprocessing.get_context("spawn")  # safe beside jax threads
            with concurrent.futures.ProcessPoolExecutor(
                    workers, mp_context=context, initializer=_init_worker,
                    initargs=(tok,)) as pool:
                start = time.perf_counter()
                list(pool.map(_ready, [0.05] * workers))  # start-up apart from throughput
                timing["worker_start_s"] = round(time.perf_counter() - start, 3)
                start = time.perf_counter()
                futures = [pool.submit(_tokenize_chunk, t) for t in tasks]
                try:
                    for future in concurrent.futures.as_completed(futures):
                        chunk_id, n_docs, n_bytes = future.result()
                        docs_per_chunk[chunk_id] = n_docs
                        bar.update(n_bytes)
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    timing["tokenise_s"] = round(time.perf_counter() - start, 3)
    docs_per_file = np.bincount(chunk_file, weights=docs_per_chunk,
                                minlength=len(files)).astype(int)
    for path, n in zip(files, docs_per_file):
        if n == 0:
            raise DataError(f"empty file: {path} (no non-blank document)")

    num_docs = int(sum(docs_per_chunk))
    num_val = 0
    if val_fraction > 0 and num_docs >= 2:
        num_val = min(num_docs - 1, max(1, round(val_fraction * num_docs)))
    is_val = np.zeros(num_docs, bool)
    is_val[np.random.default_rng(seed).choice(num_docs, num_val, replace=False)] = True

    counts = {name: {"tokens": 0, "documents": 0} for name in store_lib.SPLITS}
    outs = {name: open(tmp / f"{name}.tokens", "wb") for name in store_lib.SPLITS}
    lengths = {name: [] for name in store_lib.SPLITS}
    try:
        doc = 0
        for chunk_id in range(len(tasks)):
            flat = np.fromfile(chunk_dir / f"{chunk_id:07d}.tokens", dtype)
            lens = np.fromfile(chunk_dir / f"{chunk_id:07d}.lengths", np.int64)
            val_docs = is_val[doc:doc + len(lens)]
            doc += len(lens)
            val_tokens = np.repeat(val_docs, lens)
            for name, doc_mask, token_mask in (("train", ~val_docs, ~val_tokens),
                                               ("val", val_docs, val_tokens)):
                flat[token_mask].tofile(outs[name])
                lengths[name].append(lens[doc_mask])
                counts[name]["tokens"] += int(lens[doc_mask].sum())
                counts[name]["documents"] += int(doc_mask.sum())
            (chunk_dir / f"{chunk_id:07d}.tokens").unlink()
            (chunk_dir / f"{chunk_id:07d}.lengths").unlink()
        for f in outs.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in outs.values():
            f.close()
    chunk_dir.rmdir()
    for name in store_lib.SPLITS:
        lens = np.concatenate(lengths[name]) if lengths[name] else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        with open(tmp / f"{name}.docs", "wb") as f:
            offsets.tofile(f)
            f.flush()
            os.fsync(f.fileno())

    sources = [dict(s, documents=int(n)) for s, n in zip(fp["sources"], docs_per_file)]
    return {
        "format": store_lib.FORMAT,
        "version": store_lib.VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fp,
        "tokenizer": {"path": tok.path, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "eot_id": eot_id, "bos_id": tok.bos_id, "pad_id": tok.pad_id},
        "dtype": dtype.name,
        "splits": counts,
        "total_tokens": counts["train"]["tokens"] + counts["val"]["tokens"],
        "sources": sources,
        "options": {"val_fraction": val_fraction, "seed": seed, "text_key": text_key,
                    "workers": workers, "chunks": len(tasks)},
        "timing": timing,
    }


def _write_json(path: pathlib.Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _publish(tmp: pathlib.Path, output: pathlib.Path) -> None:
    """Move the finished store to ``output`` in one rename (an old store is replaced)."""
    old = None
    if output.exists() and any(output.iterdir()):
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(output, old)
    elif output.exists():
        output.rmdir()
    os.rename(tmp, output)
    _fsync_dir(output.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@cli.command
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmjax.data.prepare``: exit status 0, 1 for bad input (one line naming the
    problem; nothing is published), 2 for bad flags."""
    parser = cli.ArgumentParser(prog="python -m mmjax.data.prepare",
                                description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="glob pattern(s), comma-separated")
    parser.add_argument("--tokenizer", required=True, help="a sentencepiece .model file")
    parser.add_argument("--output", required=True, help="the store directory to create")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--val_fraction", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument("--text_key", default="text", help="JSONL field holding the text")
    parser.add_argument("--eot_id", type=int, default=None,
                        help="end-of-text id (default: the tokenizer's eos id)")
    parser.add_argument("--chunk_mb", type=float, default=16.0,
                        help="size of the pieces of a file handed to one worker")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a store prepared from other inputs")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        check_val_fraction(args.val_fraction)
    except DataError as e:
        parser.error(str(e))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    level, propagate = log.level, log.propagate
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        manifest = prepare(args.input, args.tokenizer, args.output, workers=args.workers,
                           val_fraction=args.val_fraction, seed=args.seed,
                           text_key=args.text_key, eot_id=args.eot_id, chunk_mb=args.chunk_mb,
                           overwrite=args.overwrite, progress=not args.no_progress)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
    print(json.dumps({k: manifest[k] for k in ("splits", "total_tokens", "dtype")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
