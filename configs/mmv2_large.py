"""Memory Mosaics v2, large: the paper's "MM v2 large" (LLaMA-3-8B-like, ~9.9B parameters).

"Memory Mosaics at Scale" (arXiv 2507.03285): 32 layers, width 4096, 32 heads per memory,
SwiGLU persistent memory 14336, vocabulary 128256, untied embeddings, short-term window 256,
long-term skip m ~ U[64, 256] per training step (64 at inference), trained at context 4096 and
fine-tuned (``:finetune``) at 32768. Choices the paper leaves open (optimizer numbers, batch
size, corpus name) are marked CHOICE below.

Commands:
  python -m mmjax.flops --config configs/mmv2_large.py
  python -m mmjax.flops --config configs/mmv2_large.py:no_long_term
  python -m mmjax.train --config configs/mmv2_large.py --workdir DIR   # TPU pod
  python -m mmjax.train --config configs/mmv2_large.py:tiny --workdir /tmp/mmv2_tiny  # CPU
Expected (mmjax.flops, last line):
  params=9926096896 flops_per_token=18800967680                (paper: 9.9B / 18.9B)
  :no_long_term  params=8307090432 flops_per_token=15562964992 (paper: 8.3B / 15.6B)
Presets (comma-separated): ``tiny``, ``tiny_text``, ``no_long_term``, ``finetune``. Presets,
data (a token store of your own text: the paper's corpus is not public) and fine-tuning are
those of every paper-scale config: see ``mmjax.train.config_lib.paper_scale_config``.
Token budget: 1T tokens (the paper's large scale): 238,419 steps of 1024 x 4096 tokens.
Fine-tuning (the paper's 4k -> 32k context extension)::

  python -m mmjax.train --config configs/mmv2_large.py:finetune --config.data.path=STORE \
      --config.train.init_from=PRETRAIN_WORKDIR --workdir FINETUNE_WORKDIR
"""

from mmjax.train.config_lib import paper_scale_config, parse_presets

PRESETS = ("tiny", "tiny_text", "no_long_term", "finetune")


def get_config(arg=None):
    presets = parse_presets(arg, PRESETS)
    config = paper_scale_config(dict(
        name="memory_mosaic_v2",
        short_term_window=256,
        long_term="no_long_term" not in presets,
        long_term_skip_range=(64, 256),
        inference_long_term_skip=64,
    ), "large", presets)
    if "tiny" in presets or "tiny_text" in presets:
        config.model.update(short_term_window=16, long_term_skip_range=(4, 16),
                            inference_long_term_skip=4)
    return config
