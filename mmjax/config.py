"""Configs: the one loader, the pieces every ``configs/*.py`` file shares, the embedded default.

A config is an ``ml_collections.ConfigDict`` built by a Python file's ``get_config(arg)``, where
``arg`` is the text after ``:`` in ``configs/FILE.py:ARG`` (comma-separated presets, parsed
by :func:`parse_presets` from the file's ``PRESETS`` and ``VALUES``). :func:`load` turns such
a spec, or a registered name (``"default"``: the config that ships inside the package, for
``pip install`` users without ``configs/``), plus ``--config.a.b=v`` overrides into a config,
exactly as the command line's ``--config`` does (:func:`define_flag`, ml_collections' own
config flag reading files with :func:`build`; ml_collections applies the overrides of both).

Config files stay standalone Python files; what several of them share lives here, once. Every
config is made by :func:`make_config`; language-model configs by :func:`lm_config`, which
fills :data:`DEFAULTS` in and checks the keys every LM config names the same way
(:data:`LM_KEYS`). The vocabulary size is said once, in ``model.vocab_size``.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

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
    # profile_steps: "START,COUNT" writes a jax.profiler trace of those steps into the workdir
    # (mmjax.train.profile), from process 0 or, with profile_all_hosts, from every host
    "train": {"eval_every": 0, "eval_batches": 4, "grad_accum_steps": 1, "init_from": "",
              "skip_nonfinite_steps": False, "loss_chunk": LOSS_CHUNK, "profile_steps": "",
              "profile_all_hosts": False},
    # mesh: (data, fsdp, tensor) of one slice; rules: None for the defaults; num_slices:
    # slices data-parallel over DCN; device_order: "auto", or "torus" to order a simulated
    # (CPU) pod's devices like a real slice's (mmjax.train.sharding.make_mesh)
    "sharding": {"mesh": (-1, 1, 1), "rules": None, "num_slices": 1, "device_order": "auto"},
    # with --workdir only; save_every=0: the final step and a SIGTERM's step only
    "checkpoint": {"save_every": 1000, "max_to_keep": 3},
}

# Keys every language-model config gives, under these names and no others (the loop, the
# data pipeline and the tools read them there).
LM_KEYS = {"train": ("num_steps", "log_every", "seed"),
           "data": ("corpus", "context_length", "batch_size")}

# Model sizes of "Memory Mosaics at Scale" (arXiv 2507.03285), the ``:small`` and ``:large``
# presets of the paper-scale configs (small is the default). Small: the paper gives layers,
# width and heads; CHOICE: SwiGLU width 3.5 x width, the large model's ratio (14336 / 4096).
PAPER_SCALES = {
    "small": dict(num_layers=24, num_heads=16, embed_dim=2048, mlp_dim=7168),
    "large": dict(num_layers=32, num_heads=32, embed_dim=4096, mlp_dim=14336),
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

# The two models of the equal-size pair (:func:`pair_config`): v1 Memory Mosaic and GPT2.
PAIR_MODELS = ("mm", "gpt2")
# The v2 models of the same size (:func:`pair_config`): MM v2, LLaMA and the short/long LLaMA.
V2_PAIR_MODELS = ("v2", "llama", "llama_short_long")
# Their own settings: SwiGLU widths that equalise the parameters (within 0.4% at width 64,
# vocabulary 64: 127,376 / 127,296 / 127,808), and the v2 tiny preset's window and skips.
_V2_PAIR = {
    "v2": dict(name="memory_mosaic_v2", mlp_dim=176),
    "llama": dict(name="llama", mlp_dim=224),
    "llama_short_long": dict(name="llama_short_long", mlp_dim=140),
}
_V2_PAIR_TIERS = dict(short_term_window=16, long_term_skip_range=(4, 16),
                      inference_long_term_skip=4)
# The v2 studies (mmjax.eval multidoc, ...) add v2 without its long-term tier and a v1
# Memory Mosaic, sized to MM v2 at vocabulary 128 (135,568 parameters; these 135,656 and
# 135,544; the v2 pair's 135,488 and 136,000).
STUDY_MODELS = V2_PAIR_MODELS + ("v2_no_long_term", "v1")
_V2_PAIR |= {
    "v2_no_long_term": dict(name="memory_mosaic_v2", long_term=False, mlp_dim=243),
    "v1": dict(name="memory_mosaic", pmem_size=336),
}

# The repository's root and its configs/ (present in a checkout, not in an installed wheel).
REPOSITORY = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = REPOSITORY / "configs"


# ------------------------------------------------------------------------------- presets


def parse_presets(arg: str | None, known: Iterable[str] = (),
                  values: Iterable[str] = ()) -> dict[str, Any]:
    """The presets after ``:`` in ``--config FILE.py:ARG``, comma-separated.

    A name in ``known`` (a file's ``PRESETS``) is a flag (``"tiny"`` -> ``{"tiny": True}``);
    a name in ``values`` (its ``VALUES``) takes an integer (``"heads=3"`` -> ``{"heads": 3}``).
    Anything else raises, listing what the file knows. ``"tiny" in presets`` tests a flag;
    ``presets.get("heads", 3)`` a value.
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


def one_of(presets: Mapping[str, Any], choices: Sequence[str], default: str) -> str:
    """The one preset of ``choices`` given in ``presets``, ``default`` when none is; two or
    more raise (``small,large``, ``mm,gpt2``)."""
    given = [choice for choice in choices if choice in presets]
    if len(given) > 1:
        raise ValueError(f"presets {', '.join(given)} exclude each other: choose one of "
                         f"{', '.join(choices)}")
    return given[0] if given else default


def paper_scale(presets: Mapping[str, Any]) -> str:
    """The scale a paper-scale config's presets choose: ``small`` (default) or ``large``."""
    return one_of(presets, tuple(PAPER_SCALES), "small")


# -------------------------------------------------------------------------- building blocks


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
    ``checkpoint``, ``sharding``), with :data:`DEFAULTS` filled in; every key of
    :data:`LM_KEYS` must be given."""
    if "vocab_size" in data:
        raise ValueError("data.vocab_size: the vocabulary size is said once, in model.vocab_size")
    given = dict(data=data, train=train)
    missing = [f"{section}.{key}" for section, keys in LM_KEYS.items() for key in keys
               if key not in given[section]]
    if missing:
        raise ValueError(f"a language-model config needs {', '.join(missing)}")
    return with_defaults(make_config(model=model, optimizer=optimizer, data=data, train=train,
                                     **sections))


def paper_scale_config(model: dict, scale: str, presets: Mapping[str, Any]
                       ) -> ml_collections.ConfigDict:
    """A "Memory Mosaics at Scale" run: paper sizes, vocabulary 128256, untied embeddings,
    context 4096, with the ``finetune`` (context 32768), ``tiny`` and ``tiny_text`` presets
    applied.

    Layers are scanned and fully rematerialised (what fits a pod's HBM: see ``mmjax.aot``).
    Presets: ``tiny`` (CPU smoke run), ``tiny_text`` (the tiny model on a token store,
    vocabulary 4096), ``finetune`` (context 32768; with ``tiny``/``tiny_text``, twice the tiny
    context); ``configs/mmv2.py`` adds ``no_long_term``, ``configs/llama.py`` ``short_long``.
    The data is a token store (``corpus="tokens"``, ``--config.data.path=DIR`` from
    ``python -m mmjax.data.prepare``, tokenised with a tokenizer of ``model.vocab_size`` ids;
    LLaMA-3's has 128256); the paper's training corpus is not public. Token budgets as in the
    paper: 200B tokens at the small scale (47,684 steps of 1024 x 4096 tokens), 1T at the
    large (238,419 steps). ``finetune`` starts from a pre-trained run's parameters: give it
    ``--config.train.init_from=PRETRAIN_WORKDIR``.

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


def pair_config(model: str, *, corpus: str, corpus_options: dict, vocab_size: int,
                context: int, steps: int, seed: int = 0, width: int = 64,
                batch_size: int = 16) -> ml_collections.ConfigDict:
    """One model of the equal-size pair that the in-context evaluations compare
    (``configs/icll.py``, ``configs/recall.py``), trained on a synthetic corpus.

    ``model``: ``"mm"`` (v1 Memory Mosaic) or ``"gpt2"`` (4 x width MLP, learned positions);
    2 layers, 4 heads. The Memory Mosaic's persistent memory has ``3.5 x width`` slots per head
    (the GPT2 MLP's budget, as the official Library sizes it) plus ``context / (2 x layers)``
    more: the parameters of GPT2's position table, so that both models have the same number
    of parameters up to the Memory Mosaic's per-head scalars (7 per head and layer). AdamW
    3e-3 with ``min(50, steps / 2)`` warm-up steps and a cosine decay to 1e-4.

    The v2 models (:data:`V2_PAIR_MODELS`, at width 64): ``"v2"`` (MM v2), ``"llama"`` and
    ``"llama_short_long"`` (separate short- and long-term attention), untied, with SwiGLU
    widths that equalise their parameters; window 16 and long-term skip ``U[4, 16]`` (4 at
    inference), the v2 tiny preset's. The v2 studies add (:data:`STUDY_MODELS`)
    ``"v2_no_long_term"`` and ``"v1"``, sized to MM v2.
    """
    if model not in PAIR_MODELS + STUDY_MODELS:
        raise ValueError(f"model must be one of {PAIR_MODELS + STUDY_MODELS}, got {model!r}")
    if model in STUDY_MODELS and width != 64:
        raise ValueError(f"the v2 pair is sized at width 64, got width={width}")
    sizes = dict(vocab_size=vocab_size, num_layers=2, num_heads=4, embed_dim=width)
    layers = sizes["num_layers"]
    if model in STUDY_MODELS:
        model_config = dict(_V2_PAIR[model], **sizes)
        if model_config["name"] == "memory_mosaic_v2" or model == "llama_short_long":
            model_config.update(_V2_PAIR_TIERS)
    elif model == "gpt2":
        model_config = dict(name="gpt2", context_length=context, **sizes)
    else:
        model_config = dict(name="memory_mosaic",
                            pmem_size=int(3.5 * width) + context // (2 * layers), **sizes)
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


# The v2 studies' corpora: vocabulary 128 (the size STUDY_MODELS are equal at), context 512;
# 600 (pre)training steps of 16 x 512 tokens keep a study within 30 minutes per seed on
# 2 CPU cores.
STUDY_VOCAB = 128
STUDY_CONTEXT = 512
STUDY_STEPS = 600


STUDY_CORPORA = ("multidoc", "episodes")


def study_config(model: str = "v2", *, corpus: str = "multidoc", steps: int = STUDY_STEPS,
                 seed: int = 0) -> ml_collections.ConfigDict:
    """One run of a v2 study (``configs/studies.py``, ``python -m mmjax.eval multidoc``,
    ``icl_anonymized``, ``finetune_speed``): a model of :data:`STUDY_MODELS`
    (:func:`pair_config`) on the ``multidoc`` or ``episodes`` corpus
    (:mod:`mmjax.data.multidoc`, :mod:`mmjax.data.episodes`), vocabulary 128, context 512."""
    if corpus not in STUDY_CORPORA:
        raise ValueError(f"corpus must be one of {STUDY_CORPORA}, got {corpus!r}")
    return pair_config(model, corpus=corpus, corpus_options={}, vocab_size=STUDY_VOCAB,
                       context=STUDY_CONTEXT, steps=steps, seed=seed)


def icll_config(model: str = "mm", *, languages: int = 1000, steps: int = 600, seed: int = 0,
                width: int = 64, context: int = 512,
                eval_languages: int = 256) -> ml_collections.ConfigDict:
    """One run of the in-context language learning study (``configs/icll.py``, ``python -m
    mmjax.eval icll``): the pair of :func:`pair_config` on the ``icll`` corpus, ``languages``
    training languages and ``eval_languages`` held out. In the package, so that the study
    runs from a plain install."""
    from mmjax.data.icll import VOCAB_SIZE

    return pair_config(model, corpus="icll",
                       corpus_options=dict(num_languages=languages,
                                           eval_languages=eval_languages),
                       vocab_size=VOCAB_SIZE, context=context, steps=steps, seed=seed,
                       width=width)


def _profile_steps_ok(value) -> bool:
    from mmjax.train.profile import parse_profile_steps

    try:
        parse_profile_steps(value)
    except ValueError:
        return False
    return True


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
    check("train", "profile_steps", _profile_steps_ok,
          "'' or 'START,COUNT' with START >= 1 and COUNT >= 1")
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


# ------------------------------------------------------------------------ embedded default


def default_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The embedded default: a tiny v1 Memory Mosaic on the synthetic random-automaton corpus.

    ``python -m mmjax.train --workdir /tmp/mmjax_default`` runs it in about a minute on 2 CPU
    cores. The training loss falls from 4.1 (log 64 = 4.16) to about 2.6 in 300 steps. The
    held-out loss by position falls along each sequence, from about 3.4 in its first quarter
    to 2.2 in its last. That is in-context learning: every sequence walks its own random
    automaton (4 states, 3 edges each), so a memory of the sequence itself is the only way to
    predict it. The floor is log 3 = 1.10. It is also ``configs/mm_v1_small.py:tiny``. No
    presets (``arg``); override keys instead, e.g. ``--config.train.num_steps=500``.
    """
    parse_presets(arg)
    return lm_config(
        dict(
            name="memory_mosaic",
            vocab_size=64,
            num_layers=2,
            num_heads=4,
            embed_dim=64,
            pmem_size=224,  # 3.5 x embed: the GPT2-MLP parameter budget
            pmem_count=1,
            pmem_attention_dropout=0.0,
            dropout_rate=0.0,
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


# Configs that ship inside the package, by name (a spec without ``.py``).
DEFAULT = "default"
REGISTERED: dict[str, Callable[[str | None], ml_collections.ConfigDict]] = {
    DEFAULT: default_config}


# -------------------------------------------------------------------------------- loading


def config_file(path: str) -> pathlib.Path:
    """The file a spec's ``path`` names: as given (absolute, or relative to the working
    directory), else, in a checkout, relative to the repository's root or its ``configs/``
    (so ``configs/mmv2.py`` and ``mmv2.py`` work from anywhere)."""
    given = pathlib.Path(path).expanduser()
    tried = [given]
    if not given.is_absolute() and CONFIGS.is_dir() and (REPOSITORY / "setup.cfg").is_file():
        tried += [REPOSITORY / given, CONFIGS / given]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise ValueError(f"config file {path!r} not found (looked for "
                     f"{', '.join(str(c) for c in tried)})")


def config_module(path: str) -> types.ModuleType:
    """The config file ``path`` (found by :func:`config_file`) run as a module: its
    ``get_config(arg)``, ``PRESETS`` and ``VALUES``."""
    found = config_file(path)
    module_spec = importlib.util.spec_from_file_location(f"mmjax_config_{found.stem}", found)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {str(found)!r} has no get_config(arg)")
    return module


def build(spec: str) -> ml_collections.ConfigDict:
    """The config of ``spec``, ``FILE.py[:ARG]`` or a registered name (:data:`REGISTERED`),
    without overrides: the file's ``get_config(ARG)`` (``None`` without ``:``)."""
    target, _, arg = spec.partition(":")
    if target.endswith(".py"):
        get_config = config_module(target).get_config
    elif target in REGISTERED:
        get_config = REGISTERED[target]
    else:
        raise ValueError(f"unknown config {target!r}: give configs/FILE.py[:presets] or one of "
                         f"{sorted(REGISTERED)}")
    config = get_config(arg or None)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"{spec}: get_config returned a {type(config).__name__}, "
                         "not a ConfigDict")
    return config


def override_flag(override: str | tuple[str, Any]) -> str:
    """``"--config.a.b=v"`` as given (``--noconfig.a`` too); ``("a.b", v)`` as
    ``"--config.a.b=v"``: a string ``v`` as typed on a command line, any other value as its
    ``repr`` (``True``, ``0.001``, ``(1, 2, 1)``)."""
    if isinstance(override, str):
        if not override.startswith(("--config.", "--noconfig.")):
            raise ValueError(f"override {override!r} is not --config.KEY=VALUE")
        return override
    key, value = override
    return f"--config.{key}={value if isinstance(value, str) else repr(value)}"


def _key_of(flag: str) -> str:
    """``"--config.a.b=v"`` -> ``"a.b"``."""
    return flag.split("=", 1)[0].split(".", 1)[1]


def _has_key(config: ml_collections.ConfigDict, key: str) -> bool:
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Iterable[str | tuple[str, Any]]) -> ml_collections.ConfigDict:
    """``config`` with ``overrides`` applied by ml_collections' config flag, as on a command
    line: existing keys only, values parsed by the key's type. Unlocked (a caller may add
    keys); a bad override raises one ``ValueError`` line."""
    argv = ["mmjax.config", *(override_flag(o) for o in overrides)]
    if len(argv) > 1:
        values = flags.FlagValues()
        try:
            config_flags.DEFINE_config_dict("config", config, flag_values=values,
                                            sys_argv=argv, lock_config=True)
            values(argv)
            config = values.config
        except (AttributeError, KeyError) as e:
            unknown = [flag for flag in argv[1:] if not _has_key(config, _key_of(flag))]
            raise ValueError(f"unknown config key {_key_of(unknown[0])!r} in {unknown[0]}"
                             if unknown else f"bad override in {' '.join(argv[1:])}: {e}"
                             ) from None
        except flags.Error as e:
            raise ValueError(f"bad override: {str(e).splitlines()[0]}") from None
    config.unlock()
    return config


def load(spec: str, overrides: Iterable[str | tuple[str, Any]] = ()
         ) -> ml_collections.ConfigDict:
    """The config of ``spec`` (``configs/FILE.py[:presets]``: a path, relative to the working
    directory or, in a checkout, to the repository or its ``configs/``; or a registered name
    such as ``"default"``) with ``overrides`` (``"--config.a.b=v"`` or ``("a.b", v)``) applied:
    what ``--config SPEC --config.a.b=v`` gives a CLI. Bad specs, presets or overrides raise
    one ``ValueError`` line naming the problem."""
    return apply_overrides(build(spec), overrides)


class _SpecParser(flags.ArgumentParser):
    """The parser of :func:`define_flag`'s spec: ``FILE.py[:ARG]`` or a registered name read
    by :func:`build` (the file resolution and errors of :func:`load`), locked as ml_collections'
    own config-file parser locks it."""

    def parse(self, argument):
        config = build(argument)
        config.lock()
        return config

    def flag_type(self):
        return "config object"


def define_flag(name: str = "config", default: str | None = DEFAULT,
                help_string: str = "Config: FILE.py[:presets] or a registered name; "
                                   "override its keys with --config.KEY=VALUE.",
                flag_values: flags.FlagValues = flags.FLAGS,
                sys_argv: list[str] | None = None) -> flags.FlagHolder:
    """The CLIs' ``--NAME=SPEC`` flag with its ``--NAME.a.b=v`` overrides: ml_collections'
    config-file flag, reading specs as :func:`load` does. ``default`` (a spec, or None for
    none) is read when the flag is defined if the command line gives no ``--NAME``; an unknown
    key in an override then raises here (``AttributeError``/``KeyError``). The flag is a key
    flag of the calling command, so its ``--help`` lists it."""
    holder = config_flags.DEFINE_config_file(name, None, help_string, flag_values=flag_values,
                                             lock_config=True, sys_argv=sys_argv)
    flag_values[name].parser = _SpecParser()
    caller = sys._getframe(1).f_globals.get("__name__", "")
    # absl names a command's own module by its path (sys.argv[0]) when it runs as __main__
    flag_values.register_key_flag_for_module(sys.argv[0] if caller == "__main__" else caller,
                                             flag_values[name])
    if default is not None:
        flag_values.set_default(name, default)
    return holder
