"""Multi-document question answering (the v2 paper's new-knowledge storage): one of the five
equal-size models of the study, trained at context 512 on generated documents of facts.

The data is :mod:`mmjax.data.multidoc` (vocabulary 128: documents ``DOC entity relation
value ...`` about entities that recur across documents, and questions about earlier
documents followed by their answers). ``python -m mmjax.eval multidoc`` trains all five
side by side for several seeds and measures exact match at 512 to 4096 tokens; this file is
one of its runs (:func:`mmjax.config.multidoc_config`)::

    python -m mmjax.train --config configs/multidoc.py:v2 --workdir /tmp/multidoc_v2
    python -m mmjax.train --config configs/multidoc.py:llama,seed=1

Presets: ``v2`` (default, MM v2), ``llama``, ``llama_short_long``, ``v2_no_long_term``
(MM v2 without its long-term tier), ``v1`` (MM v1); ``steps=S`` (default 800), ``seed=K``
(default 0). All: 2 layers, width 64, 4 heads, batch 16, AdamW 3e-3 with 50 warm-up steps
and a cosine decay; sizes equal within 0.4% (:func:`mmjax.config.pair_config`).

Expected (mmjax.flops, last line)::

  params=135568 flops_per_token=253952
  :llama  params=135488 flops_per_token=253952
  :llama_short_long  params=136000 flops_per_token=254976
  :v2_no_long_term  params=135656 flops_per_token=254208
  :v1  params=135544 flops_per_token=270336
"""

from mmjax.config import STUDY_MODELS, multidoc_config, one_of, parse_presets

PRESETS = STUDY_MODELS
VALUES = ("steps", "seed")


def get_config(arg: str | None = None):
    presets = parse_presets(arg, PRESETS, VALUES)
    return multidoc_config(one_of(presets, PRESETS, "v2"),
                           **{key: value for key, value in presets.items() if key in VALUES})
