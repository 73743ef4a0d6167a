"""GPT2-small baseline (the official Library's ``GPT``, trained by ``train_baselines.py``).

12 layers, width 768, 12 heads, learned positions, tanh-GELU MLP 4 x 768, tied embeddings,
no biases, vocabulary 50304 (GPT-2 tokenizer), context 512, dropout 0.05, AdamW lr 5e-3,
betas (0.9, 0.95), weight decay 0.1, gradient clip 1, warm-up 2000 then cosine to 1e-4 at
80k steps, batch 512 (``docs/official_code.md``). Attention-probability dropout is
applied to the head outputs instead (see :mod:`mmjax.layers.attention`).

Data: a token store from ``python -m mmjax.data.prepare`` (``--config.data.path=DIR``), as
``mm_v1_small.py`` (BabiStories in the v1 paper, GPT-2 tokenizer padded to 50304).

Commands:
  python -m mmjax.flops --config configs/gpt2_small.py
  python -m mmjax.train --config configs/gpt2_small.py --config.data.path=STORE --workdir DIR
  python -m mmjax.train --config configs/gpt2_small.py:tiny --workdir /tmp/gpt2_tiny  # CPU
  python -m mmjax.train --config configs/gpt2_small.py:tiny_text --config.data.path=STORE
Expected (mmjax.flops, last line):
  params=123980544 flops_per_token=247136256
Presets: ``tiny`` (CPU smoke run on the synthetic corpus), ``tiny_text`` (a tiny GPT2 on a
token store, vocabulary 4096, context 128: about a minute on CPU).
"""

from mmjax.config import lm_config, make_tiny, make_tiny_text, parse_presets

PRESETS = ("tiny", "tiny_text")
VALUES = ()


def get_config(arg=None):
    presets = parse_presets(arg, PRESETS, VALUES)
    config = lm_config(
        dict(name="gpt2", vocab_size=50304, context_length=512, num_layers=12, num_heads=12,
             embed_dim=768, mlp_dim=3072, dropout_rate=0.05, use_bias=False, dtype="bfloat16",
             impl="auto", scan_layers=False, remat="none"),
        # the official Library baseline's training settings (same as the v1 Memory Mosaic)
        optimizer=dict(learning_rate=5e-3, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8,
                       grad_clip=1.0, warmup_steps=2000, total_steps=80_000, min_lr=1e-4),
        data=dict(context_length=512, batch_size=512, corpus="tokens", path="",
                  allow_vocab_padding=True),
        train=dict(num_steps=80_000, log_every=100, seed=1337),
    )
    if "tiny" in presets:
        make_tiny(config, context_length=64, mlp_dim=256)
    if "tiny_text" in presets:
        make_tiny_text(config, context_length=128, mlp_dim=256, dropout_rate=0.0)
    return config
