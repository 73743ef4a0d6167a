"""The embedded default: a tiny v1 Memory Mosaic on the synthetic random-automaton corpus.

    python -m mmjax.train --workdir /tmp/mmjax_default

runs in about a minute on 2 CPU cores. The training loss falls from 4.1 (log 64 = 4.16) to
about 2.6 in 300 steps. The held-out loss by position falls along each sequence, from about 3.4
in its first quarter to 2.2 in its last. That is in-context learning: every sequence walks its
own random automaton (4 states, 3 edges each), so a memory of the sequence itself is the only
way to predict it. The floor is log 3 = 1.10. Any key can be overridden on the command
line, e.g. ``--config.train.num_steps=500``. This file is also the base of
``configs/mm_v1_small.py:tiny``.
"""

from mmjax.train.config_lib import lm_config


def get_config(arg: str | None = None):
    del arg
    return lm_config(
        dict(
            name="memory_mosaic",
            vocab_size=64,
            num_layers=2,
            num_heads=4,
            embed_dim=64,
            pmem_size=224,  # 3.5 x embed: the GPT2-MLP parameter budget
            pmem_count=1,
            ic_dropout=0.0,
            hd_dropout=0.0,
        ),
        data=dict(
            corpus="pfa",
            corpus_options=dict(num_states=4, edges_per_state=3),
            context_length=128,
            batch_size=16,
        ),
        optimizer=dict(
            learning_rate=1e-2,
            weight_decay=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            grad_clip=1.0,
            warmup_steps=20,
            total_steps=300,
            min_lr=1e-4,
        ),
        train=dict(num_steps=300, log_every=25, eval_every=100, seed=0),
        checkpoint=dict(save_every=100),  # only when --workdir is given; resume is automatic
    )
