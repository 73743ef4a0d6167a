"""In-context language learning (the v1 paper's figure 9): a 2-layer Memory Mosaic and a
2-layer GPT2 of about the same size, trained on N random-automaton languages.

The data is :mod:`mmjax.data.icll` (vocabulary 20: 18 letters, separator, padding; the
separator and padding targets are not trained on). ``python -m mmjax.eval icll`` trains both
models for several N and prints accuracy and total variation distance on held-out languages;
this file is one of its runs (:func:`mmjax.config.icll_config`)::

    python -m mmjax.train --config configs/icll.py:mm,languages=1000 --workdir /tmp/icll_mm
    python -m mmjax.train --config configs/icll.py:gpt2,languages=1000

Presets: ``mm`` (default) or ``gpt2``; ``languages=N`` (default 1000), ``steps=S`` (default
600), ``seed=K`` (default 0), ``width=W`` (64), ``context=C`` (512), ``eval_languages=M``
(held-out languages, 256). Both models: 2 layers, width 64, 4 heads, context 512, batch
16, AdamW 3e-3 with 50 warm-up steps and a cosine decay. GPT2 has a 4 x width MLP and 512
learned positions; the Memory Mosaic 352 persistent slots per head (3.5 x width, the GPT2
MLP's budget, plus 128 for the parameters of the position table): 132,728 parameters against
GPT2's 132,672.

Expected (mmjax.flops, last line)::

  params=132728 flops_per_token=264704
  :gpt2  params=132672 flops_per_token=199168
"""

from mmjax.config import PAIR_MODELS, icll_config, one_of, parse_presets

PRESETS = PAIR_MODELS
VALUES = ("languages", "steps", "seed", "width", "context", "eval_languages")


def get_config(arg: str | None = None):
    presets = parse_presets(arg, PRESETS, VALUES)
    return icll_config(one_of(presets, PAIR_MODELS, "mm"),
                       **{key: value for key, value in presets.items() if key in VALUES})
