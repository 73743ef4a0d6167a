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
Presets (comma-separated): ``tiny`` (CPU smoke run), ``no_long_term`` (the variant without
long-term memory), ``finetune`` (context 32768).
"""

import ml_collections

PRESETS = ("tiny", "no_long_term", "finetune")


def get_config(arg=None):
    presets = [p for p in (arg or "").split(",") if p]
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; known: {list(PRESETS)}")
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict({
        "name": "memory_mosaic_v2",
        "vocab_size": 128256,
        "num_layers": 32,
        "num_heads": 32,
        "embed_dim": 4096,
        "mlp_dim": 14336,
        "short_term_window": 256,
        "long_term": True,
        "long_term_skip_range": (64, 256),
        "inference_long_term_skip": 64,
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
    if "no_long_term" in presets:
        config.model.long_term = False
    if "finetune" in presets:  # CHOICE: same tokens per step, short cosine at a lower rate
        config.data.context_length = 32768
        config.data.batch_size = 128
        config.optimizer.update(learning_rate=3e-5, warmup_steps=100, total_steps=2000,
                                min_lr=3e-6)
        config.train.num_steps = 2000
    if "tiny" in presets:
        config.model.update(vocab_size=256, num_layers=2, num_heads=4, embed_dim=64, mlp_dim=224,
                            short_term_window=16, long_term_skip_range=(4, 16),
                            inference_long_term_skip=4, dtype="float32")
        config.data.update(vocab_size=256, context_length=64, batch_size=8, corpus="pfa")
        config.optimizer.update(learning_rate=3e-3, warmup_steps=10, total_steps=50,
                                min_lr=3e-4)
        config.train.update(num_steps=50, log_every=10)
    return config
