"""LLaMA-style transformer, large: the paper's "Transformer large" baseline (~8.8B parameters).

"Memory Mosaics at Scale" (arXiv 2507.03285): LLaMA-3-8B-like with full multi-head attention
(32 key/value heads, not grouped), 32 layers, width 4096, 32 heads, SwiGLU 14336, vocabulary
128256, untied embeddings, RoPE (base 500000), RMSNorm; context 4096, fine-tuned
(``:finetune``) at 32768. Optimizer, batch and corpus choices as in ``mmv2_large.py``.

Commands:
  python -m mmjax.flops --config configs/llama_large.py
  python -m mmjax.flops --config configs/llama_large.py:short_long
  python -m mmjax.train --config configs/llama_large.py --workdir DIR   # TPU pod
  python -m mmjax.train --config configs/llama_large.py:tiny --workdir /tmp/llama_tiny  # CPU
Expected (mmjax.flops, last line):
  params=8835567616 flops_per_token=16619929600   (paper: 8.8B / 16.7B)
  :short_long  params=10983051264 flops_per_token=20914896896
Presets (comma-separated): ``tiny`` (CPU smoke run), ``short_long`` (the paper's ablation
"transformer with separate short- and long-term attention": window 256, skip m ~ U[64, 256]
per training step, 64 at inference), ``finetune`` (context 32768).
"""

from mmjax.train.config_lib import paper_scale_config, parse_presets

PRESETS = ("tiny", "short_long", "finetune")


def get_config(arg=None):
    presets = parse_presets(arg, PRESETS)
    config = paper_scale_config(dict(name="llama", rope_theta=500000.0), "large", presets)
    if "short_long" in presets:  # the paper's ablation: separate short- and long-term attention
        config.model.update(name="llama_short_long", short_term_window=256,
                            long_term_skip_range=(64, 256), inference_long_term_skip=64)
        if "tiny" in presets:
            config.model.update(short_term_window=16, long_term_skip_range=(4, 16),
                                inference_long_term_skip=4)
    return config
