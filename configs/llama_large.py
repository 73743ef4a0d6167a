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

import ml_collections

PRESETS = ("tiny", "short_long", "finetune")


def get_config(arg=None):
    presets = [p for p in (arg or "").split(",") if p]
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; known: {list(PRESETS)}")
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict({
        "name": "llama",
        "vocab_size": 128256,
        "num_layers": 32,
        "num_heads": 32,
        "embed_dim": 4096,
        "mlp_dim": 14336,
        "rope_theta": 500000.0,
        "tie_embeddings": False,
        "dropout_rate": 0.0,
        "dtype": "bfloat16",
        "impl": "auto",
    })
    # CHOICE: LLaMA-3-like AdamW settings; 1T tokens = 238,419 steps of 1024 x 4096 tokens.
    config.optimizer = ml_collections.ConfigDict({
        "learning_rate": 3e-4,
        "weight_decay": 0.1,
        "b1": 0.9,
        "b2": 0.95,
        "eps": 1e-8,
        "grad_clip": 1.0,
        "warmup_steps": 2000,
        "total_steps": 238_419,
        "min_lr": 3e-5,
    })
    config.data = ml_collections.ConfigDict({
        "vocab_size": 128256,
        "context_length": 4096,
        "batch_size": 1024,
        "corpus": "tokens",  # CHOICE: a pre-tokenised corpus directory, set on the command line
    })
    config.train = ml_collections.ConfigDict({
        "num_steps": 238_419,
        "log_every": 100,
        "seed": 0,
    })
    if "short_long" in presets:
        config.model.update(name="llama_short_long", short_term_window=256,
                            long_term_skip_range=(64, 256), inference_long_term_skip=64)
    if "finetune" in presets:  # CHOICE: same tokens per step, short cosine at a lower rate
        config.data.context_length = 32768
        config.data.batch_size = 128
        config.optimizer.update(learning_rate=3e-5, warmup_steps=100, total_steps=2000,
                                min_lr=3e-6)
        config.train.num_steps = 2000
    if "tiny" in presets:
        config.model.update(vocab_size=256, num_layers=2, num_heads=4, embed_dim=64, mlp_dim=224,
                            dtype="float32")
        if "short_long" in presets:
            config.model.update(short_term_window=16, long_term_skip_range=(4, 16),
                                inference_long_term_skip=4)
        config.data.update(vocab_size=256, context_length=64, batch_size=8, corpus="pfa")
        config.optimizer.update(learning_rate=3e-3, warmup_steps=10, total_steps=50,
                                min_lr=3e-4)
        config.train.update(num_steps=50, log_every=10)
    return config
