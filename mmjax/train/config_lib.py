"""Pieces shared by the config files in ``configs/``: preset parsing, the paper scales, and the
training settings and presets common to every language-model config.

Config files stay standalone Python files (``get_config(arg)``); what several of them share
lives here, once.
"""

from __future__ import annotations

from collections.abc import Iterable

import ml_collections

# Model sizes of "Memory Mosaics at Scale" (arXiv 2507.03285). Small: the paper gives layers,
# width and heads; CHOICE: SwiGLU width 3.5 x width, the large model's ratio (14336 / 4096).
PAPER_SCALES = {
    "large": dict(num_layers=32, num_heads=32, embed_dim=4096, mlp_dim=14336),
    "small": dict(num_layers=24, num_heads=16, embed_dim=2048, mlp_dim=7168),
}
PAPER_VOCAB = 128256

# Sizes of the ``:tiny`` preset of every LM config: trains on CPU in seconds.
TINY_MODEL = dict(vocab_size=256, num_layers=2, num_heads=4, embed_dim=64, dtype="float32")


def parse_presets(arg: str | None, known: Iterable[str]) -> set[str]:
    """``"tiny,finetune"`` -> ``{"tiny", "finetune"}``; unknown names raise, listing the known."""
    known = tuple(known)
    presets = {p for p in (arg or "").split(",") if p}
    unknown = sorted(presets - set(known))
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; known: {list(known)}")
    return presets


def lm_config(model: dict, *, optimizer: dict, data: dict, train: dict
              ) -> ml_collections.ConfigDict:
    """A config with the four sections every LM config has."""
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(model)
    config.optimizer = ml_collections.ConfigDict(optimizer)
    config.data = ml_collections.ConfigDict(data)
    config.train = ml_collections.ConfigDict(train)
    return config


def paper_scale_config(model: dict, scale: str, presets: set[str]) -> ml_collections.ConfigDict:
    """A "Memory Mosaics at Scale" run: paper sizes, vocabulary 128256, untied embeddings,
    context 4096, with the ``finetune`` (context 32768) and ``tiny`` presets applied.

    CHOICE (the paper does not give them): LLaMA-3-like AdamW settings, 1T tokens = 238,419
    steps of 1024 x 4096 tokens, a pre-tokenised corpus named ``tokens``; fine-tuning keeps
    the tokens per step and runs a short cosine at a lower rate.
    """
    if scale not in PAPER_SCALES:
        raise ValueError(f"scale must be one of {sorted(PAPER_SCALES)}, got {scale!r}")
    model = dict(vocab_size=PAPER_VOCAB, **PAPER_SCALES[scale], tie_embeddings=False,
                 dropout_rate=0.0, dtype="bfloat16", impl="auto") | model
    config = lm_config(
        model,
        optimizer=dict(learning_rate=3e-4, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8,
                       grad_clip=1.0, warmup_steps=2000, total_steps=238_419, min_lr=3e-5),
        data=dict(vocab_size=PAPER_VOCAB, context_length=4096, batch_size=1024,
                  corpus="tokens"),
        train=dict(num_steps=238_419, log_every=100, seed=0),
    )
    if "finetune" in presets:
        config.data.update(context_length=32768, batch_size=128)
        config.optimizer.update(learning_rate=3e-5, warmup_steps=100, total_steps=2000,
                                min_lr=3e-6)
        config.train.num_steps = 2000
    if "tiny" in presets:
        make_tiny(config, mlp_dim=224)
    return config


def make_tiny(config: ml_collections.ConfigDict, **model_overrides) -> None:
    """Shrink an LM config in place to the CPU-sized ``:tiny`` run on the PFA corpus."""
    config.model.update(TINY_MODEL | model_overrides)
    config.data.update(vocab_size=TINY_MODEL["vocab_size"], context_length=64, batch_size=8,
                       corpus="pfa")
    config.optimizer.update(learning_rate=3e-3, warmup_steps=10, total_steps=50, min_lr=3e-4)
    config.train.update(num_steps=50, log_every=10)
