"""Data: synthetic corpora, sentencepiece tokenizers, token stores and the grain loader."""

from mmjax.data.pipeline import make_batches
from mmjax.data.store import TokenStore
from mmjax.data.synthetic import PFACorpus, make_corpus
from mmjax.data.text import DataError
from mmjax.data.tokenizer import Tokenizer, check_vocab_size

__all__ = ["DataError", "PFACorpus", "TokenStore", "Tokenizer", "check_vocab_size",
           "make_batches", "make_corpus"]
