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
        "num_layers": 24,
        "num_heads": 16,
        "embed_dim": 2048,
        "mlp_dim": 7168,
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
