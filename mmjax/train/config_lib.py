"""The config base of every config file in ``configs/`` (the three-moons one included): one
preset parser, one set of defaults, the paper scales and the presets every LM config shares.

Config files stay standalone Python files (``get_config(arg)``); what several of them share
lives here, once. Every config is made by :func:`make_config`; language-model configs by
:func:`lm_config`, which fills :data:`DEFAULTS` in. The vocabulary size is said once, in
``model.vocab_size`` (the data pipeline reads it there).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

# The fused loss's default chunk (mmjax.ops.lm_head_loss), in positions (every batch row is
# in every chunk). Measured on 2 CPU cores, fp32, loss + gradients of hidden and head: at
# [8, 256, 256] x vocab 8192, dense 292 ms, chunks of 256/128/64/32 positions 97-111 ms; at
# [4, 1024, 768] x vocab 50304, dense 4.55 s, chunks of 512..64 3.55-3.73 s. On a TPU the
# logits alive are then rows-per-chip x 128 x vocab fp32 instead of rows x context x vocab.
LOSS_CHUNK = 128

# Settings a language-model config may leave out, with their values: the training loop's
# and every config's single source of defaults.
DEFAULTS: dict[str, dict[str, Any]] = {
    # init_from: a workdir or checkpoint step directory whose parameters start a new run
    # skip_nonfinite_steps: a step whose loss or gradient norm is NaN/inf leaves the parameters
    # and optimiser state unchanged (counted in the metrics) instead of stopping the run
    # loss_chunk: positions per chunk of the fused LM head + cross-entropy (0: dense logits)
    "train": {"eval_every": 0, "eval_batches": 4, "grad_accum_steps": 1, "init_from": "",
              "skip_nonfinite_steps": False, "loss_chunk": LOSS_CHUNK},
    # mesh: (data, fsdp, tensor) of one slice; rules: None for the defaults; num_slices:
    # slices data-parallel over DCN; device_order: "auto", or "torus" to order a simulated
    # (CPU) pod's devices like a real slice's (mmjax.train.sharding.make_mesh)
    "sharding": {"mesh": (-1, 1, 1), "rules": None, "num_slices": 1, "device_order": "auto"},
    # with --workdir only; save_every=0: the final step and a SIGTERM's step only
    "checkpoint": {"save_every": 1000, "max_to_keep": 3},
}

# Model sizes of "Memory Mosaics at Scale" (arXiv 2507.03285). Small: the paper gives layers,
# width and heads; CHOICE: SwiGLU width 3.5 x width, the large model's ratio (14336 / 4096).
PAPER_SCALES = {
    "large": dict(num_layers=32, num_heads=32, embed_dim=4096, mlp_dim=14336),
    "small": dict(num_layers=24, num_heads=16, embed_dim=2048, mlp_dim=7168),
}
PAPER_VOCAB = 128256

# Sizes of the ``:tiny`` preset of every LM config: trains on CPU in seconds.
TINY_MODEL = dict(vocab_size=256, num_layers=2, num_heads=4, embed_dim=64, dtype="float32")

# The ``:tiny_text`` presets' vocabulary: fits a tokenizer of at most 4096 ids (the preset
# sets data.allow_vocab_padding); override --config.model.vocab_size for a larger one.
TINY_TEXT_VOCAB = 4096

# "Memory Mosaics at Scale" token budgets: the small scale trains on 200B tokens, the large
# on 1T (steps of 1024 x 4096 tokens).
PAPER_TOKENS = {"small": 200 * 10**9, "large": 10**12}
PAPER_TOKENS_PER_STEP = 1024 * 4096


def parse_presets(arg: str | None, known: Iterable[str] = (),
                  values: Iterable[str] = ()) -> dict[str, Any]:
    """The presets after ``:`` in ``--config FILE.py:ARG``, comma-separated.

    A name in ``known`` is a flag (``"tiny"`` -> ``{"tiny": True}``); a name in ``values``
    takes an integer (``"heads=3"`` -> ``{"heads": 3}``). Anything else raises, listing what
    the file knows. ``"tiny" in presets`` tests a flag; ``presets.get("heads", 3)`` a value.
    """
    known, values = tuple(known), tuple(values)
    presets: dict[str, Any] = {}
    for item in (arg or "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep and key in known:
            presets[key] = True
        elif sep and key in values:
            try:
                presets[key] = int(value)
            except ValueError:
                raise ValueError(f"preset {key} must be an integer, got {value!r}") from None
        else:
            raise ValueError(f"unknown preset {item!r}; known: {list(known)}"
                             + (f", and {[f'{v}=INT' for v in values]}" if values else ""))
    return presets


def make_config(**sections: Mapping[str, Any] | Any) -> ml_collections.ConfigDict:
    r"""A config whose sections (dicts) become nested ``ConfigDict``\ s; other values stay."""
    config = ml_collections.ConfigDict()
    for name, section in sections.items():
        config[name] = (ml_collections.ConfigDict(dict(section))
                        if isinstance(section, Mapping) else section)
    return config


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the sections and keys of :data:`DEFAULTS` it lacks."""
    config = ml_collections.ConfigDict(config.to_dict())
    for section, settings in DEFAULTS.items():
        if section not in config:
            config[section] = ml_collections.ConfigDict()
        for key, value in settings.items():
            if key not in config[section]:
                config[section][key] = value
    return config


def lm_config(model: dict, *, optimizer: dict, data: dict, train: dict,
              **sections: dict) -> ml_collections.ConfigDict:
    """A language-model config: ``model``, ``optimizer``, ``data``, ``train`` (and optionally
    ``checkpoint``, ``sharding``), with :data:`DEFAULTS` filled in."""
    if "vocab_size" in data:
        raise ValueError("data.vocab_size: the vocabulary size is said once, in model.vocab_size")
    return with_defaults(make_config(model=model, optimizer=optimizer, data=data, train=train,
                                     **sections))


def paper_scale_config(model: dict, scale: str, presets: set[str]) -> ml_collections.ConfigDict:
    """A "Memory Mosaics at Scale" run: paper sizes, vocabulary 128256, untied embeddings,
    context 4096, with the ``finetune`` (context 32768), ``tiny`` and ``tiny_text`` presets
    applied.

    Layers are scanned and fully rematerialised (what fits a pod's HBM: see ``mmjax.aot``).
    Presets: ``tiny`` (CPU smoke run), ``tiny_text`` (the tiny model on a token store,
    vocabulary 4096), ``finetune`` (context 32768; with ``tiny``/``tiny_text``, twice the tiny
    context); the v2 files add ``no_long_term``. The data is a token store
    (``corpus="tokens"``, ``--config.data.path=DIR`` from ``python -m mmjax.data.prepare``,
    tokenised with a tokenizer of ``model.vocab_size`` ids; LLaMA-3's has 128256); the
    paper's training corpus is not public. Token
    budgets as in the paper: 200B tokens at the small scale (47,684 steps of 1024 x 4096
    tokens), 1T at the large (238,419 steps). ``finetune`` starts from a pre-trained run's
    parameters: give it ``--config.train.init_from=PRETRAIN_WORKDIR``.

    CHOICE (the paper does not give them): LLaMA-3-like AdamW settings, 1024 x 4096 tokens per
    step; fine-tuning keeps the tokens per step and runs a short cosine at a lower rate.
    """
    if scale not in PAPER_SCALES:
        raise ValueError(f"scale must be one of {sorted(PAPER_SCALES)}, got {scale!r}")
    model = dict(vocab_size=PAPER_VOCAB, **PAPER_SCALES[scale], tie_embeddings=False,
                 dropout_rate=0.0, dtype="bfloat16", impl="auto", scan_layers=True,
                 remat="full") | model
    steps = -(-PAPER_TOKENS[scale] // PAPER_TOKENS_PER_STEP)  # 47,684 small, 238,419 large
    config = lm_config(
        model,
        optimizer=dict(learning_rate=3e-4, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8,
                       grad_clip=1.0, warmup_steps=2000, total_steps=steps, min_lr=3e-5),
        data=dict(context_length=4096, batch_size=1024, corpus="tokens", path=""),
        train=dict(num_steps=steps, log_every=100, seed=0),
    )
    if "finetune" in presets:
        config.data.update(context_length=32768, batch_size=128)
        config.optimizer.update(learning_rate=3e-5, warmup_steps=100, total_steps=2000,
                                min_lr=3e-6)
        config.train.num_steps = 2000
    if "tiny" in presets:
        make_tiny(config, mlp_dim=224)
    if "tiny_text" in presets:
        make_tiny_text(config, mlp_dim=224)
    if "finetune" in presets and ("tiny" in presets or "tiny_text" in presets):
        # the tiny analogue of 4k -> 32k: twice the tiny context, a short low-rate run
        config.data.context_length *= 2
        config.optimizer.update(learning_rate=1e-3, warmup_steps=5, total_steps=50,
                                min_lr=1e-4)
        config.train.num_steps = 50
    return config


def make_tiny(config: ml_collections.ConfigDict, **model_overrides) -> None:
    """Shrink an LM config in place to the CPU-sized ``:tiny`` run on the PFA corpus."""
    config.model.update(TINY_MODEL | model_overrides)
    config.data.update(context_length=64, batch_size=8, corpus="pfa")
    config.optimizer.update(learning_rate=3e-3, warmup_steps=10, total_steps=50, min_lr=3e-4)
    config.train.update(num_steps=50, log_every=10)
    config.checkpoint.save_every = 25


def make_tiny_text(config: ml_collections.ConfigDict, **model_overrides) -> None:
    """Shrink an LM config in place to the ``:tiny_text`` run: the :data:`TINY_MODEL` sizes
    with vocabulary :data:`TINY_TEXT_VOCAB` (a store whose tokenizer has at most that many
    ids), on a token store (``--config.data.path``), context 128, batch 16, 300 steps (about
    a minute on 2 CPU cores)."""
    config.model.update(TINY_MODEL | dict(vocab_size=TINY_TEXT_VOCAB) | model_overrides)
    # padding: any tokenizer of at most 4096 ids fits (a larger one is a start-up error)
    config.data.update(context_length=128, batch_size=16, corpus="tokens",
                       allow_vocab_padding=True)
    if "path" not in config.data:
        config.data.path = ""
    config.optimizer.update(learning_rate=3e-3, warmup_steps=20, total_steps=300, min_lr=3e-4)
    config.train.update(num_steps=300, log_every=25, eval_every=100)
    config.checkpoint.save_every = 100


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Check the loop's settings before anything is built; raises one ``ValueError`` listing
    every problem, one line each (``config`` with :data:`DEFAULTS` filled in)."""
    problems = []

    def check(section: str, key: str, ok, rule: str) -> None:
        if section not in config or key not in config[section]:
            return
        value = config[section][key]
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            problems.append(f"{section}.{key}={value!r}: must be {rule}")

    positive = (lambda v: v >= 1), ">= 1"
    non_negative = (lambda v: v >= 0), ">= 0"
    check("train", "num_steps", *non_negative)
    check("train", "log_every", *positive)
    check("train", "eval_every", *non_negative)
    check("train", "seed", *non_negative)
    check("train", "grad_accum_steps", *positive)
    check("train", "loss_chunk", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    # the final evaluation always runs: eval_batches=0 would divide by zero after training
    check("train", "eval_batches", *positive)
    check("checkpoint", "save_every", *non_negative)
    check("checkpoint", "max_to_keep", *positive)
    check("data", "context_length", *positive)
    check("data", "batch_size", *positive)
    check("sharding", "num_slices", lambda v: isinstance(v, int) and v >= 1,
          "an integer >= 1")
    check("sharding", "device_order", lambda v: v in ("auto", "torus"),
          "one of 'auto', 'torus'")
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))
