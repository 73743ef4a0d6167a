"""v1 Memory Mosaic, GPT2-small-like (official Library defaults and training hyper-parameters).

Model: 12 layers, width 768, 12 heads, persistent memory 2688 slots per head (one bank),
context 512, no biases, tied embedding, ``dropout_rate`` and ``pmem_attention_dropout`` 0.05
(the official ``StackAssoMem`` defaults ``hd_dropout`` and ``ic_dropout``). Optimiser and
schedule: the official ``Library/train_memory_mosaics.py`` defaults (AdamW lr 5e-3, weight
decay 0.1 on matrices, betas (0.9, 0.95), eps 1e-8, clip 1.0, linear warm-up 2000 steps,
cosine to 1e-4 at step 80k, global batch 512 sequences of 512 tokens).

Data: a token store from ``python -m mmjax.data.prepare`` (corpus ``"tokens"``), given by
``--config.data.path=DIR``; without it the run stops with a one-line error naming
``data.path``. The v1 paper trains on BabiStories (published by its authors; mmjax never
downloads it) with the GPT-2 tokenizer (50257 ids, padded to ``model.vocab_size=50304``:
``data.allow_vocab_padding``). With your own sentencepiece tokenizer, set
``--config.model.vocab_size`` to the size it reports.

Commands::

    python -m mmjax.flops --config configs/mm_v1_small.py
    python -m mmjax.train --config configs/mm_v1_small.py --config.data.path=STORE \
        --workdir /tmp/mm_v1_small
    python -m mmjax.train --config configs/mm_v1_small.py:tiny --workdir /tmp/mm_v1_tiny
    python -m mmjax.train --config configs/mm_v1_small.py:tiny_text \
        --config.data.path=STORE --workdir /tmp/mm_v1_tiny_text

Expected (mmjax.flops, last line)::

  params=123588336 flops_per_token=247136256
  :tiny  params=102776 flops_per_token=204800

The same forward FLOPs per token as ``gpt2_small.py`` (the persistent memory has the MLP's
parameter budget), 0.4M fewer parameters (no position embedding).

Presets (the text after ``:``):
  (none)     the full run on a token store (BabiStories in the paper; vocabulary 50304).
             Expected: the v1 paper's BabiStories curves (validation loss about 1.5 at 80k
             steps in the official README's comparison); not yet reproduced with mmjax.
  tiny       the embedded default of ``python -m mmjax.train`` (``mmjax.config.default_config``):
             2 layers, width 64, 4 heads, context 128, vocab 64, 300 steps of batch 16 on the
             synthetic random-automaton corpus, on CPU.
  tiny_text  the same tiny model on a token store (``--config.data.path``): vocabulary 4096
             (a tokenizer trained with ``--vocab_size 4096``, or override
             ``--config.model.vocab_size``), context 128, batch 16, 300 steps, about a minute
             on 2 CPU cores.
"""

from mmjax.config import default_config, lm_config, make_tiny_text, parse_presets

PRESETS = ("tiny", "tiny_text")
VALUES = ()


def get_config(arg: str | None = None):
    presets = parse_presets(arg, PRESETS, VALUES)
    if "tiny" in presets:  # the embedded default of `python -m mmjax.train`
        return default_config()
    config = lm_config(
        dict(name="memory_mosaic", vocab_size=50304, num_layers=12, num_heads=12, embed_dim=768,
             pmem_size=2688, pmem_count=1, use_bias=False, pmem_attention_dropout=0.05,
             dropout_rate=0.05, dtype="bfloat16", param_dtype="float32", impl="auto",
             scan_layers=False, remat="none"),
        optimizer=dict(learning_rate=5e-3, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8,
                       grad_clip=1.0, warmup_steps=2000, total_steps=80_000, min_lr=1e-4),
        data=dict(corpus="tokens", path="", context_length=512, batch_size=512,
                  allow_vocab_padding=True),
        train=dict(num_steps=80_000, log_every=100, eval_every=2000, eval_batches=20,
                   seed=1337),
        checkpoint=dict(save_every=1000),
    )
    if "tiny_text" in presets:
        make_tiny_text(config, pmem_size=224, pmem_attention_dropout=0.0, dropout_rate=0.0)
    return config
