"""Sentencepiece tokenizers: train one from text or JSONL files, or load any ``.model`` file.

Train (BPE by default, byte fallback, ids ``unk=0 bos=1 eos=2 pad=3``)::

    python -m mmjax.data.tokenizer --input 'DIR/*.txt' --vocab_size 8192 --output DIR/tok.model

Documents are read as described in :mod:`mmjax.data.text`. The trained model keeps text byte
for byte: identity normalisation, no dummy prefix, no whitespace folding, and byte fallback
for any character it has not seen, so ``decode(encode(x)) == x`` for every string.

Any existing sentencepiece model (for instance a LLaMA-style ``tokenizer.model``) loads with
:meth:`Tokenizer.load`. ``Tokenizer.vocab_size`` is the number the model config must use;
:func:`check_vocab_size` turns a mismatch into one clear line at start-up instead of a silent
index wrap in the embedding.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import sys
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from mmjax import cli
from mmjax.data import text as text_lib
from mmjax.data.store import check_vocab_size  # noqa: F401  (re-exported)
from mmjax.data.text import DataError

SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class Tokenizer:
    """A loaded sentencepiece model with batch encode/decode."""

    def __init__(self, model_proto: bytes, path: str | os.PathLike | None = None):
        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.path = None if path is None else str(pathlib.Path(path).resolve())
        self.sha256 = hashlib.sha256(model_proto).hexdigest()
        self._proto = model_proto

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = pathlib.Path(path)
        if not path.is_file():
            raise DataError(f"no tokenizer model at {path}")
        proto = path.read_bytes()
        try:
            return cls(proto, path)
        except RuntimeError as e:
            raise DataError(f"not a sentencepiece model: {path} ({e})") from None

    def __getstate__(self):  # picklable: worker processes get the model bytes
        return {"proto": self._proto, "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["proto"])
        self.path = state["path"]

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def pad_id(self) -> int:
        return self.processor.pad_id()

    @property
    def unk_id(self) -> int:
        return self.processor.unk_id()

    def token_dtype(self) -> np.dtype:
        """The smallest unsigned dtype that holds every id: uint16 up to 65536 pieces."""
        return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)

    def encode(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of each text (no bos/eos added)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of strings; wrap a single one in a list")
        return self.processor.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[Sequence[int]]) -> list[str]:
        """Text of each id sequence; a special id (pad, bos, eos) decodes to nothing."""
        return [self.processor.decode([int(i) for i in row]) for row in ids]


def check_options(vocab_size: int, model_type: str, byte_fallback: bool,
                  special_ids: dict[str, int]) -> None:
    """Raise a one-line ``ValueError`` for options :func:`train_tokenizer` cannot train with
    (checked before reading any text)."""
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    unknown = set(special_ids) - set(SPECIAL_IDS)
    if unknown:
        raise ValueError(f"unknown special ids {sorted(unknown)}; valid: {sorted(SPECIAL_IDS)}")
    if byte_fallback and vocab_size < 256 + 4 + 8:
        raise ValueError(f"vocab_size={vocab_size} is too small for byte fallback (256 byte "
                         f"pieces + special pieces); use at least 512")


def train_tokenizer(documents: Iterable[str], output: str | os.PathLike | None = None, *,
                    vocab_size: int = 8192, model_type: str = "bpe",
                    byte_fallback: bool = True, character_coverage: float = 0.9995,
                    max_sentences: int = 2_000_000, seed_sentences: int = 1_000_000,
                    num_threads: int | None = None, **special_ids: int) -> Tokenizer:
    """Train a sentencepiece model on ``documents``; write it to ``output`` if given.

    Sentencepiece trains on lines: each document is split into its lines, and at most
    ``max_sentences`` of them (a uniform sample when there are more) are used.
    ``special_ids`` overrides ``unk_id``, ``bos_id``, ``eos_id``, ``pad_id`` (-1 disables one).
    """
    check_options(vocab_size, model_type, byte_fallback, special_ids)
    ids = {**SPECIAL_IDS, **special_ids}

    def sentences() -> Iterator[str]:
        for doc in documents:
            for line in doc.split("\n"):
                if line.strip():
                    yield line

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=byte_fallback,
            character_coverage=character_coverage, normalization_rule_name="identity",
            add_dummy_prefix=False, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            seed_sentencepiece_size=seed_sentences, hard_vocab_limit=False,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=2, **ids)
    except RuntimeError as e:
        raise DataError(f"sentencepiece training failed: {str(e).strip()}") from None
    tokenizer = Tokenizer(model.getvalue())
    if output is not None:
        output = pathlib.Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_bytes(model.getvalue())
        os.replace(tmp, output)  # never a half-written model file under the final name
        tokenizer.path = str(output.resolve())
    return tokenizer


@cli.command
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmjax.data.tokenizer``: exit status 0, 1 for bad input (one line), 2 for
    bad flags (a vocabulary too small for byte fallback included)."""
    parser = cli.ArgumentParser(
        prog="python -m mmjax.data.tokenizer",
        description="Train a sentencepiece tokenizer on text/JSONL files.")
    parser.add_argument("--input", required=True,
                        help="glob pattern(s), comma-separated, e.g. 'DIR/*.txt'")
    parser.add_argument("--output", required=True, help="path of the .model file to write")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--model_type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--no_byte_fallback", action="store_true")
    parser.add_argument("--character_coverage", type=float, default=0.9995)
    parser.add_argument("--max_sentences", type=int, default=2_000_000,
                        help="lines sampled for training")
    parser.add_argument("--text_key", default="text", help="JSONL field holding the text")
    for name, value in SPECIAL_IDS.items():
        parser.add_argument(f"--{name}", type=int, default=value)
    args = parser.parse_args(argv)
    special_ids = {k: getattr(args, k) for k in SPECIAL_IDS}
    try:
        check_options(args.vocab_size, args.model_type, not args.no_byte_fallback, special_ids)
    except ValueError as e:
        parser.error(str(e))
    files = text_lib.expand_inputs(args.input, exclude=[args.output])
    for f in files:  # fail on a bad file before the (long) training starts
        text_lib.check_not_empty(f)
    tok = train_tokenizer(
        text_lib.iter_documents(files, text_key=args.text_key), args.output,
        vocab_size=args.vocab_size, model_type=args.model_type,
        byte_fallback=not args.no_byte_fallback,
        character_coverage=args.character_coverage, max_sentences=args.max_sentences,
        **special_ids)
    print(f"wrote {args.output}: {tok.vocab_size} pieces from {len(files)} file(s); "
          f"eos_id={tok.eos_id} pad_id={tok.pad_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
