"""LLaMA-style transformer at the two scales of "Memory Mosaics at Scale" (arXiv 2507.03285):
the paper's Transformer baselines.

``:large`` is the paper's "Transformer large" (~8.8B parameters): LLaMA-3-8B-like with full
multi-head attention (32 key/value heads, not grouped), 32 layers, width 4096, 32 heads,
SwiGLU 14336. ``:small`` (the default): 24 layers, width 2048, 16 heads; CHOICE: SwiGLU width
7168 = 3.5 x 2048 (the large model's ratio). Both: vocabulary 128256, untied embeddings, RoPE
(base 500000), RMSNorm; context 4096, fine-tuned (``:finetune``) at 32768. Optimizer, batch
and corpus choices as in ``mmv2.py`` (``mmjax.config.paper_scale_config``).

Commands:
  python -m mmjax.flops --config configs/llama.py:large
  python -m mmjax.flops --config configs/llama.py:large,short_long
  python -m mmjax.train --config configs/llama.py:large --workdir DIR   # TPU pod
  python -m mmjax.train --config configs/llama.py:tiny --workdir /tmp/llama_tiny  # CPU
Expected (mmjax.flops, last line):
  :small  params=1985054720 flops_per_token=3444572160
  :large  params=8835567616 flops_per_token=16619929600   (paper: 8.8B / 16.7B)
  :large,short_long  params=10983051264 flops_per_token=20914896896
Presets (comma-separated): ``small`` or ``large`` (the scale; default small), ``tiny`` (CPU
smoke run), ``tiny_text`` (the tiny model on a token store, vocabulary 4096), ``short_long``
(the paper's ablation "transformer with separate short- and long-term attention": window 256,
skip m ~ U[64, 256] per training step, 64 at inference), ``finetune`` (context 32768).
"""

from mmjax.config import PAPER_SCALES, paper_scale, paper_scale_config, parse_presets

PRESETS = (*PAPER_SCALES, "tiny", "tiny_text", "short_long", "finetune")
VALUES = ()


def get_config(arg=None):
    presets = parse_presets(arg, PRESETS, VALUES)
    config = paper_scale_config(dict(name="llama", rope_theta=500000.0), paper_scale(presets),
                                presets)
    if "short_long" in presets:  # the paper's ablation: separate short- and long-term attention
        config.model.update(name="llama_short_long", short_term_window=256,
                            long_term_skip_range=(64, 256), inference_long_term_skip=64)
        if "tiny" in presets or "tiny_text" in presets:
            config.model.update(short_term_window=16, long_term_skip_range=(4, 16),
                                inference_long_term_skip=4)
    return config
