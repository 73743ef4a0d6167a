"""Batches for the trainer: a grain pipeline over a token store, or a synthetic corpus.

``make_batches(config.data, sharding=..., seed=...)`` is the one entry point. It returns an
iterator whose ``next()`` is a ``[global_batch, context_length + 1]`` int32 ``jax.Array`` on
the given ``NamedSharding`` (a NumPy array when ``sharding`` is None), with ``get_state()`` /
``set_state()`` (the number of global batches read); a text iterator is a grain
``DatasetIterator``, saved beside the train state. ``config.data`` names the ``corpus``
(``"tokens"`` with a store ``path``, or a synthetic corpus of
:func:`mmjax.data.synthetic.make_corpus`), ``context_length``, the global ``batch_size``,
``packing`` (``"windows"`` or ``"documents"``), ``worker_count``, ``prefetch``,
``num_epochs``, ``allow_vocab_padding`` and ``corpus_options``.

Each process reads only the rows its devices hold (:func:`rows_by_process`), so global batch
``k`` is the same rows for any number of processes. The two packings, resuming on another
host count, and the checks on every batch: ``docs/architecture.md``, section 7.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from mmjax.data import synthetic
from mmjax.data.store import StoreSplit, TokenStore, check_vocab_size
from mmjax.data.text import DataError

PACKINGS = ("windows", "documents")


@dataclasses.dataclass
class Rows:
    """The rows of one split: ``count`` per epoch, ``row(epoch, i)`` -> ``[T + 1]`` int32.

    Picklable (grain workers re-open the memory maps).
    """

    split: StoreSplit
    context_length: int
    packing: str = "windows"
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self):
        if self.packing not in PACKINGS:
            raise ValueError(f"data.packing must be one of {PACKINGS}, got {self.packing!r}")
        if self.context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {self.context_length}")
        n, t = self.split.num_tokens, self.context_length
        where = f"the {self.split.name} split of {self.split.directory}"
        if self.packing == "windows":
            if n < t + 1:
                raise DataError(f"{where} holds {n} tokens, fewer than context_length + 1 = "
                                f"{t + 1}")
            self.count = (n - 1) // t
            self.slack = (n - 1) - self.count * t
            self._pieces_before = None
        else:
            lengths = self.split.document_lengths()
            if len(lengths) == 0 or lengths.max() < t + 1:
                longest = int(lengths.max()) if len(lengths) else 0
                raise DataError(
                    f"packing='documents' with context_length={t} is longer than every "
                    f"document of {where} (longest: {longest} tokens with its end-of-text, "
                    f"a row needs {t + 1}); use packing='windows' or a shorter context")
            pieces = (lengths - 1) // t  # whole pieces of t + 1 tokens per document
            self._pieces_before = np.concatenate([[0], np.cumsum(pieces)]).astype(np.int64)
            self.count = int(self._pieces_before[-1])

    def start(self, epoch: int, i: int) -> int:
        t = self.context_length
        if self.packing == "windows":
            return self.offset(epoch) + i * t
        doc = int(np.searchsorted(self._pieces_before, i, side="right")) - 1
        return int(self.split.doc_offsets[doc]) + (i - int(self._pieces_before[doc])) * t

    def offset(self, epoch: int) -> int:
        """Where epoch ``epoch``'s window grid starts: seeded, in ``[0, slack]``."""
        if not (self.shuffle and self.slack):
            return 0
        cache = self.__dict__.setdefault("_offset_cache", {})  # read by grain's threads
        value = cache.get(epoch)
        if value is None:
            value = int(np.random.default_rng([self.seed, epoch, 7]).integers(
                0, self.slack + 1))
            if len(cache) > 8:
                cache.clear()
            cache[epoch] = value
        return value

    def row(self, epoch: int, i: int) -> np.ndarray:
        start = self.start(epoch, i)
        return np.asarray(self.split.tokens[start:start + self.context_length + 1], np.int32)


class _RowAt:
    """``map_with_index`` callable: global position ``g`` (over epochs), index -> row."""

    def __init__(self, rows: Rows):
        self.rows = rows

    def __call__(self, position: int, index: int) -> np.ndarray:
        return self.rows.row(position // self.rows.count, index)


def row_dataset(rows: Rows, *, num_epochs: int | None = None) -> grain.MapDataset:
    """The stream of rows over epochs (shuffled per epoch if ``rows.shuffle``), unsharded."""
    ds = grain.MapDataset.range(rows.count)
    if rows.shuffle:
        ds = ds.shuffle(seed=rows.seed)
    return ds.repeat(num_epochs).map_with_index(_RowAt(rows))


def rows_by_process(sharding, global_batch: int, row_length: int, host_of=None
                    ) -> dict[int, np.ndarray]:
    """``{process_index: the sorted batch rows its devices hold}`` for every process of a
    sharding of a ``[global_batch, row_length]`` array (any device order: a host's rows may be
    several blocks, as on a real TPU slice; replicated devices hold the same rows).
    ``host_of(device)``: the host of a device (default its ``process_index``; tests fake
    hosts with it)."""
    host_of = host_of or (lambda device: device.process_index)
    rows: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map((global_batch, row_length)).items():
        lo, hi, _ = index[0].indices(global_batch)
        rows.setdefault(host_of(device), set()).update(range(lo, hi))
    return {p: np.array(sorted(r), np.int64) for p, r in sorted(rows.items())}


def process_rows(sharding: NamedSharding | None, global_batch: int, row_length: int,
                 process_index: int | None = None,
                 process_count: int | None = None) -> np.ndarray:
    """The sorted batch rows this process reads (see the module docstring).

    From the sharding (the rows this process's devices hold), or, with ``process_index`` /
    ``process_count`` (or no sharding), the ``process_index``-th of ``process_count`` equal
    blocks.
    """
    if sharding is not None and process_index is None and process_count is None:
        rows = rows_by_process(sharding, global_batch, row_length).get(jax.process_index())
        if rows is None or not len(rows):
            raise ValueError(f"process {jax.process_index()} holds no device of the batch "
                             f"sharding")
        return rows
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} must be in [0, process_count={count})")
    if global_batch % count:
        raise ValueError(f"data.batch_size={global_batch} must be a multiple of the "
                         f"{count} processes that share it")
    share = global_batch // count
    return np.arange(index * share, (index + 1) * share, dtype=np.int64)


class _LocalBatch:
    """``map`` callable: global batch ``k`` -> this process's ``[len(rows), T + 1]`` rows."""

    def __init__(self, stream: grain.MapDataset, batch_size: int, rows: np.ndarray):
        self.stream, self.batch_size, self.rows = stream, batch_size, rows

    def __call__(self, k: int) -> np.ndarray:
        first = k * self.batch_size
        return np.stack([self.stream[first + int(r)] for r in self.rows])


class TextBatches(grain.DatasetIterator):
    """Global batches from a token store; a grain ``DatasetIterator`` (checkpointable).

    ``get_state()`` is ``{"pipeline", "settings", "batches"}``: the same on every process
    and for any process count or ``worker_count`` (see the module docstring).
    """

    def __init__(self, store: TokenStore, *, split: str, context_length: int,
                 batch_size: int, vocab_size: int, sharding: NamedSharding | None = None,
                 seed: int = 0, packing: str = "windows", shuffle: bool = True,
                 num_epochs: int | None = None, worker_count: int = 0, prefetch: int = 2,
                 read_threads: int = 2, process_index: int | None = None,
                 process_count: int | None = None):
        super().__init__()
        self.store = store
        self.split_name = split
        self.rows = Rows(store.split(split), context_length, packing, seed, shuffle)
        self.vocab_size = int(vocab_size)
        self.sharding = sharding
        self.global_shape = (int(batch_size), context_length + 1)
        self.local_rows = process_rows(sharding, batch_size, context_length + 1,
                                       process_index, process_count)
        self.local_batch = len(self.local_rows)
        stream = row_dataset(self.rows, num_epochs=num_epochs)
        self._steps = grain.MapDataset.range(len(stream) // batch_size).map(
            _LocalBatch(stream, batch_size, self.local_rows))
        self._read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
        self._worker_count, self._prefetch = int(worker_count), int(prefetch)
        self._iterator = None  # opened at the first batch, from batch ``_batches``
        self._batches = 0
        self._settings = {"split": split, "context_length": context_length,
                          "batch_size": int(batch_size), "seed": seed, "packing": packing,
                          "shuffle": shuffle, "store": store.manifest.get("fingerprint", {})}
        self._identity = _identity(self._settings)

    def _open(self):
        if self._iterator is None:
            iter_ds = self._steps[self._batches:].to_iter_dataset(self._read)
            if self._worker_count > 0:
                _mark_absl_flags_parsed()
                iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
                    num_workers=self._worker_count, per_worker_buffer_size=self._prefetch))
            self._iterator = iter(iter_ds)
        return self._iterator

    def _check(self, local: np.ndarray, batch: int) -> np.ndarray:
        low, high = int(local.min()), int(local.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise DataError(f"token id {bad} outside the model vocabulary [0, "
                            f"{self.vocab_size}) in batch {batch} of the "
                            f"{self.split_name} split of {self.store.directory}")
        return local

    def peek_local(self) -> np.ndarray:
        """This process's rows of the next batch, checked, without moving the iterator (read
        in this process: no worker is started)."""
        if self._batches >= len(self._steps):
            raise StopIteration
        return self._check(self._steps[self._batches], self._batches)

    def next_local(self) -> np.ndarray:
        """This process's ``[rows, T + 1]`` int32 rows of the next batch, checked."""
        local = next(self._open())
        self._batches += 1
        return self._check(local, self._batches - 1)

    def __next__(self) -> jax.Array | np.ndarray:
        local = self.next_local()
        if self.sharding is None:
            return local
        return jax.make_array_from_process_local_data(self.sharding, local, self.global_shape)

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._identity, "settings": self._settings,
                "batches": self._batches}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a saved state (``"legacy"``: an older checkpoint's batch count,
        accepted unchecked)."""
        if not state.get("legacy") and state.get("pipeline") != self._identity:
            raise ValueError(_mismatch(state.get("settings"), self._settings))
        self._close_iterator()
        self._batches = int(state["batches"])

    def _close_iterator(self) -> None:
        iterator, self._iterator = getattr(self, "_iterator", None), None
        if iterator is not None and hasattr(iterator, "close"):
            iterator.close()

    def close(self) -> None:
        self._close_iterator()
        super().close()


def _mismatch(saved: dict | None, now: dict) -> str:
    """One line naming what changed between a saved data state and this pipeline."""
    if not isinstance(saved, dict):
        return "this data iterator state was saved by another pipeline"
    names = {"split": "the split", "context_length": "data.context_length",
             "batch_size": "data.batch_size", "seed": "train.seed",
             "packing": "data.packing", "shuffle": "the shuffle setting",
             "store": "the token store (data.path)"}
    changed = [f"{names.get(k, k)} ({saved.get(k)!r} -> {now.get(k)!r})"
               if k != "store" else names[k]
               for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    return ("this data iterator state was saved by another pipeline: "
            + (", ".join(changed) if changed else "its digest differs")
            + " changed; the saved position cannot be carried over (use the saved setting "
            "or a new --workdir)")


class SyntheticBatches(grain.DatasetIterator):
    """A synthetic corpus behind the same interface: batch ``k`` is ``corpus.batch(k)``.

    Every process builds the same global batch (a pure function of the step) and hands over
    only its devices' shards, exactly as the trainer did before; the state is the step.
    """

    def __init__(self, corpus, *, split: str, context_length: int, batch_size: int,
                 sharding: NamedSharding | None = None):
        super().__init__()
        self.corpus = corpus
        self.split_name = "eval" if split == "val" else split
        self.shape = (int(batch_size), context_length + 1)
        self.sharding = sharding
        self.step = 0

    def __next__(self):
        tokens = self.corpus.batch(self.step, self.shape[0], self.shape[1],
                                   split=self.split_name)
        self.step += 1
        if self.sharding is None:
            return tokens
        return jax.make_array_from_callback(tokens.shape, self.sharding,
                                            lambda index: tokens[index])

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step}

    def set_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def make_batches(data: ml_collections.ConfigDict | dict, *, vocab_size: int | None = None,
                 sharding: NamedSharding | None = None, seed: int = 0, split: str = "train",
                 shuffle: bool | None = None, process_index: int | None = None,
                 process_count: int | None = None):
    """The batch iterator a data config describes (keys: see the module docstring).

    ``vocab_size`` is the model's vocabulary (``config.model.vocab_size``); left out, it is
    ``data.vocab_size``. ``split`` is ``"train"`` or ``"val"``; ``shuffle`` defaults to
    ``split == "train"`` (validation batches come in store order, the same at every
    evaluation).
    """
    data = dict(data)
    if vocab_size is None:
        if data.get("vocab_size") is None:
            raise ValueError("make_batches needs vocab_size= (the model's vocabulary) or "
                             "data.vocab_size")
        vocab_size = data["vocab_size"]
    data["vocab_size"] = int(vocab_size)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    corpus = data.get("corpus", "tokens")
    shuffle = split == "train" if shuffle is None else shuffle
    if corpus != "tokens":
        options = dict(data.get("corpus_options") or {})
        source = synthetic.make_corpus(corpus, vocab_size=data["vocab_size"], seed=seed,
                                       **options)
        return SyntheticBatches(source, split=split, context_length=data["context_length"],
                                batch_size=data["batch_size"], sharding=sharding)
    if not data.get("path"):
        raise DataError("data.corpus='tokens' needs data.path: a store directory made by "
                        "python -m mmjax.data.prepare (--config.data.path=DIR)")
    store = TokenStore(data["path"])
    check_vocab_size(data["vocab_size"], store.vocab_size,
                     source=f"the token store {store.directory} (tokenizer "
                            f"{store.manifest['tokenizer'].get('path')})",
                     allow_padding=bool(data.get("allow_vocab_padding", False)))
    return TextBatches(store, split=split, context_length=data["context_length"],
                       batch_size=data["batch_size"], vocab_size=data["vocab_size"],
                       sharding=sharding, seed=seed, packing=data.get("packing", "windows"),
                       shuffle=shuffle, num_epochs=data.get("num_epochs"),
                       worker_count=int(data.get("worker_count", 0)),
                       prefetch=int(data.get("prefetch", 2)), process_index=process_index,
                       process_count=process_count)


def _identity(settings: dict) -> str:
    """A short digest of what decides the batch sequence, to refuse a foreign state."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _mark_absl_flags_parsed() -> None:
    """grain workers read absl flags; outside an absl app they are not parsed yet."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
