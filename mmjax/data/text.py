"""Text sources: input patterns -> files -> documents, with one-line errors for bad input.

What a *document* is:

- ``.jsonl`` / ``.json`` (JSON Lines): one document per non-blank line, the string under
  ``text_key`` (default ``"text"``) of the JSON object on that line.
- any other file (``.txt``, ...): documents are separated by a line holding only
  ``<|endoftext|>`` (the TinyStories / BabiStories convention); a file without such lines is
  one document.

Documents that are empty or whitespace only are dropped. Text is kept byte for byte otherwise
(no stripping), so ``decode(encode(document))`` gives the document back.

Bad input raises :class:`DataError` (a ``ValueError``) with one line naming the file:

- a pattern that matches no file;
- an empty file (0 bytes, or nothing but whitespace and separators);
- a file that is not UTF-8: an **error**, not a skip, naming the byte offset, so that no part
  of a corpus is dropped silently (fix or remove the file, then re-run).
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
from collections.abc import Iterator, Sequence

SEPARATOR = "<|endoftext|>"
JSONL_SUFFIXES = (".jsonl", ".json")


class DataError(ValueError):
    """Bad input data or a bad token store; the message is one line naming the problem."""


def expand_inputs(patterns: str | Sequence[str],
                  exclude: Sequence[str | os.PathLike] = ()) -> list[pathlib.Path]:
    """Files matching the glob ``patterns`` (a string may hold several, comma-separated).

    A pattern that names a directory stands for the (non-hidden) files directly inside it;
    directories matched by a wildcard are skipped. Files inside any ``exclude`` directory (or
    equal to an ``exclude`` file) are left out: a store or tokenizer written next to the
    text never becomes input. The result is sorted and without duplicates, so the document
    order of a corpus never depends on the file system.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [p for p in str(patterns).split(",") if p.strip()]
    if not patterns:
        raise DataError("no input pattern given")
    excluded = [pathlib.Path(e).absolute() for e in exclude]

    def wanted(path: pathlib.Path) -> bool:
        path = path.absolute()
        return not any(path == e or e in path.parents for e in excluded)

    files = set()
    for pattern in patterns:
        pattern = os.path.expanduser(pattern.strip())
        if os.path.isdir(pattern):
            found = [p for p in pathlib.Path(pattern).iterdir()
                     if p.is_file() and not p.name.startswith(".")]
        else:
            found = [pathlib.Path(m) for m in glob.glob(pattern, recursive=True)
                     if os.path.isfile(m)]
        found = [p for p in found if wanted(p)]
        if not found:
            raise DataError(f"no files match the input pattern {pattern!r}")
        files.update(p.resolve() for p in found)
    return sorted(files)


def is_jsonl(path: str | os.PathLike) -> bool:
    return pathlib.Path(path).suffix.lower() in JSONL_SUFFIXES


def check_not_empty(path: pathlib.Path) -> None:
    if path.stat().st_size == 0:
        raise DataError(f"empty file: {path}")


def decode_utf8(data: bytes, path: str | os.PathLike, offset: int = 0) -> str:
    """``data`` as text; a non-UTF-8 byte is a :class:`DataError` naming file and offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8: {path} (byte {offset + e.start}: {e.reason}); "
                        f"convert it to UTF-8 or remove it") from None


def split_documents(text: str, path: str | os.PathLike, *, jsonl: bool,
                    text_key: str = "text", line_offset: int = 0) -> list[str]:
    """The documents in ``text`` (a whole file, or a chunk cut at a document boundary)."""
    if jsonl:
        docs = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"bad JSON on line {line_offset + i + 1} of {path}: "
                                f"{e.msg}") from None
            value = record.get(text_key) if isinstance(record, dict) else None
            if not isinstance(value, str):
                raise DataError(f"line {line_offset + i + 1} of {path} has no string field "
                                f"{text_key!r}")
            docs.append(value)
    else:
        docs, current = [], []
        for line in text.splitlines(keepends=True):
            if line.strip() == SEPARATOR:
                docs.append("".join(current))
                current = []
            else:
                current.append(line)
        docs.append("".join(current))
        # the newline that precedes a separator line belongs to the separator
        docs = [d[:-1] if d.endswith("\n") and i < len(docs) - 1 else d
                for i, d in enumerate(docs)]
    return [d for d in docs if d.strip()]


def read_documents(path: str | os.PathLike, *, text_key: str = "text") -> list[str]:
    """All documents of one file (see the module docstring); bad files raise ``DataError``."""
    path = pathlib.Path(path)
    check_not_empty(path)
    text = decode_utf8(path.read_bytes(), path)
    docs = split_documents(text, path, jsonl=is_jsonl(path), text_key=text_key)
    if not docs:
        raise DataError(f"empty file: {path} (no non-blank document)")
    return docs


def iter_documents(paths: Sequence[str | os.PathLike], *,
                   text_key: str = "text") -> Iterator[str]:
    for path in paths:
        yield from read_documents(path, text_key=text_key)


def chunk_boundaries(path: str | os.PathLike, chunk_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges ``[start, end)`` of ``path``, about ``chunk_bytes`` long, cut only between
    documents (after a newline in JSONL, after a separator line otherwise), so each chunk
    holds whole documents and whole UTF-8 characters."""
    path = pathlib.Path(path)
    size = path.stat().st_size
    if size <= chunk_bytes:
        return [(0, size)]
    marker = b"\n" if is_jsonl(path) else ("\n" + SEPARATOR).encode()
    bounds, start = [], 0
    with open(path, "rb") as f:
        while start < size:
            target = start + chunk_bytes
            if target >= size:
                bounds.append((start, size))
                break
            f.seek(target)
            end = None
            window = b""
            pos = target
            while end is None:
                block = f.read(1 << 20)
                if not block:
                    end = size
                    break
                window += block
                hit = window.find(marker)
                if hit >= 0:
                    cut = pos + hit + len(marker)
                    if not is_jsonl(path):  # move past the rest of the separator line
                        f.seek(cut)
                        rest = f.readline()
                        cut += len(rest)
                    end = cut
                else:
                    keep = len(marker) - 1
                    pos += len(window) - keep
                    window = window[-keep:] if keep else b""
            bounds.append((start, end))
            start = end
    return bounds


def read_chunk(path: str | os.PathLike, start: int, end: int, *,
               text_key: str = "text") -> list[str]:
    """The documents in bytes ``[start, end)`` of ``path`` (a range from ``chunk_boundaries``)."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    text = decode_utf8(data, path, offset=start)
    return split_documents(text, path, jsonl=is_jsonl(path), text_key=text_key)
