"""The v2 / baseline config files: layout, presets, shapes via eval_shape only, tiny forward."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from config_loading import load_config

from mmjax.models import build_model

SPECS = ["gpt2_small.py", "llama.py:small", "llama.py:large", "llama.py:large,short_long",
         "mmv2.py:small", "mmv2.py:large", "mmv2.py:large,no_long_term",
         "mmv2.py:large,finetune", "llama.py:large,finetune"]
TINY = ["gpt2_small.py:tiny", "llama.py:tiny", "llama.py:large,tiny,short_long",
        "mmv2.py:tiny", "mmv2.py:large,tiny,no_long_term", "llama.py:tiny_text"]
LAYOUT = {
    "optimizer": {"learning_rate", "weight_decay", "b1", "b2", "eps", "grad_clip",
                  "warmup_steps", "total_steps", "min_lr"},
    "data": {"context_length", "batch_size", "corpus", "path"},
    "train": {"num_steps", "log_every", "seed", "eval_every", "eval_batches", "init_from",
              "grad_accum_steps", "skip_nonfinite_steps", "loss_chunk", "profile_steps",
              "profile_all_hosts"},
}
OPTIONAL = {"data": {"allow_vocab_padding"}}


@pytest.mark.parametrize("spec", SPECS + TINY)
def test_config_builds_with_eval_shape_only(spec):
    config = load_config(spec)
    for section, keys in LAYOUT.items():
        assert keys <= set(config[section]) <= keys | OPTIONAL.get(section, set()), section
    model = build_model(config.model)
    ids = jax.ShapeDtypeStruct((1, 16), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)
    leaves = jax.tree.leaves(flax.core.meta.unbox(shapes))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)


@pytest.mark.parametrize("spec", TINY)
def test_tiny_preset_runs_on_cpu(spec):
    config = load_config(spec)
    model = build_model(config.model)
    ids = jnp.zeros((2, config.data.context_length), jnp.int32)
    params = model.init(jax.random.key(0), ids)
    logits = model.apply(params, ids, deterministic=False,
                         rngs={"dropout": jax.random.key(1), "skip": jax.random.key(2)})
    assert logits.shape == (2, config.data.context_length, config.model.vocab_size)
    assert np.isfinite(np.asarray(logits)).all()


def test_paper_scales():
    large, small = load_config("mmv2.py:large"), load_config("mmv2.py:small")
    assert (large.model.num_layers, large.model.embed_dim, large.model.num_heads,
            large.model.mlp_dim, large.model.vocab_size) == (32, 4096, 32, 14336, 128256)
    assert (small.model.num_layers, small.model.embed_dim, small.model.num_heads) == (24, 2048, 16)
    assert not large.model.tie_embeddings and large.data.context_length == 4096
    assert load_config("mmv2.py:large,finetune").data.context_length == 32768
    assert large.model.short_term_window == 256
    assert tuple(large.model.long_term_skip_range) == (64, 256)
    assert large.model.inference_long_term_skip == 64


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown preset"):
        load_config("mmv2.py:huge")
