"""Memory Mosaics v2 at the two scales of "Memory Mosaics at Scale" (arXiv 2507.03285).

``:large`` is the paper's "MM v2 large" (LLaMA-3-8B-like, ~9.9B parameters): 32 layers, width
4096, 32 heads per memory, SwiGLU persistent memory 14336. ``:small`` (the default) is the
paper's small scale: 24 layers, width 2048, 16 heads; CHOICE: SwiGLU width 7168 = 3.5 x 2048,
the large model's ratio (14336 / 4096). Both: vocabulary 128256, untied embeddings,
short-term window 256, long-term skip m ~ U[64, 256] per training step (64 at inference),
trained at context 4096 and fine-tuned (``:finetune``) at 32768. Choices the paper leaves open
(optimizer numbers, batch size, corpus name) are marked CHOICE in
``mmjax.config.paper_scale_config``.

Commands:
  python -m mmjax.flops --config configs/mmv2.py:large
  python -m mmjax.flops --config configs/mmv2.py:large,no_long_term
  python -m mmjax.train --config configs/mmv2.py:large --workdir DIR   # TPU pod
  python -m mmjax.train --config configs/mmv2.py:tiny --workdir /tmp/mmv2_tiny  # CPU
Expected (mmjax.flops, last line):
  :small  params=2189530880 flops_per_token=3853516800
  :large  params=9926096896 flops_per_token=18800967680                (paper: 9.9B / 18.9B)
  :large,no_long_term  params=8307090432 flops_per_token=15562964992 (paper: 8.3B / 15.6B)
Presets (comma-separated): ``small`` or ``large`` (the scale; default small), ``tiny``,
``tiny_text``, ``no_long_term``, ``finetune``. Presets, data (a token store of your own text:
the paper's corpus is not public) and fine-tuning are those of every paper-scale config: see
``mmjax.config.paper_scale_config``. Token budget: 200B tokens at the small scale (47,684
steps of 1024 x 4096 tokens), 1T at the large (238,419 steps).
Paged long-term memory (``mmjax.ops.retrieve_paged``; ``docs/architecture.md``, section 10):
``--config.model.long_term_memory=paged`` with ``long_term_page`` and ``long_term_top_pages``.
Fine-tuning (the paper's 4k -> 32k context extension)::

  python -m mmjax.train --config configs/mmv2.py:large,finetune --config.data.path=STORE \
      --config.train.init_from=PRETRAIN_WORKDIR --workdir FINETUNE_WORKDIR
"""

from mmjax.config import PAPER_SCALES, paper_scale, paper_scale_config, parse_presets

PRESETS = (*PAPER_SCALES, "tiny", "tiny_text", "no_long_term", "finetune")
VALUES = ()


def get_config(arg=None):
    presets = parse_presets(arg, PRESETS, VALUES)
    config = paper_scale_config(dict(
        name="memory_mosaic_v2",
        short_term_window=256,
        long_term="no_long_term" not in presets,
        long_term_skip_range=(64, 256),
        inference_long_term_skip=64,
        # "paged": the long-term tier retrieves from each query's 16 best pages of 64 pairs
        long_term_memory="exact",
        long_term_page=64,
        long_term_top_pages=16,
        # the decoding caches' pages: "bfloat16" halves fp32, "int8" quarters it
        long_term_page_dtype="auto",
    ), paper_scale(presets), presets)
    if "tiny" in presets or "tiny_text" in presets:
        config.model.update(short_term_window=16, long_term_skip_range=(4, 16),
                            inference_long_term_skip=4)
    return config
