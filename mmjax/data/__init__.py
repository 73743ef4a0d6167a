"""Data: synthetic corpora, sentencepiece tokenizers, token stores and the grain loader."""

from mmjax.data.pipeline import make_batches
from mmjax.data.store import TokenStore, check_vocab_size
from mmjax.data.synthetic import PFACorpus, make_corpus
from mmjax.data.text import DataError

__all__ = ["DataError", "PFACorpus", "TokenStore", "Tokenizer", "check_vocab_size",
           "make_batches", "make_corpus"]


def __getattr__(name):
    # Imported on first use, so that `python -m mmjax.data.tokenizer` runs its module once.
    if name == "Tokenizer":
        from mmjax.data.tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
