"""Data: synthetic corpora for demos and tests (grain + sentencepiece pipelines come later)."""

from mmjax.data.synthetic import PFACorpus, make_corpus

__all__ = ["PFACorpus", "make_corpus"]
