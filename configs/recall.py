"""Associative recall: a 2-layer Memory Mosaic and a 2-layer GPT2 of about the same size,
trained on rows of key-value facts, queries of earlier facts and random filler.

The data is the ``recall`` corpus of :mod:`mmjax.data.recall` (vocabulary 64: 61 plain ids
and the KEY, VAL and QUERY markers; keys and values of 2 ids). ``python -m mmjax.eval
retrieval`` then asks the trained models for a fact hidden in filler at growing context
lengths, the training length and past it (the README's "What Memory Mosaics learn in
context")::

    python -m mmjax.train --config configs/recall.py:mm --workdir /tmp/recall_mm
    python -m mmjax.train --config configs/recall.py:gpt2 --workdir /tmp/recall_gpt2
    python -m mmjax.eval retrieval --workdir /tmp/recall_mm --contexts 128,256,512,1024

Presets: ``mm`` (default) or ``gpt2``, or the v2 models of the same size: ``v2`` (MM v2),
``llama``, ``llama_short_long`` (short- and long-term attention); ``steps=S`` (default 1000),
``seed=K`` (default 0). The v2 models evaluate past their training length, up to 1M tokens,
with a paged long-term memory (``python -m mmjax.eval retrieval --memory paged``).
Both models: 2 layers, width 64, 4 heads, context 256, batch 16, AdamW 3e-3 with 50
warm-up steps and a cosine decay (:func:`mmjax.config.pair_config`). GPT2 has a 4 x width
MLP and 256 learned positions, so it cannot read past 256 tokens; the Memory Mosaic has no
position parameters and 288 persistent slots per head (119,160 parameters against GPT2's
119,104).

Expected (mmjax.flops, last line)::

  params=119160 flops_per_token=237568
  :gpt2  params=119104 flops_per_token=204800
  :v2  params=127376 flops_per_token=245760
  :llama  params=127296 flops_per_token=245760
  :llama_short_long  params=127808 flops_per_token=246784
"""

from mmjax.config import PAIR_MODELS, V2_PAIR_MODELS, one_of, pair_config, parse_presets

PRESETS = PAIR_MODELS + V2_PAIR_MODELS
VALUES = ("steps", "seed")
VOCAB_SIZE = 64
CONTEXT = 256


def get_config(arg: str | None = None):
    presets = parse_presets(arg, PRESETS, VALUES)
    return pair_config(one_of(presets, PRESETS, "mm"), corpus="recall",
                       corpus_options={},
                       vocab_size=VOCAB_SIZE, context=CONTEXT,
                       steps=presets.get("steps", 1000), seed=presets.get("seed", 0))
