"""A 2-layer Memory Mosaic and a 2-layer GPT2 with the same number of parameters, trained
the same way on a synthetic corpus: the pair that the in-context evaluations compare
(``configs/icll.py``, ``configs/recall.py``)."""

from __future__ import annotations

MODELS = ("mm", "gpt2")


def pair_config(model: str, *, corpus: str, corpus_options: dict, vocab_size: int,
                context: int, steps: int, seed: int = 0, width: int = 64,
                batch_size: int = 16):
    """The training config of one model of the pair.

    ``model``: ``"mm"`` (v1 Memory Mosaic) or ``"gpt2"`` (4 x width MLP, learned positions);
    2 layers, 4 heads. The Memory Mosaic's persistent memory has ``3.5 x width`` slots per head
    (the GPT2 MLP's budget, as the official Library sizes it) plus ``context / (2 x layers)``
    more: the parameters of GPT2's position table, so that both models have the same number
    of parameters up to the Memory Mosaic's per-head scalars (7 per head and layer). AdamW
    3e-3 with ``min(50, steps / 2)`` warm-up steps and a cosine decay to 1e-4.
    """
    from mmjax.train.config_lib import lm_config

    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    sizes = dict(vocab_size=vocab_size, num_layers=2, num_heads=4, embed_dim=width,
                 context_length=context)
    layers = sizes["num_layers"]
    model_config = (dict(name="gpt2", **sizes) if model == "gpt2" else
                    dict(name="memory_mosaic", pmem_size=int(3.5 * width) + context // (2 * layers),
                         **sizes))
    return lm_config(
        model_config,
        data=dict(corpus=corpus, context_length=context, batch_size=batch_size,
                  corpus_options=dict(corpus_options)),
        optimizer=dict(learning_rate=3e-3, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8,
                       grad_clip=1.0, warmup_steps=min(50, steps // 2), total_steps=steps,
                       min_lr=1e-4),
        train=dict(num_steps=steps, log_every=max(steps // 4, 1), eval_every=0,
                   eval_batches=1, seed=seed),
    )
