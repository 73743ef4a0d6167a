"""In-context classification (the v2 paper's in-context learning with semantic and
anonymised labels): one of the five equal-size models of the study, pretrained at context
512 on few-shot episodes of generated classes.

The data is :mod:`mmjax.data.episodes` (vocabulary 128: 94 feature ids, 32 label tokens,
the ``LABEL`` and ``SEP`` markers; 24 training classes, 8 held out). ``python -m mmjax.eval
icl_anonymized`` trains all five side by side for several seeds and measures accuracy on the
held-out classes at 1 to 64 shots; this file is one of its runs
(:func:`mmjax.config.episodes_config`)::

    python -m mmjax.train --config configs/episodes.py:v2 --workdir /tmp/episodes_v2

Presets: ``v2`` (default, MM v2), ``llama``, ``llama_short_long``, ``v2_no_long_term``,
``v1``; ``steps=S`` (default 800), ``seed=K`` (default 0). The models are those of
``configs/multidoc.py``.

Expected (mmjax.flops, last line)::

  params=135568 flops_per_token=253952
  :llama  params=135488 flops_per_token=253952
  :llama_short_long  params=136000 flops_per_token=254976
  :v2_no_long_term  params=135656 flops_per_token=254208
  :v1  params=135544 flops_per_token=270336
"""

from mmjax.config import STUDY_MODELS, episodes_config, one_of, parse_presets

PRESETS = STUDY_MODELS
VALUES = ("steps", "seed")


def get_config(arg: str | None = None):
    presets = parse_presets(arg, PRESETS, VALUES)
    return episodes_config(one_of(presets, PRESETS, "v2"),
                           **{key: value for key, value in presets.items() if key in VALUES})
