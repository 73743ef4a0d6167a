"""LLaMA-style transformer, small: 24 layers, width 2048, 16 heads (the paper's small scale).

As ``llama_large.py`` (full multi-head attention, RoPE, RMSNorm, SwiGLU, vocabulary 128256,
untied embeddings, context 4096, ``:finetune`` at 32768) at the small scale of "Memory Mosaics
at Scale" (24 layers, width 2048, 16 heads). CHOICE: SwiGLU width 7168 = 3.5 x 2048 (the large
model's ratio).

Commands:
  python -m mmjax.flops --config configs/llama_small.py
  python -m mmjax.train --config configs/llama_small.py --workdir DIR
  python -m mmjax.train --config configs/llama_small.py:tiny --workdir /tmp/llama_tiny  # CPU
Expected (mmjax.flops, last line):
  params=1985054720 flops_per_token=3444572160
Presets (comma-separated): ``tiny`` (CPU smoke run), ``short_long`` (separate short- and
long-term attention ablation), ``finetune`` (context 32768).
"""

from mmjax.train.config_lib import paper_scale_config, parse_presets

PRESETS = ("tiny", "short_long", "finetune")


def get_config(arg=None):
    presets = parse_presets(arg, PRESETS)
    config = paper_scale_config(dict(name="llama", rope_theta=500000.0), "small", presets)
    if "short_long" in presets:  # the paper's ablation: separate short- and long-term attention
        config.model.update(name="llama_short_long", short_term_window=256,
                            long_term_skip_range=(64, 256), inference_long_term_skip=64)
        if "tiny" in presets:
            config.model.update(short_term_window=16, long_term_skip_range=(4, 16),
                                inference_long_term_skip=4)
    return config
