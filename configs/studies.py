"""The v2 paper's claims as studies: one of the five equal-size models, trained at context
512 on a study's generated corpus.

``python -m mmjax.eval multidoc`` (and ``icl_anonymized``, ``finetune_speed``) trains the
models side by side for several seeds and measures them; this file is one of those runs:

* ``multidoc`` (default): :mod:`mmjax.data.multidoc`, documents ``DOC entity relation value
  ...`` about entities that recur across documents, and questions about earlier documents
  followed by their answers (:func:`mmjax.config.study_config`);
* ``episodes``: :mod:`mmjax.data.episodes`, few-shot episodes of 24 generated classes with
  semantic and anonymised labels (8 more classes held out).

::

    python -m mmjax.train --config configs/studies.py:multidoc,v2 --workdir /tmp/multidoc_v2
    python -m mmjax.train --config configs/studies.py:episodes,llama,seed=1

Presets: the corpus, ``multidoc`` or ``episodes``; the model, ``v2`` (default, MM v2),
``llama``, ``llama_short_long``, ``v2_no_long_term`` (MM v2 without its long-term tier) or
``v1`` (MM v1); ``steps=S`` (default 600), ``seed=K`` (default 0). All: vocabulary 128, 2
layers, width 64, 4 heads, batch 16, AdamW 3e-3 with 50 warm-up steps and a cosine decay;
sizes equal within 0.4% (:func:`mmjax.config.pair_config`).

Expected (mmjax.flops, last line)::

  params=135568 flops_per_token=253952
  :llama  params=135488 flops_per_token=253952
  :llama_short_long  params=136000 flops_per_token=254976
  :v2_no_long_term  params=135656 flops_per_token=254208
  :v1  params=135544 flops_per_token=270336
  :episodes,llama  params=135488 flops_per_token=253952
"""

from mmjax.config import STUDY_CORPORA, STUDY_MODELS, one_of, parse_presets, study_config

PRESETS = STUDY_CORPORA + STUDY_MODELS
VALUES = ("steps", "seed")


def get_config(arg: str | None = None):
    presets = parse_presets(arg, PRESETS, VALUES)
    return study_config(one_of(presets, STUDY_MODELS, "v2"),
                        corpus=one_of(presets, STUDY_CORPORA, "multidoc"),
                        **{key: value for key, value in presets.items() if key in VALUES})
