"""The token store that :mod:`mmjax.data.prepare` writes and :mod:`mmjax.data.pipeline` reads.

A store is a directory::

    manifest.json   written last: a store without it is unfinished and never read
    train.tokens    every training document's ids, each followed by the end-of-text id, as one
                    flat little-endian uint16 array (uint32 when the vocabulary exceeds 65536)
    train.docs      int64 [documents + 1]: where each document starts in train.tokens
    val.tokens      the same for the validation split
    val.docs

Why a memory-mapped flat array and not ArrayRecord: ``docs/architecture.md``, section 7.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Mapping, Sequence

import numpy as np

from mmjax.data.text import DataError

MANIFEST = "manifest.json"
FORMAT = "mmjax-token-store"
VERSION = 1
SPLITS = ("train", "val")


class StoreSplit:
    """One split of a store: ``tokens`` (memmap) and ``doc_offsets`` (memmap), opened lazily.

    Picklable (grain worker processes re-open the files instead of copying them).
    """

    def __init__(self, directory: str | pathlib.Path, name: str, num_tokens: int,
                 num_documents: int, dtype: str):
        self.directory = pathlib.Path(directory)
        self.name = name
        self.num_tokens = int(num_tokens)
        self.num_documents = int(num_documents)
        self.dtype = np.dtype(dtype)
        self._tokens = None
        self._offsets = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokens"] = state["_offsets"] = None
        return state

    @property
    def tokens_path(self) -> pathlib.Path:
        return self.directory / f"{self.name}.tokens"

    @property
    def docs_path(self) -> pathlib.Path:
        return self.directory / f"{self.name}.docs"

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = _memmap(self.tokens_path, self.dtype, self.num_tokens)
        return self._tokens

    @property
    def doc_offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = _memmap(self.docs_path, np.dtype(np.int64), self.num_documents + 1)
        return self._offsets

    def document(self, i: int) -> np.ndarray:
        """Document ``i``'s ids, its end-of-text id included."""
        return np.asarray(self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]])

    def document_lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.doc_offsets))


def _memmap(path: pathlib.Path, dtype: np.dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros((0,), dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class TokenStore:
    """An opened, checked store: manifest fields plus one :class:`StoreSplit` per split."""

    def __init__(self, directory: str | pathlib.Path):
        self.directory = pathlib.Path(directory).resolve()
        self.manifest = read_manifest(self.directory)
        self.vocab_size = int(self.manifest["tokenizer"]["vocab_size"])
        self.eot_id = int(self.manifest["tokenizer"]["eot_id"])
        self.dtype = np.dtype(self.manifest["dtype"])
        self.splits = {}
        for name in SPLITS:
            info = self.manifest["splits"][name]
            split = StoreSplit(self.directory, name, info["tokens"], info["documents"],
                               self.manifest["dtype"])
            _check_size(split.tokens_path, split.num_tokens * self.dtype.itemsize, self.directory)
            _check_size(split.docs_path, (split.num_documents + 1) * 8, self.directory)
            self.splits[name] = split
        for split in self.splits.values():
            offsets = split.doc_offsets
            if offsets[0] != 0 or offsets[-1] != split.num_tokens:
                raise DataError(f"corrupt store {self.directory}: {split.docs_path.name} does "
                                f"not span {split.tokens_path.name}; run prepare again")

    def split(self, name: str) -> StoreSplit:
        if name not in self.splits:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return self.splits[name]


def read_manifest(directory: str | pathlib.Path) -> dict:
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise DataError(f"no token store at {directory} (not a directory); create one with "
                        f"python -m mmjax.data.prepare")
    path = directory / MANIFEST
    if not path.is_file():
        raise DataError(f"{directory} has no {MANIFEST}: not a finished token store (an "
                        f"interrupted prepare, or another directory); run "
                        f"python -m mmjax.data.prepare again")
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
        manifest["splits"]["train"]["tokens"]  # noqa: B018  (the keys every reader needs)
        manifest["tokenizer"]["vocab_size"]  # noqa: B018
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"corrupt store {directory}: unreadable {MANIFEST} ({e})") from None
    if manifest.get("version") != VERSION:
        raise DataError(f"store {directory} has format version {manifest.get('version')}; "
                        f"this mmjax reads version {VERSION}: run prepare again")
    return manifest


def _check_size(path: pathlib.Path, expected: int, directory: pathlib.Path) -> None:
    actual = path.stat().st_size if path.is_file() else None
    if actual != expected:
        held = "is missing" if actual is None else f"holds {actual} bytes"
        raise DataError(f"corrupt store {directory}: {path.name} {held}, the manifest says "
                        f"{expected}; run prepare again into a fresh directory")


def check_vocab_size(model_vocab_size: int, data_vocab_size: int, *, source: str = "data",
                     allow_padding: bool = False) -> None:
    """Raise one clear line unless the model's vocabulary fits the data's token ids.

    ``allow_padding=True`` accepts a model vocabulary larger than the tokenizer's (GPT-2's
    50257 ids padded to 50304); a smaller one is always an error (ids would wrap).
    """
    if model_vocab_size == data_vocab_size:
        return
    if allow_padding and model_vocab_size > data_vocab_size:
        return
    raise DataError(
        f"vocabulary mismatch: model.vocab_size={model_vocab_size} but {source} has "
        f"{data_vocab_size} token ids; set --config.model.vocab_size={data_vocab_size}"
        + (" (data.allow_vocab_padding accepts a larger one, never a smaller one)"
           if allow_padding else ""))


def write_store(directory: str | os.PathLike, documents: Mapping[str, Sequence[np.ndarray]], *,
                vocab_size: int, eot_id: int, tokenizer_path: str | None = None,
                tokenizer_sha256: str | None = None) -> dict:
    """Write a store from already tokenised documents (``{"train": [...], "val": [...]}``).

    For corpora tokenised elsewhere (and for tests): each document gets ``eot_id`` appended,
    exactly as ``prepare`` does. Written in a hidden temporary directory, manifest last, then
    renamed into place; ``directory`` must not exist yet. Returns the manifest.
    """
    directory = pathlib.Path(directory).absolute()
    if directory.exists():
        raise DataError(f"{directory} already exists; write_store makes a new store")
    dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    tmp = directory.parent / f".{directory.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        splits, digest = {}, hashlib.sha256()
        for name in SPLITS:
            docs = [np.asarray(d).ravel() for d in documents.get(name, [])]
            for i, d in enumerate(docs):
                if len(d) and (d.min() < 0 or d.max() >= vocab_size):
                    raise DataError(f"{name} document {i} holds ids outside [0, {vocab_size})")
            flat = np.concatenate([np.append(d, eot_id) for d in docs]) if docs else []
            flat = np.asarray(flat, dtype)
            offsets = np.concatenate([[0], np.cumsum([len(d) + 1 for d in docs])])
            flat.tofile(tmp / f"{name}.tokens")
            offsets.astype(np.int64).tofile(tmp / f"{name}.docs")
            digest.update(flat.tobytes())
            splits[name] = {"tokens": int(len(flat)), "documents": len(docs)}
        manifest = {
            "format": FORMAT, "version": VERSION,
            "fingerprint": {"tokens_sha256": digest.hexdigest(), "version": VERSION},
            "tokenizer": {"path": tokenizer_path, "sha256": tokenizer_sha256,
                          "vocab_size": int(vocab_size), "eot_id": int(eot_id)},
            "dtype": dtype.name, "splits": splits,
            "total_tokens": sum(s["tokens"] for s in splits.values()), "sources": [],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest

