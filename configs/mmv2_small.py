"""Memory Mosaics v2, small: 24 layers, width 2048, 16 heads per memory.

"Memory Mosaics at Scale" (arXiv 2507.03285) gives the small scale as 24 layers, width 2048,
16 heads; everything else as ``mmv2_large.py`` (vocabulary 128256, untied embeddings,
short-term window 256, long-term skip m ~ U[64, 256] per training step, 64 at inference,
context 4096, fine-tuning ``:finetune`` at 32768). CHOICE: SwiGLU width 7168 = 3.5 x 2048,
the large model's ratio (14336 / 4096); optimizer numbers as in ``mmv2_large.py``.

Commands:
  python -m mmjax.flops --config configs/mmv2_small.py
  python -m mmjax.train --config configs/mmv2_small.py --workdir DIR
  python -m mmjax.train --config configs/mmv2_small.py:tiny --workdir /tmp/mmv2_tiny  # CPU
Expected (mmjax.flops, last line):
  params=2189530880 flops_per_token=3853516800
Presets (comma-separated): ``tiny``, ``tiny_text``, ``no_long_term``, ``finetune``. Presets,
data (a token store of your own text: the paper's corpus is not public) and fine-tuning are
those of every paper-scale config: see ``mmjax.train.config_lib.paper_scale_config``.
Token budget: 200B tokens (the paper's small scale; the large trains on 1T): 47,684 steps of
1024 x 4096 tokens.
Fine-tuning (the paper's 4k -> 32k context extension)::

  python -m mmjax.train --config configs/mmv2_small.py:finetune --config.data.path=STORE \
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
    ), "small", presets)
    if "tiny" in presets or "tiny_text" in presets:
        config.model.update(short_term_window=16, long_term_skip_range=(4, 16),
                            inference_long_term_skip=4)
    return config
